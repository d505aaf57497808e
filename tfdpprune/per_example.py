"""Per-example gradients and norms over selected variables.

Each supported Keras layer type has a *sampler* (registered by layer class, as
in Opacus): during the forward pass it records what the layer saw (its input,
or patches of it, or its normalized input) and its pre-activation output `z`.
After one backward pass of the summed per-example losses the optimizer has
`delta = dL/dz`, whose row `i` depends only on example `i`; from `(a, delta)`
the sampler gives, per layer:

* the squared L2 norm of every example's *masked* gradient (shape `[B]`), and
* the clipped sum `sum_i c_i * (g_i * m)` for per-example coefficients `c`.

It chooses per layer the cheaper of materializing per-example gradients
(`einsum`) and "ghost" norms computed without materializing them. Masked
per-weight kernels materialize (a mask does not factor through the ghost
identity) except for dense layers on flat inputs, whose masked norm factors as
`((a*a) @ m) . (delta*delta)`. Output-unit (neuron) masks act on `delta`, so
they keep ghost norms available.

All functions are pure, batched and loop-free over examples.
"""

import contextlib
import dataclasses
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfdpprune._compat import keras
from tfdpprune._compat import tf

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


# ---------------------------------------------------------------------------
# Samplers by layer type.
# ---------------------------------------------------------------------------


class Sampler:
  """Forward capture and per-example gradients of one Keras layer type."""

  def roles(self, layer) -> Dict[str, tf.Variable]:
    """The layer's trainable variables by role ("kernel", "bias", ...)."""
    raise NotImplementedError

  def supports(self, layer) -> Optional[str]:
    """None if the fast path supports this layer config, else the reason."""
    del layer
    return None

  name = "dedicated"

  def forward(self, layer, inputs, *args, **kwargs):
    """Returns `(outputs, a, z)`: layer output, recorded input, pre-act out.

    `a` and `z` may be nested structures; `z` must be connected to the
    layer's output, and the optimizer hands `dL/dz` back to `per_example`.
    """
    raise NotImplementedError

  def per_example(self, layer, captures: Sequence[Tuple[Capture, tf.Tensor]],
                  masks: Dict[str, MaskSpec]) -> LayerResult:
    raise NotImplementedError


def without_activation(layer, inputs, *args, **kwargs):
  """Calls `layer` with its activation replaced by the identity."""
  activation = layer.activation
  object.__setattr__(layer, "activation", keras.activations.linear)
  try:
    z = layer.call(inputs, *args, **kwargs)
  finally:
    object.__setattr__(layer, "activation", activation)
  return activation(z), z


class _KernelBiasSampler(Sampler):
  """Dense-like layers: kernel per-example grads from `(a, delta)`."""

  def roles(self, layer):
    out = {"kernel": layer.kernel}
    if getattr(layer, "use_bias", False) and layer.bias is not None:
      out["bias"] = layer.bias
    return out

  def forward(self, layer, inputs, *args, **kwargs):
    outputs, z = without_activation(layer, inputs, *args, **kwargs)
    return outputs, inputs, z

  def _a(self, layer, inputs):
    """`[B, T, K]` activations seen by the kernel."""
    raise NotImplementedError

  def _kernel_result(self, layer, captures, mask) -> LayerResult:
    """Norms and sums of the kernel (patches or inputs times deltas)."""
    if len(captures) == 1:
      capture, delta = captures[0]
      a, order = self._a(layer, capture.inputs)
      d = flatten_positions(delta)
      positions = _positions(delta) if delta.shape.rank > 2 else 1
    else:  # a shared layer: concatenate calls along positions, materialize.
      parts = [self._a(layer, c.inputs) for c, _ in captures]
      a = tf.concat([p for p, _ in parts], axis=1)
      order = parts[0][1]
      d = tf.concat([flatten_positions(dl) for _, dl in captures], axis=1)
      positions = None
    return linear_engine(a, d, mask, layer.kernel.shape, positions, order)

  def per_example(self, layer, captures, masks):
    d = tf.concat([flatten_positions(dl) for _, dl in captures], axis=1)
    results = {}
    if "kernel" in masks:
      results["kernel"] = self._kernel_result(layer, captures,
                                              masks["kernel"])
    if "bias" in masks:
      results["bias"] = materialized_engine(
          tf.reduce_sum(d, axis=1), masks["bias"])
    return combine(results)


def combine(results: Dict[str, LayerResult]) -> LayerResult:
  """One layer's result from its variables' results (norms add up)."""
  sq = tf.add_n([r[0] for r in results.values()])

  def sum_fn(coef):
    return {role: r[1](coef) for role, r in results.items()}
  return sq, sum_fn


def conv_support(layer) -> Optional[str]:
  """Why the fast path cannot take this convolution, or None."""
  if layer.data_format != "channels_last":
    return "data_format channels_first"
  if getattr(layer, "groups", 1) != 1:
    return "grouped convolution"
  return None


class DenseSampler(_KernelBiasSampler):

  name = "dense: einsum / ghost norms"

  def _a(self, layer, inputs):
    return flatten_positions(tf.cast(inputs, layer.kernel.dtype)), None


class Conv2DSampler(_KernelBiasSampler):
  """Conv2D via image patches: `g_i = patches_i^T delta_i`."""

  name = "conv2d: patches / ghost norms"

  def supports(self, layer):
    return conv_support(layer)

  # Per-example kernels straight from one depthwise filter-gradient op when
  # the input has at most this many channels (the first layer of an image
  # model); beyond that, patches are cheaper.
  DEPTHWISE_MAX_CHANNELS = 3

  def _a(self, layer, inputs):
    x = tf.cast(inputs, layer.kernel.dtype)
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    if (sh == sw and kh % sh == 0 and kw % sw == 0 and dh == dw == 1 and
        x.shape[1] is not None and x.shape[2] is not None):
      return _strided_patches(x, kh, kw, sh, layer.padding.upper())
    patches = tf.image.extract_patches(
        x, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
        rates=[1, dh, dw, 1], padding=layer.padding.upper())
    return flatten_positions(patches), None

  def _kernel_result(self, layer, captures, mask):
    cin = layer.kernel.shape[2]
    static = all(d is not None for c, dl in captures
                 for d in list(c.inputs.shape[1:3]) + list(dl.shape[1:3]))
    if (len(captures) == 1 and cin <= self.DEPTHWISE_MAX_CHANNELS and
        tuple(layer.dilation_rate) == (1, 1) and static):
      capture, delta = captures[0]
      return materialized_engine(
          _conv2d_per_example_kernels(layer, capture.inputs, delta), mask)
    return super()._kernel_result(layer, captures, mask)


def _same_padding(size, k, s):
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return out, total // 2, total - total // 2


def _strided_patches(x, kh, kw, s, padding):
  """Conv patches `[B, T, kh*kw*C]` via space_to_depth and slices.

  For kernels that are multiples of the stride, a stride-s window over x is a
  stride-1 window of (kh/s, kw/s) over `space_to_depth(x, s)`: (kh*kw)/s^2
  slices instead of a general patch gather. Features come out in another
  order; the returned permutation maps them to the kernel's rows.
  """
  _, h, w, c = x.shape
  if padding == "SAME":
    ho, top, bottom = _same_padding(h, kh, s)
    wo, left, right = _same_padding(w, kw, s)
  else:
    ho, top, bottom = (h - kh) // s + 1, 0, 0
    wo, left, right = (w - kw) // s + 1, 0, 0
  x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
  hp, wp = (ho - 1) * s + kh, (wo - 1) * s + kw  # rows/cols actually used
  x = x[:, :hp, :wp, :]
  if s > 1:
    x = tf.nn.space_to_depth(x, s)
  qh, qw = kh // s, kw // s
  slices = [x[:, a:a + ho, b:b + wo, :] for a in range(qh) for b in range(qw)]
  patches = tf.concat(slices, axis=-1) if len(slices) > 1 else slices[0]
  order = np.empty(kh * kw * c, dtype=np.int64)
  f = 0
  for a in range(qh):
    for b in range(qw):
      for dy in range(s):
        for dx in range(s):
          for ch in range(c):
            order[f] = ((a * s + dy) * kw + (b * s + dx)) * c + ch
            f += 1
  return tf.reshape(patches, [-1, ho * wo, kh * kw * c]), order


def _conv2d_per_example_kernels(layer, inputs, delta):
  """`[B, kh, kw, Cin, N]` per-example kernel gradients in one op.

  Folding the batch into channels, a depthwise convolution of the
  `[1, H, W, B*Cin]` input with multiplier N has, as its filter gradient for
  output gradients `delta` tiled over Cin, exactly the per-example kernels.
  """
  kh, kw, cin, n = layer.kernel.shape
  sh, sw = layer.strides
  x = tf.cast(inputs, layer.kernel.dtype)
  b = tf.shape(x)[0]
  h, w = x.shape[1], x.shape[2]
  x = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, h, w, -1])
  ho, wo = delta.shape[1], delta.shape[2]
  d = tf.cast(delta, layer.kernel.dtype)
  if cin > 1:
    d = tf.broadcast_to(d[:, :, :, tf.newaxis, :], [b, ho, wo, cin, n])
  d = tf.reshape(tf.transpose(tf.reshape(d, [b, ho, wo, cin * n]),
                              [1, 2, 0, 3]), [1, ho, wo, -1])
  g = tf.compat.v1.nn.depthwise_conv2d_native_backprop_filter(
      x, [kh, kw, b * cin, n], d, strides=[1, sh, sw, 1],
      padding=layer.padding.upper())                     # [kh, kw, B*Cin, N]
  g = tf.reshape(g, [kh, kw, b, cin, n])
  return tf.transpose(g, [2, 0, 1, 3, 4])


class Conv1DSampler(_KernelBiasSampler):
  """Conv1D as a height-1 Conv2D."""

  name = "conv1d: patches / ghost norms"

  def supports(self, layer):
    return conv_support(layer)

  def _a(self, layer, inputs):
    (k,), (s,), (d,) = layer.kernel_size, layer.strides, layer.dilation_rate
    x = tf.cast(inputs, layer.kernel.dtype)
    padding = layer.padding.upper()
    if padding == "CAUSAL":
      x = tf.pad(x, [[0, 0], [(k - 1) * d, 0], [0, 0]])
      padding = "VALID"
    patches = tf.image.extract_patches(
        x[:, tf.newaxis], sizes=[1, 1, k, 1], strides=[1, 1, s, 1],
        rates=[1, 1, d, 1], padding=padding)
    return flatten_positions(patches), None


class DepthwiseConv2DSampler(Sampler):
  """DepthwiseConv2D: `g_i[k, c, m] = sum_t P_i[t, k, c] delta_i[t, c, m]`."""

  name = "depthwise conv: patches einsum"

  def roles(self, layer):
    out = {"depthwise_kernel": layer.depthwise_kernel}
    if layer.use_bias and layer.bias is not None:
      out["bias"] = layer.bias
    return out

  def supports(self, layer):
    return conv_support(layer)

  def forward(self, layer, inputs, *args, **kwargs):
    outputs, z = without_activation(layer, inputs, *args, **kwargs)
    return outputs, inputs, z

  def per_example(self, layer, captures, masks):
    _, _, cin, mult = layer.depthwise_kernel.shape
    pairs = [(c.inputs, d) for c, d in captures]
    results = {}
    if "depthwise_kernel" in masks:
      results["depthwise_kernel"] = materialized_engine(
          depthwise_kernel_grads(layer, pairs), masks["depthwise_kernel"])
    if "bias" in masks:
      d = tf.concat([tf.reshape(dl, [tf.shape(dl)[0], -1, cin * mult])
                     for _, dl in pairs], axis=1)
      results["bias"] = materialized_engine(tf.reduce_sum(d, axis=1),
                                            masks["bias"])
    return combine(results)


def depthwise_kernel_grads(layer, pairs):
  """`[B, kh, kw, Cin, M]` per-example depthwise kernels from `(x, delta)`
  calls of a layer with `depthwise_kernel`, strides, dilation and padding
  (`delta`: `[B, H', W', Cin * M]`)."""
  kh, kw, cin, mult = layer.depthwise_kernel.shape
  sh, sw = layer.strides
  dh, dw = layer.dilation_rate
  a_parts, d_parts = [], []
  for x, delta in pairs:
    patches = tf.image.extract_patches(
        tf.cast(x, layer.depthwise_kernel.dtype), sizes=[1, kh, kw, 1],
        strides=[1, sh, sw, 1], rates=[1, dh, dw, 1],
        padding=layer.padding.upper())
    b = tf.shape(patches)[0]
    a_parts.append(tf.reshape(patches, [b, -1, kh * kw, cin]))
    d_parts.append(tf.reshape(tf.cast(delta, patches.dtype),
                              [b, -1, cin, mult]))
  g = tf.einsum("btkc,btcm->bkcm", tf.concat(a_parts, axis=1),
                tf.concat(d_parts, axis=1))
  return tf.reshape(g, [-1, kh, kw, cin, mult])


class EmbeddingSampler(Sampler):
  """Embedding rows: `||g_i * m||^2 = sum_t sum_d m[id_t, d] d_td S_td`.

  `S = E delta` with `E_tt' = [id_t == id_t']` sums the output gradients of
  positions that share a token, so repeated tokens are counted exactly.
  """

  name = "embedding: token-sharing norms"

  def roles(self, layer):
    return {"embeddings": layer.embeddings}

  def forward(self, layer, inputs, *args, **kwargs):
    z = layer.call(inputs, *args, **kwargs)
    return z, inputs, z

  def per_example(self, layer, captures, masks):
    vocab, dim = layer.embeddings.shape
    ids = tf.concat([tf.reshape(tf.cast(c.inputs, tf.int32),
                                [tf.shape(c.inputs)[0], -1])
                     for c, _ in captures], axis=1)          # [B, T]
    d = tf.concat([tf.reshape(dl, [tf.shape(dl)[0], -1, dim])
                   for _, dl in captures], axis=1)           # [B, T, D]
    d = tf.cast(d, layer.embeddings.dtype)
    ids, d = group_positions(ids), group_positions(d)
    mask = masks["embeddings"]
    same = tf.cast(tf.equal(ids[:, :, tf.newaxis], ids[:, tf.newaxis, :]),
                   d.dtype)                                   # [B, T, T]
    s = tf.matmul(same, d)                                    # [B, T, D]
    prod = d * s
    if not mask.is_full:
      prod = prod * tf.gather(mask.value, ids)
    sq = tf.reduce_sum(prod, axis=[1, 2])

    def sum_fn(coef):
      weighted = d * coef[:, tf.newaxis, tf.newaxis]
      total = tf.math.unsorted_segment_sum(
          tf.reshape(weighted, [-1, dim]), tf.reshape(ids, [-1]), vocab)
      return {"embeddings": total if mask.is_full else total * mask.value}
    return sq, sum_fn


class AffineNormSampler(Sampler):
  """LayerNormalization / GroupNormalization scale (gamma) and offset (beta).

  The layer runs with its affine part switched off to give `x_hat`; the
  wrapper then applies `x_hat * gamma + beta` itself, so
  `g_gamma_i = sum(x_hat_i * delta_i)` and `g_beta_i = sum(delta_i)` over the
  non-parameter axes.
  """

  name = "normalization: affine einsum"

  def roles(self, layer):
    out = {}
    if getattr(layer, "scale", False) and layer.gamma is not None:
      out["gamma"] = layer.gamma
    if getattr(layer, "center", False) and layer.beta is not None:
      out["beta"] = layer.beta
    return out

  def _param_axes(self, layer, rank):
    axis = layer.axis
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return sorted(a % rank for a in axes)

  def forward(self, layer, inputs, *args, **kwargs):
    saved = {k: layer.__dict__[k] for k in ("gamma", "beta", "scale", "center")
             if k in layer.__dict__}
    for k in ("gamma", "beta"):
      object.__setattr__(layer, k, None)
    for k in ("scale", "center"):
      object.__setattr__(layer, k, False)
    try:
      x_hat = layer.call(inputs, *args, **kwargs)
    finally:
      for k, v in saved.items():
        object.__setattr__(layer, k, v)
    rank = x_hat.shape.rank
    shape = [1] * rank
    for a in self._param_axes(layer, rank):
      shape[a] = x_hat.shape[a]
    y = x_hat
    if layer.scale and layer.gamma is not None:
      y = y * tf.reshape(tf.cast(layer.gamma, y.dtype), shape)
    if layer.center and layer.beta is not None:
      y = y + tf.reshape(tf.cast(layer.beta, y.dtype), shape)
    return y, x_hat, y

  def per_example(self, layer, captures, masks):
    g_gamma, g_beta = [], []
    for capture, delta in captures:
      rank = delta.shape.rank
      keep = self._param_axes(layer, rank)
      reduce_axes = [a for a in range(1, rank) if a not in keep]
      b = tf.shape(delta)[0]
      if "gamma" in masks:
        g = tf.reduce_sum(capture.inputs * delta, axis=reduce_axes)
        g_gamma.append(tf.reshape(g, [b] + list(layer.gamma.shape)))
      if "beta" in masks:
        g = tf.reduce_sum(delta, axis=reduce_axes)
        g_beta.append(tf.reshape(g, [b] + list(layer.beta.shape)))
    results = {}
    if g_gamma:
      results["gamma"] = materialized_engine(tf.add_n(g_gamma), masks["gamma"])
    if g_beta:
      results["beta"] = materialized_engine(tf.add_n(g_beta), masks["beta"])
    return combine(results)


_SAMPLERS: List[Tuple[type, Sampler]] = []


def register_sampler(layer_class: type, sampler: Sampler) -> None:
  """Registers the sampler of a Keras layer class (exact class match)."""
  if any(cls is layer_class for cls, _ in _SAMPLERS):
    raise ValueError(f"a sampler for {layer_class.__name__} is registered")
  _SAMPLERS.append((layer_class, sampler))


def supported_layer_classes() -> List[type]:
  """The Keras layer classes with a registered sampler."""
  return [cls for cls, _ in _SAMPLERS]


def sampler_for(layer) -> Optional[Sampler]:
  """The sampler of `layer`'s exact class, or None if unsupported."""
  for cls, sampler in _SAMPLERS:
    if type(layer) is cls:  # pylint: disable=unidiomatic-typecheck
      return sampler
  return None


register_sampler(keras.layers.Dense, DenseSampler())
register_sampler(keras.layers.Conv2D, Conv2DSampler())
register_sampler(keras.layers.Conv1D, Conv1DSampler())
register_sampler(keras.layers.DepthwiseConv2D, DepthwiseConv2DSampler())
register_sampler(keras.layers.Embedding, EmbeddingSampler())
register_sampler(keras.layers.LayerNormalization, AffineNormSampler())
register_sampler(keras.layers.GroupNormalization, AffineNormSampler())


# ---------------------------------------------------------------------------
# Generic vectorized fallback.
# ---------------------------------------------------------------------------


def jacobian_per_example(tape, per_example_loss, variables):
  """Per-example gradients `[B, *var.shape]` of any model (pfor-vectorized)."""
  return tape.jacobian(per_example_loss, variables,
                       unconnected_gradients=tf.UnconnectedGradients.ZERO,
                       experimental_use_pfor=True)
