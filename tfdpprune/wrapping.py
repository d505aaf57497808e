"""The layer wrapper both front ends build on (tfmot-style).

A wrapper owns the *same* layer (same variable objects), records what the
layer saw in every forward call so the DP step can compute per-example
gradients layer by layer (`core.recording`, `core.samplers`), and holds the
layer's masks as non-trainable weights created in `build`, so checkpoints
and `.keras` files carry them.

Masks gate updates, not the forward pass: a coordinate with mask 0 is not
clipped, noised or moved. Two masks per variable can be active, a *freeze*
mask (fixed for the run: pre-pruning / parameter freezing) and a *select*
mask (re-drawn in graph every k steps: parameter selection); the updated set
is their product. A wrapper pruned by Dirichlet pruning also holds the
learned importance of each output unit.

`WrapperMixin` is everything but the Keras base class:
`tfdpprune.keras2.wrapper.PruneWrapper` mixes it with `tf_keras`'s `Wrapper`,
`tfdpprune.keras3.wrapper.PruneWrapper` with Keras 3's. The subclass gives
`_weight(name, shape, dtype, initializer)` (a non-trainable weight).
"""

import inspect
from typing import Dict, Optional, Sequence

from tfdpprune import config as config_lib
from tfdpprune.core import engines
from tfdpprune.core import recording
from tfdpprune.core import samplers as samplers_lib
from tfdpprune.core._tf import tf
from tfdpprune.core.samplers import generic

STRUCTURES = {"weight": engines.WEIGHT, "neuron": engines.OUT,
              "layer": engines.SCALAR}


def choose_sampler(layer, force_generic: bool = False):
  """The layer's dedicated sampler if it supports the layer's configuration
  (and `force_generic` is false), else the generic per-layer sampler; None
  for layers without trainable weights."""
  sampler = None if force_generic else samplers_lib.sampler_for(layer)
  if sampler is not None and sampler.supports(layer) is None:
    return sampler
  if not layer.trainable_weights:
    return None
  return generic.GENERIC


class WrapperMixin:
  """Records a layer's calls for DP per-example gradients; holds its masks.

  Args:
    layer: any layer with trainable weights. Layers with a dedicated sampler
      (`tfdpprune.per_example.register_sampler`; Dense, Conv1D/2D,
      DepthwiseConv2D, Embedding, Layer/GroupNormalization, EinsumDense,
      MultiHeadAttention, LSTM/GRU/SimpleRNN and Bidirectional of them, ...)
      use it; any other layer gets the generic per-layer sampler (a
      vectorized per-example VJP of the layer alone).
    freeze_roles: roles of the variables (e.g. "kernel") that get a freeze
      mask; masks start all ones (everything updated).
    select_roles: roles that get a select mask (re-drawn during training).
    mask_structure: what the masks promise: "weight" (any 0/1 pattern),
      "neuron" (constant along all axes but the output axis) or "layer"
      (all zeros or all ones); coarser structures allow cheaper clipping.
    select_config: the select-mode `PruneConfig` (or its dict) that re-draws
      the select masks during training.
    importance_units: if set, the wrapper holds `importance`, a
      non-trainable `[importance_units]` variable of unit importances
      (Dirichlet pruning), saved with the model.
    generic: use the generic sampler even if the layer has a dedicated one
      (layers that share a variable with another layer, whose uses are
      summed before the norm).
  """

  def __init__(self, layer, freeze_roles: Sequence[str] = (),
               select_roles: Sequence[str] = (), mask_structure="weight",
               select_config=None, importance_units: Optional[int] = None,
               generic: bool = False, **kwargs):
    sampler = choose_sampler(layer, force_generic=generic)
    if sampler is None:
      raise ValueError(
          f"PruneWrapper: layer {layer.name!r} ({type(layer).__name__}) has "
          "no trainable weights, so there is nothing to wrap")
    if mask_structure not in STRUCTURES:
      raise ValueError(f"mask_structure={mask_structure!r} must be one of "
                       f"{sorted(STRUCTURES)}")
    kwargs.setdefault("name", f"prune_{layer.name}")
    super().__init__(layer, **kwargs)
    object.__setattr__(self, "freeze_roles", tuple(freeze_roles))
    object.__setattr__(self, "select_roles", tuple(select_roles))
    object.__setattr__(self, "mask_structure", mask_structure)
    object.__setattr__(self, "sampler", sampler)
    object.__setattr__(self, "generic", bool(generic))
    self.supports_masking = getattr(layer, "supports_masking", False)
    # Plain dicts, kept out of Keras' tracking: the weights themselves are
    # tracked by `add_weight`.
    object.__setattr__(self, "freeze_masks", {})
    object.__setattr__(self, "select_masks", {})
    object.__setattr__(self, "_captures", recording.CaptureBuffer())
    object.__setattr__(self, "_call_args", frozenset(
        inspect.signature(layer.call).parameters))
    object.__setattr__(self, "_var_keyword", any(
        p.kind == inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(layer.call).parameters.values()))
    if isinstance(select_config, dict):
      select_config = config_lib.PruneConfig.from_dict(select_config)
    object.__setattr__(self, "select_config", select_config)
    # Built by `masks.selectors` on first use: re-draws the select masks.
    object.__setattr__(self, "selector", None)
    # Select-mode public methods: a `public.PublicScorer` (in memory only;
    # `attach_public_data` gives it back to a loaded model).
    object.__setattr__(self, "public_scorer", None)
    object.__setattr__(self, "importance_units", importance_units)
    object.__setattr__(self, "importance", None)

  # -- weights ----------------------------------------------------------------

  def _weight(self, name, shape, dtype, initializer):
    """A non-trainable weight of the wrapper (the front end's `add_weight`)."""
    raise NotImplementedError

  def _build_masks(self):
    """Creates the masks and importances; registers the wrapper as an owner
    of its layer's variables. Called by the subclass's `build`."""
    roles = self.roles()
    for role in set(self.freeze_roles) | set(self.select_roles):
      if role not in roles:
        raise ValueError(f"layer {self.layer.name!r} has no trainable "
                         f"variable {role!r}; it has {sorted(roles)}")
    for role in self.freeze_roles:
      self._make_mask("freeze", role)
    for role in self.select_roles:
      self._make_mask("select", role)
    if self.importance_units is not None:
      self._make_importance()
    for var in roles.values():
      recording.register_owner(var, self)

  def _make_importance(self):
    object.__setattr__(self, "importance", self._weight(
        "unit_importance", [self.importance_units], tf.float32, "zeros"))

  def set_importance(self, values):
    """Stores unit importances (created on first use, after build)."""
    values = tf.convert_to_tensor(values, tf.float32)
    if self.importance is None:
      object.__setattr__(self, "importance_units", int(values.shape[0]))
      self._make_importance()
    self.importance.assign(values)

  def _saved_variables(self):
    """The wrapper's own variables in a canonical order (freeze masks,
    select masks, importance), whatever order they were added in."""
    out = [self.freeze_masks[r] for r in self.freeze_roles]
    out += [self.select_masks[r] for r in self.select_roles]
    if self.importance is not None:
      out.append(self.importance)
    return out

  def save_own_variables(self, store):
    for i, v in enumerate(self._saved_variables()):
      store[f"{i}"] = v.numpy()

  def load_own_variables(self, store):
    variables = self._saved_variables()
    if len(store.keys()) != len(variables):
      raise ValueError(f"layer {self.name!r} expected {len(variables)} "
                       f"variables, but the file has {len(store.keys())}")
    for i, v in enumerate(variables):
      v.assign(store[f"{i}"])

  def _make_mask(self, kind, role):
    var = self.roles()[role]
    store = self.freeze_masks if kind == "freeze" else self.select_masks
    store[role] = self._weight(f"{role.replace('/', '__')}_{kind}_mask",
                               var.shape, var.dtype, "ones")

  def add_masks(self, kind, roles, structure):
    """Adds freeze or select masks (all ones) for `roles` after build."""
    if kind not in ("freeze", "select"):
      raise ValueError(f"kind={kind!r} must be 'freeze' or 'select'")
    attr = "freeze_roles" if kind == "freeze" else "select_roles"
    store = self.freeze_masks if kind == "freeze" else self.select_masks
    for role in roles:
      if role in store:
        raise ValueError(f"layer {self.layer.name!r} already has a {kind} "
                         f"mask on {role!r}")
      self._make_mask(kind, role)
      object.__setattr__(self, attr, getattr(self, attr) + (role,))
    order = list(STRUCTURES)
    had_masks = len(self.freeze_masks) + len(self.select_masks) > len(roles)
    if not had_masks or order.index(structure) < order.index(
        self.mask_structure):
      object.__setattr__(self, "mask_structure", structure)

  def set_select_config(self, config):
    object.__setattr__(self, "select_config", config)
    object.__setattr__(self, "selector", None)

  # -- the protocol of the DP step ------------------------------------------

  def roles(self) -> Dict[str, tf.Variable]:
    """The wrapped layer's trainable variables by role."""
    if not self.layer.trainable:
      return {}
    return self.sampler.roles(self.layer)

  def role_of(self, var) -> Optional[str]:
    for role, v in self.roles().items():
      if v is var:
        return role
    return None

  @tf.autograph.experimental.do_not_convert
  def call(self, inputs, *args, **kwargs):
    if not self._var_keyword:
      kwargs = {k: v for k, v in kwargs.items() if k in self._call_args}
    outputs, a, z = self.sampler.forward(self.layer, inputs, *args, **kwargs)
    self._captures.add(engines.Capture(recording.current_graph(), a, z))
    return outputs

  def captures(self, graph):
    """The calls recorded in `graph` (None: eager)."""
    return self._captures.for_graph(graph)

  def take_captures(self, graph):
    """The calls of `graph` for a DP step (eager calls are consumed); None
    if eager calls were lost."""
    return self._captures.take(graph)

  def mask(self, role) -> Optional[tf.Tensor]:
    """The combined (freeze * select) mask tensor of `role`, or None."""
    parts = [store[role] for store in (self.freeze_masks, self.select_masks)
             if role in store]
    if not parts:
      return None
    out = tf.convert_to_tensor(parts[0])
    for p in parts[1:]:
      out = out * tf.convert_to_tensor(p)
    return out

  def statically_frozen(self, role) -> bool:
    """Whether the freeze mask of `role` is all zero (read at trace time).

    Freeze masks are fixed for a run, so a variable frozen entirely is left
    out of the per-example computation and its backward pass. Changing a
    freeze mask afterwards needs a new `model.compile` (a fresh trace).
    """
    var = self.freeze_masks.get(role)
    if var is None:
      return False
    with tf.init_scope():
      return not bool(tf.reduce_any(tf.convert_to_tensor(var) != 0).numpy())

  def structure(self):
    return STRUCTURES[self.mask_structure]

  def compute_output_shape(self, input_shape):
    return self.layer.compute_output_shape(input_shape)

  def compute_mask(self, inputs, mask=None):
    return self.layer.compute_mask(inputs, mask)

  def get_config(self):
    config = super().get_config()
    config.update(freeze_roles=list(self.freeze_roles),
                  select_roles=list(self.select_roles),
                  mask_structure=self.mask_structure,
                  select_config=(None if self.select_config is None else
                                 self.select_config.to_dict()),
                  importance_units=self.importance_units,
                  generic=self.generic)
    return config
