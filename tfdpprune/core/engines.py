"""Per-example norms and clipped sums: the engines every sampler feeds.

A sampler records what a layer saw in the forward pass (its input, or patches
of it, or its normalized input) and its pre-activation output `z`. After one
backward pass of the summed per-example losses the step has
`delta = dL/dz`, whose row `i` depends only on example `i`; from `(a, delta)`
an engine gives, per variable:

* the squared L2 norm of every example's *masked* gradient (shape `[B]`), and
* the clipped sum `sum_i c_i * (g_i * m)` for per-example coefficients `c`.

`linear_engine` chooses per layer the cheaper of materializing per-example
gradients (`einsum`) and "ghost" norms computed without materializing them.
Masked per-weight kernels materialize (a mask does not factor through the
ghost identity) except for dense layers on flat inputs, whose masked norm
factors as `((a*a) @ m) . (delta*delta)`. Output-unit (neuron) masks act on
`delta`, so they keep ghost norms available.

All functions are pure, batched and loop-free over examples.
"""

import contextlib
import dataclasses
import threading
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from tfdpprune.core._tf import tf

# Mask structures, from coarsest to finest. A `MaskSpec` with structure
# `"out"` promises the mask is constant along every axis but the last (an
# output unit / channel mask); `"scalar"` promises a constant mask. A broken
# promise only makes clipping conservative: norms are then taken over a
# superset of the selected coordinates, while updates and noise still use the
# exact mask.
NONE, SCALAR, OUT, WEIGHT = "none", "scalar", "out", "weight"


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The mask of one variable for one step: a full-shape 0/1 tensor or None."""
  value: Optional[tf.Tensor]
  structure: str = WEIGHT

  @property
  def is_full(self):
    return self.value is None

  def out_vector(self):
    """The output-unit mask `[N]` (max over all other axes)."""
    m = self.value
    return tf.reduce_max(tf.reshape(m, [-1, m.shape[-1]]), axis=0)

  def scalar(self):
    return tf.reduce_max(self.value)


@dataclasses.dataclass
class Capture:
  """What one call of a wrapped layer recorded: its inputs and output `z`."""
  graph: object
  inputs: tf.Tensor
  outputs: tf.Tensor
  extra: object = None


# Augmentation multiplicity (De et al. 2022): when every example of the batch
# appears as K consecutive augmented rows, an example's gradient is the sum of
# its rows' gradients (the optimizer scales the loss by 1/K: the average) and
# is clipped as one. The optimizer sets K for the duration of a step's trace;
# the engines below fold the K rows of an example into one before norms.
_GROUPING = threading.local()


@contextlib.contextmanager
def rows_per_example(k: int):
  """Within the block, engines treat each K consecutive rows as one example."""
  previous = getattr(_GROUPING, "k", 1)
  _GROUPING.k = int(k)
  try:
    yield
  finally:
    _GROUPING.k = previous


def group_size() -> int:
  """The rows per example of the step being traced (1: no grouping)."""
  return getattr(_GROUPING, "k", 1)


def group_positions(t):
  """`[B*K, T, ...]` -> `[B, K*T, ...]`: an example's rows as extra positions."""
  k = group_size()
  if k == 1:
    return t
  shape = tf.shape(t)
  return tf.reshape(t, tf.concat([[shape[0] // k, k * shape[1]], shape[2:]],
                                 axis=0))


def group_sum(g):
  """`[B*K, ...]` -> `[B, ...]`: an example's rows' gradients summed."""
  k = group_size()
  if k == 1:
    return g
  shape = tf.shape(g)
  return tf.reduce_sum(tf.reshape(g, tf.concat(
      [[shape[0] // k, k], shape[1:]], axis=0)), axis=1)


# A per-layer result: squared norms `[B]` and `coef [B] -> {role: sum}`.
LayerResult = Tuple[tf.Tensor, Callable[[tf.Tensor], Dict[str, tf.Tensor]]]


def flatten_positions(t):
  """`[B, d1, ..., dk, C]` -> `[B, T, C]` with T = d1*...*dk (T=1 if k=0)."""
  if t.shape.rank == 2:
    return t[:, tf.newaxis, :]
  shape = tf.shape(t)
  return tf.reshape(t, [shape[0], -1, t.shape[-1]])


def _positions(t):
  """Static number of positions T of `[B, ..., C]`, or None if unknown."""
  dims = t.shape[1:-1]
  if any(d is None for d in dims):
    return None
  out = 1
  for d in dims:
    out *= d
  return out


def _apply_out_mask(delta, mask):
  if mask.is_full or mask.structure not in (OUT, SCALAR):
    return delta
  if mask.structure == SCALAR:
    return delta * tf.cast(mask.scalar(), delta.dtype)
  return delta * tf.cast(mask.out_vector(), delta.dtype)


def linear_engine(a, delta, mask, kernel_shape, positions=None,
                  row_order=None):
  """Per-example masked norms and clipped sums of `g_i = sum_t a_it (x) d_it`.

  Args:
    a: `[B, T, K]` layer inputs (or patches).
    delta: `[B, T, N]` gradients of the summed loss w.r.t. the output.
    mask: `MaskSpec` of the kernel (reshaped to `[K, N]` internally).
    kernel_shape: the kernel's shape, `prod(kernel_shape) == K * N`.
    positions: static T (None if unknown).
    row_order: optional `[K]` permutation: feature r of `a` is row
      `row_order[r]` of the kernel reshaped to `[K, N]` (patches extracted in
      a cheaper order); masks and sums are permuted to match.

  Returns:
    `(sq_norms [B], coef -> kernel-shaped sum)`.
  """
  if group_size() > 1:
    a, delta = group_positions(a), group_positions(delta)
    positions = None if positions is None else positions * group_size()
  k, n = a.shape[-1], delta.shape[-1]
  structured = mask.is_full or mask.structure in (OUT, SCALAR)
  delta_m = _apply_out_mask(delta, mask) if structured else delta
  m2 = None if structured else tf.reshape(mask.value, [k, n])
  if row_order is not None:
    if m2 is not None:
      m2 = tf.gather(m2, row_order)
    inverse = np.argsort(row_order)
    to_kernel = lambda s: tf.reshape(tf.gather(s, inverse), kernel_shape)
  else:
    to_kernel = lambda s: tf.reshape(s, kernel_shape)

  if positions == 1:
    a1, d1 = a[:, 0, :], delta_m[:, 0, :]
    if structured:
      sq = (tf.reduce_sum(tf.square(a1), axis=1) *
            tf.reduce_sum(tf.square(d1), axis=1))
    else:
      sq = tf.reduce_sum(tf.matmul(tf.square(a1), m2) * tf.square(d1), axis=1)

    def sum_fn(coef):
      s = tf.matmul(a1, d1 * coef[:, tf.newaxis], transpose_a=True)
      return to_kernel(s if m2 is None else s * m2)
    return sq, sum_fn

  use_ghost = (structured and positions is not None and
               positions * positions * (k + n) < positions * k * n)
  if use_ghost:
    aa = tf.matmul(a, a, transpose_b=True)            # [B, T, T]
    dd = tf.matmul(delta_m, delta_m, transpose_b=True)  # [B, T, T]
    sq = tf.reduce_sum(aa * dd, axis=[1, 2])

    def ghost_sum(coef):
      s = tf.einsum("btk,btn->kn", a, delta_m * coef[:, tf.newaxis, tf.newaxis])
      return to_kernel(s)
    return sq, ghost_sum

  g = tf.einsum("btk,btn->bkn", a, delta_m)           # [B, K, N]
  if m2 is not None:
    g = g * m2
  sq = tf.reduce_sum(tf.square(g), axis=[1, 2])

  def materialized_sum(coef):
    return to_kernel(tf.einsum("bkn,b->kn", g, coef))
  return sq, materialized_sum


def materialized_engine(g, mask):
  """Norms and sums from materialized per-example gradients `g [B, ...]`
  (per-row `[B*K, ...]` under `rows_per_example(K)`)."""
  g = group_sum(g)
  if not mask.is_full:
    g = g * mask.value
  axes = list(range(1, g.shape.rank))
  sq = tf.reduce_sum(tf.square(g), axis=axes) if axes else tf.square(g)

  def sum_fn(coef):
    return tf.tensordot(coef, g, axes=1)
  return sq, sum_fn


def bias_engine(delta, mask):
  """Per-example bias gradients `sum_t delta_it`, materialized `[B, N]`."""
  return materialized_engine(tf.reduce_sum(flatten_positions(delta), axis=1),
                             mask)


def combine(results: Dict[str, LayerResult]) -> LayerResult:
  """One layer's result from its variables' results (norms add up)."""
  sq = tf.add_n([r[0] for r in results.values()])

  def sum_fn(coef):
    return {role: r[1](coef) for role, r in results.items()}
  return sq, sum_fn


def jacobian_per_example(tape, per_example_loss, variables):
  """Per-example gradients `[B, *var.shape]` of any model (pfor-vectorized)."""
  return tape.jacobian(per_example_loss, variables,
                       unconnected_gradients=tf.UnconnectedGradients.ZERO,
                       experimental_use_pfor=True)
