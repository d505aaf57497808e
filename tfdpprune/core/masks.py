"""Mask strategies: which coordinates DP-SGD updates (pure TF functions).

A mask is 1 where a coordinate is updated and 0 where it is not. Masks are
computed from public inputs only: the seed (and the step, for re-draws), the
current weights (already released), gradients on `public_data` or unit
importances learned on it (`dirichlet.py`). Random scores come from a stream
derived from the seed for masks alone (`randomness.derived_key(seed,
"masks")`), unrelated to the secret keys of DP noise and Poisson sampling.

The same functions run eagerly (freeze mode, once, in `prune`) and in graph
(select mode, every k optimizer steps, inside the training step), so a
resumed run re-draws exactly what an uninterrupted one does. Select-mode
public methods score re-draw d on public batch d (`public.PublicBatches`),
also a function of the seed and d only.
"""

import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

from tfdpprune.core import randomness
from tfdpprune.core import variables as variables_lib
from tfdpprune.core._tf import tf
from tfdpprune.config import PUBLIC_GRADIENT_METHODS
from tfdpprune.config import PruneConfig

# Roles eligible by default (`weights="kernel"`); biases and normalization
# parameters stay fully trained unless `weights="all"`.
KERNEL_ROLES = ("kernel", "recurrent_kernel", "depthwise_kernel",
                "pointwise_kernel", "embeddings")


def is_kernel_role(role: str) -> bool:
  """Kernel-like roles, also nested ones ("forward_lstm/lstm_cell/kernel")."""
  return role.split("/")[-1] in KERNEL_ROLES

# A masked layer is anything with the `PruneWrapper` protocol: `layer`,
# `name`, `roles()` (trainable variables by role), `mask(role)`,
# `select_masks`, `select_roles`, `select_config`, `selector`,
# `public_scorer` (select-mode public methods: a `public.PublicScorer`) and
# `importance` (a variable of unit importances, or None). Mask math knows the
# protocol, not the wrapper class (pruning.py builds on masks.py).
Entry = Tuple[object, str, tf.Variable]


def masked_layers(model) -> list:
  """The layers of `model` (and of nested models) that carry masks
  (`PruneWrapper`s), in order."""
  out = []
  for layer in model.layers:
    if (callable(getattr(layer, "roles", None)) and
        callable(getattr(layer, "mask", None))):
      out.append(layer)
    elif hasattr(layer, "layers"):  # a nested model
      out.extend(masked_layers(layer))
  return out


def eligible(wrappers: Sequence[object],
             config: PruneConfig) -> List[Entry]:
  """`(wrapper, role, variable)` of the variables `config` may mask."""
  out = []
  for w in wrappers:
    if config.layers is not None and not (
        re.search(config.layers, w.layer.name) or
        re.search(config.layers, w.name)):
      continue
    for role, var in w.roles().items():
      if config.weights == "kernel" and not is_kernel_role(role):
        continue
      out.append((w, role, var))
  return out


# -- unit layout ------------------------------------------------------------


def _units(shape, granularity) -> Tuple[int, int]:
  """(number of units, coordinates per unit) of a variable."""
  size = int(shape.num_elements())
  if granularity == "weight":
    return size, 1
  if granularity == "neuron":
    n = int(shape[-1]) if shape.rank else 1
    return n, size // n
  return 1, size


def _unit_scores(score, granularity):
  """Coordinate scores -> unit scores (mean over the unit)."""
  if granularity == "weight":
    return tf.reshape(score, [-1])
  if granularity == "neuron":
    n = score.shape[-1] if score.shape.rank else 1
    return tf.reduce_mean(tf.reshape(score, [-1, n]), axis=0)
  return tf.reshape(tf.reduce_mean(score), [1])


def _expand(keep, shape, granularity):
  """Unit keep-mask -> full-shape 0/1 mask."""
  if granularity == "weight":
    return tf.reshape(keep, shape)
  if granularity == "neuron":
    n = shape[-1] if shape.rank else 1
    return tf.reshape(tf.broadcast_to(keep[tf.newaxis, :],
                                      [shape.num_elements() // n, n]), shape)
  return tf.fill(shape, keep[0])


def keep_units(scores, sizes, sparsity):
  """1.0 for kept units: the lowest-scoring units are pruned until the pruned
  coordinates come closest to `sparsity` of all (exact for equal sizes)."""
  scores = tf.convert_to_tensor(scores, tf.float32)
  sizes = tf.cast(sizes, tf.float32)
  order = tf.argsort(scores, stable=True)
  cum = tf.concat([[0.0], tf.cumsum(tf.gather(sizes, order))], axis=0)
  target = tf.cast(sparsity, tf.float32) * tf.reduce_sum(sizes)
  k = tf.argmin(tf.abs(cum - target), output_type=tf.int32)
  pruned = order[:k]
  return tf.tensor_scatter_nd_update(
      tf.ones_like(scores), pruned[:, tf.newaxis],
      tf.zeros(tf.shape(pruned), tf.float32))


# -- scores -----------------------------------------------------------------


def coordinate_scores(config: PruneConfig, variables, public_grads=None):
  """Per-coordinate scores (non-random methods)."""
  if config.method == "magnitude":
    return [tf.abs(v) for v in variables]
  if config.method == "public_gradient":
    return [tf.abs(g) for g in public_grads]
  if config.method == "public_saliency":
    return [tf.abs(v * g) for v, g in zip(variables, public_grads)]
  raise ValueError(f"no coordinate scores for method {config.method!r}")


def compute_masks(config: PruneConfig, variables, *, draw=0, sparsity=None,
                  public_grads=None):
  """Full-shape float masks of `variables` under `config` (coordinate-scored
  methods: random, magnitude, public_gradient, public_saliency).

  Args:
    config: the `PruneConfig`.
    variables: the eligible variables, in a fixed order.
    draw: the re-draw index (step // k in select mode); with `seed` it keys
      the random scores, so a resumed run draws the same masks.
    sparsity: overrides `config.sparsity` (a scalar tensor in select mode).
    public_grads: gradients on public data (public methods; in select mode
      on the public batch of this re-draw).
  """
  sparsity = config.sparsity if sparsity is None else sparsity
  layouts = [_units(v.shape, config.granularity) for v in variables]
  counts = [u for u, _ in layouts]
  if config.method == "random":
    # A public stream of its own: derived from the seed for masks only, so
    # a released mask reveals nothing about DP noise or Poisson sampling.
    seed = randomness.step_seed(
        randomness.derived_key(config.seed, randomness.MASKS), draw)
    flat = tf.random.stateless_uniform([sum(counts)], seed=seed)
    unit_scores = tf.split(flat, counts) if len(counts) > 1 else [flat]
  else:
    unit_scores = [_unit_scores(s, config.granularity)
                   for s in coordinate_scores(config, variables, public_grads)]
  sizes = [tf.fill([u], float(size)) for u, size in layouts]
  if config.scope == "global":
    keep = keep_units(tf.concat(unit_scores, 0), tf.concat(sizes, 0),
                      sparsity)
    keeps = tf.split(keep, counts) if len(counts) > 1 else [keep]
  else:
    keeps = [keep_units(s, z, sparsity) for s, z in zip(unit_scores, sizes)]
  return [tf.cast(_expand(k, v.shape, config.granularity), v.dtype)
          for k, v in zip(keeps, variables)]


def unit_masks(config: PruneConfig, unit_scores, layer_variables):
  """Masks from scores of output units shared by several variables.

  For `granularity="neuron"` methods that score a layer's output units
  directly (Dirichlet pruning): unit j of a layer is the slice `[..., j]` of
  each of its variables, kept or pruned as a whole.

  Args:
    config: the `PruneConfig` (scope, sparsity).
    unit_scores: per layer, a `[n]` score of its output units (higher =
      kept). Under scope="global" scores are compared across layers.
    layer_variables: per layer, its eligible variables, each `[..., n]`.

  Returns:
    Per layer, the full-shape float masks of its variables.
  """
  scores = [tf.convert_to_tensor(s, tf.float32) for s in unit_scores]
  for s, variables in zip(scores, layer_variables):
    for v in variables:
      if (v.shape[-1] if v.shape.rank else 1) != s.shape[0]:
        raise ValueError(f"variable {v.name} of shape {v.shape} does not "
                         f"have {s.shape[0]} units on its last axis")
  sizes = [tf.fill(tf.shape(s), float(sum(
      v.shape.num_elements() // s.shape[0] for v in variables)))
           for s, variables in zip(scores, layer_variables)]
  counts = [int(s.shape[0]) for s in scores]
  if config.scope == "global":
    keep = keep_units(tf.concat(scores, 0), tf.concat(sizes, 0),
                      config.sparsity)
    keeps = tf.split(keep, counts) if len(counts) > 1 else [keep]
  else:
    keeps = [keep_units(s, z, config.sparsity) for s, z in zip(scores, sizes)]
  return [[tf.cast(_expand(k, v.shape, "neuron"), v.dtype) for v in variables]
          for k, variables in zip(keeps, layer_variables)]


# -- selection (select mode) --------------------------------------------------


def _assign(var, value):
  """Assigns a mask variable of either Keras (through its `tf.Variable`)."""
  return variables_lib.underlying(var).assign(value, read_value=False)


class Selector:
  """Re-draws the select masks of some wrappers every k optimizer steps.

  Public methods score re-draw d = step // k on public batch d, with
  `scorer` (a `public.PublicScorer`).
  """

  def __init__(self, config: PruneConfig, entries: Sequence[Entry],
               scorer=None):
    if config.method in PUBLIC_GRADIENT_METHODS and scorer is None:
      raise ValueError("a select-mode public method needs a public scorer")
    self.config = config
    self.entries = list(entries)
    self.scorer = scorer

  def sparsity_at(self, step):
    sparsity = tf.constant(self.config.sparsity, tf.float32)
    for start, value in self.config.sparsity_schedule or ():
      sparsity = tf.where(tf.cast(step, tf.int64) >= start,
                          tf.constant(value, tf.float32), sparsity)
    return sparsity

  def _draw(self, step):
    k = self.config.effective_every_k_steps
    variables = [v for _, _, v in self.entries]
    grads = (None if self.scorer is None else
             self.scorer.gradients(variables, step // k))
    return compute_masks(self.config, variables, draw=step // k,
                         sparsity=self.sparsity_at(step), public_grads=grads)

  def _mask_variables(self):
    return [w.select_masks[role] for w, role, _ in self.entries]

  def redraw(self, step):
    step = tf.cast(step, tf.int64)
    return tf.group(*[_assign(v, m) for v, m in zip(
        self._mask_variables(), self._draw(step))])

  def update(self, step):
    """In graph: re-draw when `step % k == 0`.

    Under a tf.distribute strategy the masks are mirrored variables, whose
    assignment synchronizes replicas and may not sit inside a `tf.cond`: the
    new or current values are chosen in the cond and assigned after it (every
    replica draws the same masks from public inputs).
    """
    k = self.config.effective_every_k_steps
    step = tf.cast(step, tf.int64)
    redraw = tf.equal(step % k, 0)
    if not tf.distribute.has_strategy():
      return tf.cond(redraw, lambda: self.redraw(step), tf.no_op)
    variables = self._mask_variables()
    values = tf.cond(redraw, lambda: self._draw(step),
                     lambda: [tf.identity(v) for v in variables])
    return tf.group(*[_assign(v, m)
                      for v, m in zip(variables, values)])


def selectors(owners: Sequence[object]) -> List[Selector]:
  """The selectors of `owners` (built on first use, also after loading)."""
  groups: Dict[PruneConfig, list] = {}
  for w in owners:
    if w.select_config is not None and w.selector is None:
      groups.setdefault(w.select_config, []).append(w)
  for config, ws in groups.items():
    entries = [(w, role, w.roles()[role]) for w in ws
               for role in w.select_roles]
    scorer = None
    if config.method in PUBLIC_GRADIENT_METHODS:
      scorer = ws[0].public_scorer
      if scorer is None:
        raise ValueError(
            f"layer {ws[0].layer.name!r} re-draws its selection with "
            f"method={config.method!r}, which scores public data, but the "
            "model has none (a model loaded from a file does not carry its "
            "public data): call tdp.attach_public_data(model, "
            "(x_public, y_public)) before training it")
    selector = Selector(config, entries, scorer)
    for w in ws:
      object.__setattr__(w, "selector", selector)
  out, seen = [], set()
  for w in owners:
    if w.selector is not None and id(w.selector) not in seen:
      seen.add(id(w.selector))
      out.append(w.selector)
  return out


def density(model) -> Dict[str, float]:
  """Fraction of coordinates updated now, per layer and `"overall"`."""
  out, updated, total = {}, 0.0, 0
  covered = set()
  for w in masked_layers(model):
    layer_updated, layer_total = 0.0, 0
    for role, var in w.roles().items():
      covered.add(variables_lib.key(var))
      n = int(var.shape.num_elements())
      m = w.mask(role)
      layer_updated += n if m is None else float(tf.reduce_sum(m))
      layer_total += n
    if layer_total:
      out[w.layer.name] = layer_updated / layer_total
      updated += layer_updated
      total += layer_total
  for var in model.trainable_variables:
    if variables_lib.key(var) not in covered:
      updated += int(var.shape.num_elements())
      total += int(var.shape.num_elements())
  out["overall"] = updated / total if total else 1.0
  return out


def importances(model) -> Dict[str, np.ndarray]:
  """Learned unit importances (Dirichlet pruning), by layer name.

  Example:
    >>> pm = tdp.prune(model, tdp.PruneConfig(method="dirichlet",
    ...                                       sparsity=0.5),
    ...                public_data=(x_public, y_public))
    >>> tdp.masks.importances(pm)["dense1"]    # posterior means, sum to 1
  """
  return {w.layer.name: w.importance.numpy() for w in masked_layers(model)
          if getattr(w, "importance", None) is not None}
