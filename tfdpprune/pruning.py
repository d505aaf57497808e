"""Pruning wrappers (tfmot-style), the variable -> wrapper lookup, prune/strip.

`prune(model)` wraps every supported layer of a Sequential or functional
model in a `PruneWrapper`. The wrapper owns the *same* layer (same variable
objects), records what the layer saw in the forward pass so the optimizer can
compute per-example gradients layer by layer (see `per_example.py`), and
holds the layer's masks as non-trainable variables created in `build`, so
checkpoints and `model.save` carry them.

Masks gate updates, not the forward pass: a coordinate with mask 0 is not
clipped, noised or moved by the DP optimizer. Two masks per variable can be
active, a *freeze* mask (fixed for the run: pre-pruning / parameter
freezing) and a *select* mask (re-drawn in graph every k steps: parameter
selection); the updated set is their product. A wrapper pruned by Dirichlet
pruning also holds the learned importance of each output unit.

Public data reach masks only through `prune(..., public_data=...)` and
`attach_public_data`, never through the private training data.
"""

import inspect
from typing import Dict, Optional, Sequence
import weakref

from absl import logging

from tfdpprune import config as config_lib
from tfdpprune import dirichlet
from tfdpprune import masks
from tfdpprune import per_example
from tfdpprune import per_example_attention  # pylint: disable=unused-import  (registers samplers)
from tfdpprune import per_example_conv  # pylint: disable=unused-import  (registers samplers)
from tfdpprune import per_example_generic
from tfdpprune import per_example_rnn  # pylint: disable=unused-import  (registers samplers)
from tfdpprune import public
from tfdpprune import randomness
from tfdpprune import validation
from tfdpprune._compat import keras
from tfdpprune._compat import tf

# Variable ref -> the wrapper that owns it. A registry (weak values, so a
# dropped model leaves nothing behind), used by the optimizer to find the fast
# per-example path of a variable.
_OWNER = weakref.WeakValueDictionary()

_MAX_CAPTURES = 16  # calls recorded per layer and graph (shared layers).


def wrapper_of(var) -> Optional["PruneWrapper"]:
  """The `PruneWrapper` owning variable `var`, or None."""
  return _OWNER.get(var.ref())


class _CaptureBuffer:
  """Per-wrapper record of the calls in the graph being traced.

  A plain object (not a list attribute) so Keras does not track its tensors.
  Only captures from the current graph (or, eagerly, the latest calls) are
  kept; the optimizer further keeps only those connected to the loss.
  """

  def __init__(self):
    self.items = []

  def add(self, capture):
    if self.items and self.items[-1].graph is not capture.graph:
      self.items = []
    self.items.append(capture)
    del self.items[:-_MAX_CAPTURES]

  def for_graph(self, graph):
    return [c for c in self.items if c.graph is graph]


def _current_graph():
  if tf.executing_eagerly():
    return None
  return tf.compat.v1.get_default_graph()


@keras.saving.register_keras_serializable(package="tfdpprune")
class PruneWrapper(keras.layers.Wrapper):
  """Wraps a layer with weights for DP per-example gradients and masks.

  Args:
    layer: any layer with trainable weights. Layers with a dedicated sampler
      (`per_example.register_sampler`; Dense, Conv1D/2D, DepthwiseConv2D,
      Embedding, Layer/GroupNormalization, EinsumDense, MultiHeadAttention,
      LSTM/GRU/SimpleRNN and Bidirectional of them, ...) use it; any other
      layer gets the generic per-layer sampler (a vectorized per-example VJP
      of the layer alone).
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
  """

  def __init__(self, layer, freeze_roles: Sequence[str] = (),
               select_roles: Sequence[str] = (), mask_structure="weight",
               select_config=None, importance_units: Optional[int] = None,
               **kwargs):
    sampler = choose_sampler(layer)
    if sampler is None:
      raise ValueError(
          f"PruneWrapper: layer {layer.name!r} ({type(layer).__name__}) has "
          "no trainable weights, so there is nothing to wrap")
    if mask_structure not in _STRUCTURES:
      raise ValueError(f"mask_structure={mask_structure!r} must be one of "
                       f"{sorted(_STRUCTURES)}")
    kwargs.setdefault("name", f"prune_{layer.name}")
    super().__init__(layer, **kwargs)
    self.freeze_roles = tuple(freeze_roles)
    self.select_roles = tuple(select_roles)
    self.mask_structure = mask_structure
    self.sampler = sampler
    self.supports_masking = getattr(layer, "supports_masking", False)
    self.freeze_masks: Dict[str, tf.Variable] = {}
    self.select_masks: Dict[str, tf.Variable] = {}
    object.__setattr__(self, "_captures", _CaptureBuffer())
    object.__setattr__(self, "_call_args", frozenset(
        inspect.signature(layer.call).parameters))
    if isinstance(select_config, dict):
      select_config = config_lib.PruneConfig.from_dict(select_config)
    object.__setattr__(self, "select_config", select_config)
    # Built by `masks.selectors` on first use: re-draws the select masks.
    object.__setattr__(self, "selector", None)
    # Select-mode public methods: a `public.PublicScorer` (in memory only;
    # `attach_public_data` gives it back to a loaded model).
    object.__setattr__(self, "public_scorer", None)
    self.importance_units = importance_units
    self.importance = None

  def build(self, input_shape):
    if not self.layer.built:
      self.layer.build(input_shape)
    super().build(input_shape)
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
      _OWNER[var.ref()] = self

  def _make_importance(self):
    self.importance = self.add_weight(
        name="unit_importance", shape=[self.importance_units],
        dtype=tf.float32, initializer="zeros", trainable=False,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

  def set_importance(self, values):
    """Stores unit importances (created on first use, after build)."""
    values = tf.convert_to_tensor(values, tf.float32)
    if self.importance is None:
      self.importance_units = int(values.shape[0])
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
    store[role] = self.add_weight(
        name=f"{role.replace('/', '__')}_{kind}_mask", shape=var.shape, dtype=var.dtype,
        initializer="ones", trainable=False,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

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
      setattr(self, attr, getattr(self, attr) + (role,))
    order = list(_STRUCTURES)
    had_masks = len(self.freeze_masks) + len(self.select_masks) > len(roles)
    if not had_masks or order.index(structure) < order.index(
        self.mask_structure):
      self.mask_structure = structure

  def set_select_config(self, config):
    object.__setattr__(self, "select_config", config)
    object.__setattr__(self, "selector", None)

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
    accepted = self._call_args
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD
               for p in inspect.signature(self.layer.call).parameters.values()):
      kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    outputs, a, z = self.sampler.forward(self.layer, inputs, *args, **kwargs)
    self._captures.add(per_example.Capture(_current_graph(), a, z))
    return outputs

  def compute_mask(self, inputs, mask=None):
    return self.layer.compute_mask(inputs, mask)

  def captures(self, graph):
    """The calls recorded in `graph` (None: eager)."""
    return self._captures.for_graph(graph)

  def mask(self, role) -> Optional[tf.Tensor]:
    """The combined (freeze * select) mask tensor of `role`, or None."""
    parts = [store[role] for store in (self.freeze_masks, self.select_masks)
             if role in store]
    if not parts:
      return None
    out = tf.convert_to_tensor(parts[0])
    for p in parts[1:]:
      out = out * p
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
      return not bool(tf.reduce_any(var != 0).numpy())

  def structure(self):
    return _STRUCTURES[self.mask_structure]

  def compute_output_shape(self, input_shape):
    return self.layer.compute_output_shape(input_shape)

  def get_config(self):
    config = super().get_config()
    config.update(freeze_roles=list(self.freeze_roles),
                  select_roles=list(self.select_roles),
                  mask_structure=self.mask_structure,
                  select_config=(None if self.select_config is None else
                                 self.select_config.to_dict()),
                  importance_units=self.importance_units)
    return config


_STRUCTURES = {"weight": per_example.WEIGHT, "neuron": per_example.OUT,
               "layer": per_example.SCALAR}


def supported_layer_names():
  """Layer classes with a dedicated (fast) sampler."""
  return sorted(cls.__name__ for cls in per_example.supported_layer_classes())


def choose_sampler(layer):
  """The layer's dedicated sampler if it supports the layer's configuration,
  else the generic per-layer sampler; None for layers without weights."""
  sampler = per_example.sampler_for(layer)
  if sampler is not None and sampler.supports(layer) is None:
    return sampler
  if not layer.trainable_weights:
    return None
  return per_example_generic.GENERIC


def report(model):
  """`[(layer name, layer class, sampler)]` of the wrapped layers of `model`
  (nested models included), and of layers with weights left unwrapped
  (sampler "NOT WRAPPED: ...")."""
  out = []
  for layer in model.layers:
    if isinstance(layer, PruneWrapper):
      out.append((layer.layer.name, type(layer.layer).__name__,
                  layer.sampler.name))
    elif isinstance(layer, keras.Model) and _is_graph_model(layer):
      out.extend(report(layer))
    elif layer.trainable_weights:
      out.append((layer.name, type(layer).__name__,
                  "NOT WRAPPED: the optimizer's whole-model jacobian fallback"))
  return out


def _is_graph_model(model) -> bool:
  return (isinstance(model, keras.Sequential) or
          getattr(model, "_is_graph_network", False))


def _wrap_model(model, wrap_fn):
  if not _is_graph_model(model):
    raise ValueError(
        "tdp.prune supports Sequential and functional Keras models; got a "
        f"subclassed {type(model).__name__}. The DP optimizer still works on "
        "it through its (slower) vectorized fallback.")
  validation.validate(model, strict=True)
  return keras.models.clone_model(model, clone_function=wrap_fn)


def wrap(model, make_wrapper=None):
  """Wraps every layer with trainable weights; other layers are reused as is.

  Layers with a dedicated sampler use it; the others get the generic
  per-layer sampler. Nested Sequential / functional models are wrapped
  layer by layer. What was wrapped with which sampler is logged (and given by
  `report(model)`).

  Args:
    model: a built Sequential or functional `tf_keras` model.
    make_wrapper: `layer -> PruneWrapper`, by default an unmasked wrapper.

  Returns:
    A new model over the same layers and variable objects.
  """
  make_wrapper = make_wrapper or PruneWrapper

  def clone(layer):
    if isinstance(layer, PruneWrapper):
      return layer
    if isinstance(layer, keras.Model) and _is_graph_model(layer):
      return _wrap_model(layer, clone)
    if choose_sampler(layer) is None:
      return layer
    return make_wrapper(layer)

  wrapped = _wrap_model(model, clone)
  _log_report(wrapped)
  return wrapped


def _log_report(model):
  rows = report(model)
  if rows:
    logging.info("tdp.prune: %d layers with weights:\n%s", len(rows),
                 "\n".join(f"  {n} ({c}): {s}" for n, c, s in rows))
  slow = [f"{n} ({c})" for n, c, s in rows if s.startswith("generic")]
  if slow:
    logging.warning(
        "tdp.prune: %s use the generic per-layer sampler (a vectorized "
        "per-example VJP of the layer: O(B), but slower than a dedicated "
        "sampler). To speed them up, freeze them (PruneConfig(mode='freeze', "
        "granularity='layer', scope='global', layers='<name regex>') or "
        "layer.trainable = False) or register a dedicated sampler "
        "(tfdpprune.per_example.register_sampler).", ", ".join(slow))
  unwrapped = [f"{n} ({c})" for n, c, s in rows if s.startswith("NOT")]
  if unwrapped:
    logging.warning(
        "tdp.prune: %s could not be wrapped (inside a subclassed model?): "
        "their variables send the whole model to the optimizer's "
        "whole-model jacobian (about B times slower). Build those parts "
        "with the functional API, or freeze them.", ", ".join(unwrapped))


def strip(model):
  """A plain Keras model: wrappers removed, same layers and final weights.

  Masks gate updates, not the forward pass, so predictions are identical;
  the result is ready for `model.save` or SavedModel export. Nested models
  are stripped too.
  """
  def unwrap(layer):
    if isinstance(layer, PruneWrapper):
      return layer.layer
    if isinstance(layer, keras.Model) and _is_graph_model(layer):
      return keras.models.clone_model(layer, clone_function=unwrap)
    return layer
  return keras.models.clone_model(model, clone_function=unwrap)


def wrappers(model):
  """The `PruneWrapper` layers of `model` (and of nested models), in order."""
  out = []
  for layer in model.layers:
    if isinstance(layer, PruneWrapper):
      out.append(layer)
    elif isinstance(layer, keras.Model):
      out.extend(wrappers(layer))
  return out


def prune(model, config=None, *, public_data=None):
  """Prepares `model` for masked DP training; returns the wrapped model.

  Args:
    model: a built Sequential or functional `tf_keras` model.
    config: a `PruneConfig` (freeze or select masks), or a sequence of them
      (e.g. a freeze and a select config: the updated set is their
      intersection); None only wraps the layers for fast per-example
      gradients, with every coordinate trained.
    public_data: public examples for the public-data mask methods
      (public_gradient, public_saliency, dirichlet): `(x, y)` arrays or a
      `tf.data` dataset of `(x, y)`, read once; never the private training
      data. Select-mode public methods keep it in memory to score every
      re-draw; a model loaded from a file gets it back with
      `attach_public_data`.

  Returns:
    A model over the same variable objects, with `PruneWrapper` layers.
  """
  if config is None:
    if public_data is not None:
      raise ValueError("public_data is only used with a PruneConfig whose "
                       "method is public_gradient, public_saliency or "
                       "dirichlet")
    return wrap(model)
  configs = ([config] if isinstance(config, config_lib.PruneConfig)
             else list(config))
  for c in configs:
    if not isinstance(c, config_lib.PruneConfig):
      raise TypeError(f"config must be a PruneConfig, got {type(c).__name__}")
  uses_public = [c for c in configs if c.uses_public_data]
  if public_data is not None and not uses_public:
    raise ValueError("public_data is only used by the public_gradient, "
                     "public_saliency and dirichlet methods")
  if uses_public:
    public_data = public.as_arrays(public_data)  # read once
  if not model.built:
    raise ValueError(
        "tdp.prune(model, config) needs a built model, since masks are chosen "
        "from its weights: start it with keras.Input(shape) or call "
        "model.build(input_shape) first")
  model = wrap(model)
  for c in configs:
    _add_masks(model, c, public_data)
  return model


def attach_public_data(model, public_data):
  """Gives the select-mode public methods of `model` their public data.

  `tdp.prune(..., public_data=...)` does this; a model loaded from a file
  (or restored into a model built without it) needs it before it trains on:
  each re-draw d of `PruneConfig(mode="select", method="public_gradient" |
  "public_saliency")` scores public batch d, which depends only on (seed,
  d, public data), so the same public data give the same re-draws.

  The model's traced train function (if any) is dropped, so that the next
  `fit` or `train_on_batch` traces one that scores these data.

  Args:
    model: a model from `tdp.prune` or `keras.models.load_model`.
    public_data: `(x, y)` arrays or a `tf.data` dataset; never private data.
  """
  owners = {}
  for w in wrappers(model):
    c = w.select_config
    if c is not None and c.method in config_lib.PUBLIC_GRADIENT_METHODS:
      owners.setdefault(c, []).append(w)
  if not owners:
    raise ValueError("attach_public_data: no layer of this model re-draws "
                     "its selection with a public-data method")
  x, y = public.as_arrays(public_data)
  scoring_model = strip(model)  # same variables, nothing recorded
  for c, ws in owners.items():
    key = randomness.derived_key(c.seed, randomness.PUBLIC_BATCHES)
    scorer = public.PublicScorer(scoring_model, public.PublicBatches(
        x, y, c.effective_public_batch_size, key))
    for w in ws:
      object.__setattr__(w, "public_scorer", scorer)
      w.set_select_config(c)  # rebuilds the selector with the scorer
  if getattr(model, "train_function", None) is not None:
    model.train_function = None  # traced with the previous (or no) scorer


def _add_masks(model, c, public_data):
  """Adds the masks of one `PruneConfig` to a wrapped model."""
  entries = masks.eligible(wrappers(model), c)
  if not entries:
    names = [w.layer.name for w in wrappers(model)]
    raise ValueError(f"PruneConfig.layers={c.layers!r} with weights="
                     f"{c.weights!r} selects no variable; supported layers "
                     f"of this model: {names}")
  if c.method == "dirichlet":
    _add_dirichlet_masks(model, c, entries, public_data)
    return
  kind = "freeze" if c.mode == "freeze" else "select"
  for w, role, _ in entries:
    w.add_masks(kind, [role], c.granularity)
  variables = [v for _, _, v in entries]
  if c.mode == "freeze":
    grads = (public.mean_gradients(model, variables, *public_data)
             if c.uses_public_data else None)
    for (w, role, var), m in zip(entries, masks.compute_masks(
        c, variables, public_grads=grads)):
      w.freeze_masks[role].assign(m)
      if c.effective_pruned == "zero":
        var.assign(var * m)
  else:
    for w, _, _ in entries:
      w.set_select_config(c)
    if c.uses_public_data:
      attach_public_data(model, public_data)
    masks.selectors(list({id(w): w for w, _, _ in entries}.values()))
    entries[0][0].selector.redraw(0)


def _add_dirichlet_masks(model, c, entries, public_data):
  """Freeze masks of whole output units ranked by Dirichlet pruning."""
  roles = {}
  for w, role, var in entries:
    roles.setdefault(w, []).append((role, var))
  plain = strip(model)  # the same layers and variables, nothing recorded
  gated = {id(l) for l in dirichlet.gated_layers(plain,
                                                 [w.layer for w in roles])}
  owners = [w for w in roles if id(w.layer) in gated]
  if not owners:
    raise ValueError(
        f"PruneConfig(method='dirichlet', layers={c.layers!r}) selects only "
        "layers producing the model's outputs, which Dirichlet pruning never "
        f"prunes; layers of this model: {[w.layer.name for w in roles]}")
  units = [int(roles[w][0][1].shape[-1]) for w in owners]
  found = dirichlet.importances(
      plain, [w.layer for w in owners], units, public_data,
      c.effective_dirichlet, batch_size=c.effective_public_batch_size,
      seed=c.seed)
  # Posterior means sum to 1 per layer; n * mean (1 = a uniform share)
  # compares units across layers of different widths (scope="global").
  layer_masks = masks.unit_masks(
      c, [n * f for n, f in zip(units, found)],
      [[v for _, v in roles[w]] for w in owners])
  for w, importance, ms in zip(owners, found, layer_masks):
    w.add_masks("freeze", [r for r, _ in roles[w]], "neuron")
    w.set_importance(importance)
    for (role, var), m in zip(roles[w], ms):
      w.freeze_masks[role].assign(m)
      if c.effective_pruned == "zero":
        var.assign(var * m)
