"""One DP gradient from a tape, per-example losses and the recorded layers.

Both front ends call `dp_gradients`: the Keras 2 optimizer from its
`_compute_gradients`, the Keras 3 model from its train step. One step over B
examples (B*K rows under augmentation multiplicity K) with selection masks m:

1. the select masks of the wrappers involved are re-drawn if due;
2. per-example gradients of the selected variables only (variables whose
   mask is all zero are left out), from the wrappers' recorded calls and one
   backward pass (`samplers`, `engines`), or, when some variable has no
   recorded calls, from a per-example fallback over the whole model;
3. masked before the norm, clipped jointly to C, summed, noised once and
   divided by the expected batch size (`mechanism.Mechanism`).

A variable used by several wrappers (tied) gets the per-example gradient of
all its uses, summed before its norm.
"""

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tfdpprune.core import engines
from tfdpprune.core import masks as masks_lib
from tfdpprune.core import mechanism as mechanism_lib
from tfdpprune.core import recording
from tfdpprune.core import variables as variables_lib
from tfdpprune.core._tf import tf
from tfdpprune.core.samplers import generic

_Spec = engines.MaskSpec

# (mask spec or None when fully selected, statically excluded) per variable.
Specs = Dict[object, Tuple[Optional[engines.MaskSpec], bool]]


def wrapper_mask_spec(var) -> Tuple[Optional[engines.MaskSpec], bool]:
  """`(spec, excluded)` of `var` from the masks of the wrappers owning it
  (the product of their freeze and select masks)."""
  parts, structures, excluded = [], [], False
  for owner in recording.owners_of(var):
    role = owner.role_of(var)
    if role is None:
      continue
    excluded |= owner.statically_frozen(role)
    mask = owner.mask(role)
    if mask is not None:
      parts.append(tf.cast(mask, variables_lib.dtype(var)))
      structures.append(owner.structure())
  return combine_specs(parts, structures, excluded)


def combine_specs(parts, structures, excluded):
  """One spec from several 0/1 masks of a variable (their product, with the
  finest structure)."""
  if not parts:
    return None, excluded
  value = parts[0]
  for p in parts[1:]:
    value = value * p
  order = [engines.SCALAR, engines.OUT, engines.WEIGHT]
  return _Spec(value, max(structures, key=order.index)), excluded


def redraw_selections(var_list, step) -> None:
  """Re-draws the select masks of the wrappers of `var_list` when due."""
  owners, seen = [], set()
  for var in var_list:
    for owner in recording.owners_of(var):
      if id(owner) not in seen:
        seen.add(id(owner))
        owners.append(owner)
  for selector in masks_lib.selectors(owners):
    selector.update(step)


def example_losses(loss_rows, k: int) -> tf.Tensor:
  """`[B]` per-example losses from `[B*K]` rows (the mean of each example's
  K augmented rows), checking the rows come in groups of K: statically when
  the batch size is known, else at run time (where XLA would drop an
  assert, the reshape itself fails on a batch that is not a multiple of K).
  """
  if k == 1:
    return loss_rows
  message = (f"augmentation_multiplicity={k}: the batch must hold {k} "
             "consecutive rows per example")
  rows = loss_rows.shape[0]
  if rows is not None:
    if rows % k:
      raise ValueError(f"{message}; it has {rows} rows")
    return tf.reduce_mean(tf.reshape(loss_rows, [rows // k, k]), axis=1)
  check = tf.debugging.assert_equal(tf.shape(loss_rows)[0] % k, 0,
                                    message=message)
  with tf.control_dependencies([check]):
    return tf.reduce_mean(tf.reshape(loss_rows, [-1, k]), axis=1)


def clipped_sums(tape: tf.GradientTape, loss_rows: tf.Tensor,
                 var_list: Sequence[object], specs: Specs,
                 mechanism: mechanism_lib.Mechanism, *,
                 augmentation_multiplicity: int = 1,
                 valid: Optional[tf.Tensor] = None,
                 loss_scale: float = 1.0,
                 clip_fraction: Optional[tf.Variable] = None,
                 fallback: Optional[Callable] = None,
                 on_fallback: Optional[Callable[[str], None]] = None
                 ) -> Tuple[Dict[object, tf.Tensor], tf.Tensor]:
  """`({var key: sum_i c_i (g_i * m)}, examples)`: the clipped sums of one
  batch (or one physical chunk of a logical batch), before noise.

  Args:
    tape: the tape that recorded the forward pass and `loss_rows`.
    loss_rows: `[B*K]` per-row losses (computed under `tape`).
    var_list: the variables to privatize.
    specs: `{variables.key(var): (spec, excluded)}` for every variable.
    mechanism: the clip (and the rest of the mechanism).
    augmentation_multiplicity: K rows per example.
    valid: optional `[B]` booleans: padding rows (False) get coefficient 0
      and count as no example.
    loss_scale: S > 0 (mixed precision): the backward pass runs on S times
      the loss (float16 gradients underflow less), and the output gradients
      are divided by S in float32 before any norm.
    clip_fraction: optional variable given the fraction of examples clipped
      (a diagnostic of raw private gradients, outside the guarantee).
    fallback: `(tape, loss_rows, variables) -> [per-row gradients]` when the
      wrappers cannot give per-example gradients (default: the whole-model
      vectorized jacobian).
    on_fallback: called with the reason when the fallback is used.

  Norms, coefficients and sums are float32, whatever the compute dtype, so
  chunks accumulate exactly as one batch would.
  """
  k = augmentation_multiplicity
  with tape:
    loss_rows = tf.cast(loss_rows, tf.float32)
    # K augmented rows per example: the example's loss is their mean.
    loss_sum = tf.reduce_sum(loss_rows) * (loss_scale / k)
  loss = example_losses(loss_rows, k)
  selected = [v for v in var_list
              if not specs[variables_lib.key(v)][1]]
  with engines.rows_per_example(k):
    plan, why = _fast_plan(selected, loss_rows)
    if plan is not None:
      sq_norms, sums_of = _fast_norms(plan, specs, tape, loss_sum, loss,
                                      loss_rows, loss_scale)
    else:
      if on_fallback is not None:
        on_fallback(why)
      sq_norms, sums_of = _fallback_norms(selected, specs, tape, loss,
                                          loss_rows, fallback)
    sq_norms = tf.cast(sq_norms, tf.float32)
    coef, finite = mechanism.coefficients(sq_norms, loss)
    if valid is None:
      examples = tf.shape(loss)[0]
    else:
      valid = tf.cast(valid, tf.bool)
      coef = tf.where(valid, coef, tf.zeros_like(coef))
      finite = finite | ~valid  # padding is zero, never non-finite
      examples = tf.reduce_sum(tf.cast(valid, tf.int32))
    if clip_fraction is not None:
      clip = tf.constant(mechanism.l2_norm_clip, sq_norms.dtype)
      clipped = (sq_norms > clip * clip) & (
          tf.constant(True) if valid is None else valid)
      clip_fraction.assign(tf.math.divide_no_nan(
          tf.reduce_sum(tf.cast(clipped, tf.float32)),
          tf.cast(examples, tf.float32)))
    sums = sums_of(coef, finite)
  return {key: tf.cast(total, tf.float32) for key, total in sums.items()}, (
      examples)


def dp_gradients(tape: tf.GradientTape, loss_rows: tf.Tensor,
                 var_list: Sequence[object], specs: Specs,
                 mechanism: mechanism_lib.Mechanism, *, noise_key, step,
                 **kwargs) -> List[tf.Tensor]:
  """The released (clipped, summed, noised, averaged) gradient of each
  variable of `var_list` (zeros for excluded ones): `clipped_sums` (its
  keyword arguments) then `mechanism.privatize`, noise keyed by `noise_key`
  and `step`."""
  sums, examples = clipped_sums(tape, loss_rows, var_list, specs, mechanism,
                                **kwargs)
  return privatize(sums, examples, var_list, specs, mechanism,
                   noise_key=noise_key, step=step)


def privatize(sums, examples, var_list, specs, mechanism, *, noise_key,
              step) -> List[tf.Tensor]:
  """`mechanism.privatize` of `{var key: clipped sum}` (one logical step:
  noise once, divided by the expected batch size)."""
  keys = [variables_lib.key(v) for v in var_list]
  return mechanism.privatize(
      [sums.get(key) for key in keys], var_list,
      [None if specs[key][0] is None else specs[key][0].value
       for key in keys],
      [specs[key][1] for key in keys], noise_key=noise_key, step=step,
      batch_size=examples, replica=mechanism_lib.replica_context())


@dataclasses.dataclass
class _Plan:
  """Which recorded calls give the step's per-example gradients.

  `owners[j]` recorded `captures[j]`; `variables[j]` are the variables only
  it uses; `tied` lists `(var, [owner indices])` of variables several owners
  use.
  """
  owners: list = dataclasses.field(default_factory=list)
  captures: list = dataclasses.field(default_factory=list)
  variables: list = dataclasses.field(default_factory=list)
  tied: list = dataclasses.field(default_factory=list)

  def index(self, owner, graph) -> Optional[int]:
    """The owner's index (its captures taken on first use), or None if it
    lost eager calls."""
    for j, o in enumerate(self.owners):
      if o is owner:
        return j
    captures = owner.take_captures(graph)
    if captures is None:
      return None
    self.owners.append(owner)
    self.captures.append(captures)
    self.variables.append([])
    return len(self.owners) - 1


def _fast_plan(selected, loss) -> Tuple[Optional[_Plan], Optional[str]]:
  """The plan if every selected variable has live per-example captures,
  else `(None, why)`."""
  graph = recording.current_graph()
  plan = _Plan()
  for var in selected:
    owners = recording.owners_of(var)
    name = variables_lib.name(var)
    if not owners:
      return None, (f"variable {name} is not in a layer prepared by "
                    "tdp.prune (call model = tdp.prune(model) before "
                    "compile; a subclassed model cannot be prepared)")
    if recording.is_foreign(var):
      return None, (f"variable {name} is also used by a layer without a "
                    "wrapper (inside a subclassed model?)")
    uses = []
    for owner in owners:
      if owner.role_of(var) is None:
        return None, f"variable {name} has no role in its layer"
      j = plan.index(owner, graph)
      if j is None:
        return None, (f"layer {owner.layer.name!r} was called more than "
                      f"{recording.EAGER_LIMIT} times eagerly before the "
                      "step")
      if not plan.captures[j]:
        return None, (f"layer {owner.layer.name!r} was not called in this "
                      "step's graph")
      for capture in plan.captures[j]:
        why = _not_per_example(capture, loss)
        if why:
          return None, f"layer {owner.layer.name!r} {why}"
      if len(owners) > 1 and not isinstance(owner.sampler,
                                            generic.GenericSampler):
        return None, (f"variable {name} is tied (used by "
                      f"{[o.layer.name for o in owners]}), but layer "
                      f"{owner.layer.name!r} does not record its calls for "
                      "the generic sampler")
      uses.append(j)
    if len(uses) == 1:
      plan.variables[uses[0]].append(var)
    else:
      plan.tied.append((var, uses))
  return plan, None


def _fast_norms(plan: _Plan, specs, tape, loss_sum, loss, loss_rows,
                loss_scale=1.0):
  """Per-layer norms from captured activations and one backward pass.

  Returns `(sq_norms [B], sums_of)`, `sums_of(coef, finite)` giving the
  clipped sums `{var key: sum}`.
  """
  zs = [c.outputs for captures in plan.captures for c in captures]
  deltas = tape.gradient(loss_sum, zs) if zs else []
  # float32 output gradients, the loss scale undone: every norm and sum
  # below is float32 (the samplers cast activations to the variables'
  # float32 dtype).
  deltas = [None if d is None else tf.nest.map_structure(
      lambda t: tf.cast(t, tf.float32) / loss_scale, d) for d in deltas]
  pairs_of, i = [], 0
  for captures in plan.captures:
    pairs = []
    for capture in captures:
      if deltas[i] is not None:
        pairs.append((capture, deltas[i]))
      i += 1
    pairs_of.append(pairs)
  layers = []
  for owner, variables, pairs in zip(plan.owners, plan.variables, pairs_of):
    if pairs and variables:
      masks = {}
      for var in variables:
        spec = specs[variables_lib.key(var)][0]
        masks[owner.role_of(var)] = spec if spec is not None else _Spec(None)
      layers.append((owner, {owner.role_of(v): v for v in variables},
                     pairs, masks))
  tied = [(var, [(plan.owners[j], pairs_of[j]) for j in uses
                 if pairs_of[j]]) for var, uses in plan.tied]

  def sanitized(pairs, keep):
    if keep is None:
      return pairs
    rows = tf.repeat(keep, engines.group_size())
    return [(dataclasses.replace(c, inputs=_zero_rows(c.inputs, rows)),
             _zero_rows(d, rows)) for c, d in pairs]

  def per_layer(keep):
    """Norms and sum functions; with `keep`, over sanitized captures."""
    sq_norms, role_sums = tf.zeros_like(loss), []
    for owner, roles, pairs, masks in layers:
      sq, role_sum = owner.sampler.per_example(
          owner.layer, sanitized(pairs, keep), masks)
      sq_norms = sq_norms + tf.cast(sq, sq_norms.dtype)
      role_sums.append((roles, role_sum))
    for var, uses in tied:
      if not uses:
        continue
      grads = [generic.GENERIC.example_grads(o.layer, sanitized(p, keep),
                                             [var])[0] for o, p in uses]
      spec = specs[variables_lib.key(var)][0]
      sq, fn = engines.materialized_engine(
          tf.add_n(grads), spec if spec is not None else _Spec(None))
      sq_norms = sq_norms + tf.cast(sq, sq_norms.dtype)
      role_sums.append(({"tied": var}, lambda coef, fn=fn: {"tied": fn(coef)}))

    def sums(coef):
      out = {}
      for roles, role_sum in role_sums:
        out.update({variables_lib.key(roles[r]): s
                    for r, s in role_sum(coef).items()})
      return out
    return sq_norms, sums

  sq_norms, raw_sums = per_layer(None)
  # Dynamic shapes: each layer's output gradient must have one row per
  # example (a broadcast layer output would mix them). Checked at run time,
  # and, since XLA drops asserts, also by making every norm NaN when it
  # fails: every example then gets coefficient 0 and the step releases only
  # noise, never a wrong sum.
  dynamic = [(owner, d) for owner, pairs in zip(plan.owners, pairs_of)
             for _, delta in pairs for d in tf.nest.flatten(delta)
             if d is not None and
             (d.shape[0] is None or loss_rows.shape[0] is None)]
  if dynamic:
    same = [tf.equal(tf.shape(d)[0], tf.shape(loss_rows)[0])
            for _, d in dynamic]
    checks = [tf.debugging.Assert(ok, [
        f"layer {owner.layer.name!r}: output rows are not the batch's "
        "examples; feed it batch-major inputs"])
              for ok, (owner, _) in zip(same, dynamic)]
    with tf.control_dependencies(checks):
      sq_norms = tf.where(tf.reduce_all(same), sq_norms,
                          tf.fill(tf.shape(sq_norms),
                                  tf.constant(float("nan"), sq_norms.dtype)))
  return sq_norms, _guarded(raw_sums, lambda keep: per_layer(keep)[1])


def _fallback_norms(selected, specs, tape, loss, loss_rows, fallback=None):
  """Per-example gradients of the whole model (default: pfor jacobian)."""
  if not selected:
    return tf.zeros_like(loss), lambda coef, finite: {}
  k = engines.group_size()
  if k > 1:
    with tape:  # recorded, so the jacobian flows through the 1/k
      loss_rows = loss_rows / k
  jacobians = (fallback or engines.jacobian_per_example)(tape, loss_rows,
                                                         selected)

  def per_variable(keep):
    sq_norms, fns = tf.zeros_like(loss), []
    for var, g in zip(selected, jacobians):
      spec = specs[variables_lib.key(var)][0]
      sq, fn = engines.materialized_engine(
          g if keep is None else _zero_rows(g, tf.repeat(keep, k)),
          spec if spec is not None else _Spec(None))
      sq_norms += tf.cast(sq, sq_norms.dtype)
      fns.append((var, fn))
    return sq_norms, lambda coef: {variables_lib.key(v): fn(coef)
                                   for v, fn in fns}

  sq_norms, raw_sums = per_variable(None)
  return sq_norms, _guarded(raw_sums, lambda keep: per_variable(keep)[1])


def _not_per_example(capture, loss) -> Optional[str]:
  """Why a capture's rows are not the batch's examples, or None.

  A layer applied to a batch-independent input (e.g. position embeddings of
  `tf.range(T)` broadcast over the batch later) has outputs with a leading
  dimension of 1: its output gradient sums all examples, so per-example
  gradients cannot come from it.
  """
  batch = loss.shape[0]
  for t in tf.nest.flatten(capture.outputs):
    lead = t.shape[0] if t.shape.rank else None
    if not t.shape.rank or (lead is not None and batch is not None and
                            lead != batch) or (lead == 1 and batch is None):
      return (f"runs on a batch-independent input (output shape {t.shape}, "
              f"batch {batch}): its output is broadcast over the examples, "
              "so its per-example gradients need the whole-model jacobian. "
              "Fix: feed it batch-major inputs, e.g. position ids "
              "tf.broadcast_to(tf.range(T), tf.shape(tokens)), or freeze it")
  return None


def _guarded(raw_sums, sanitized_sums):
  """`sums_of(coef, finite)`: the raw sums when every example is finite (no
  extra work per step), else sums over inputs with bad examples zeroed."""
  def sums_of(coef, finite):
    raw = raw_sums(coef)
    if not raw:
      return raw
    refs = list(raw)

    def sanitized():
      sums = sanitized_sums(finite)(coef)
      return [sums[r] for r in refs]
    values = tf.cond(tf.reduce_all(finite), lambda: [raw[r] for r in refs],
                     sanitized)
    return dict(zip(refs, values))
  return sums_of


def _zero_rows(structure, keep):
  """`structure` (a tensor or nested tensors) with the examples where `keep`
  is False set to 0 (float tensors of rank >= 1 only)."""
  def zero(t):
    if not (isinstance(t, tf.Tensor) and t.dtype.is_floating and
            t.shape.rank):
      return t
    k = tf.reshape(keep, [-1] + [1] * (t.shape.rank - 1))
    return tf.where(k, t, tf.zeros_like(t))
  return tf.nest.map_structure(zero, structure)
