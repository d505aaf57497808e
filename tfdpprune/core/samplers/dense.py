"""Dense, Conv1D, Conv2D and DepthwiseConv2D: a kernel times the layer's
inputs (or image patches of them), and a bias.

`g_i = sum_t a_it (x) delta_it` with `a` the inputs or patches (`linear_engine`:
einsum or ghost norms); Conv2D with few input channels gets every example's
kernel from one depthwise filter-gradient op; DepthwiseConv2D contracts
patches and output gradients channel by channel.
"""

from typing import Optional

import numpy as np

from tfdpprune.core._tf import in_xla_context
from tfdpprune.core._tf import tf
from tfdpprune.core.engines import combine
from tfdpprune.core.engines import flatten_positions
from tfdpprune.core.engines import linear_engine
from tfdpprune.core.engines import materialized_engine
from tfdpprune.core.engines import _positions  # pylint: disable=protected-access
from tfdpprune.core.engines import LayerResult
from tfdpprune.core.samplers import Sampler
from tfdpprune.core.samplers import without_activation


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
  # model); beyond that, patches are cheaper. Not under XLA: XLA on CPU
  # rewrites that grouped convolution (batch_group_count = B * Cin) into one
  # whose work grows as (B * Cin)^2 (1.6 s at B = 64, 21 s at B = 256).
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
        tuple(layer.dilation_rate) == (1, 1) and static and
        not in_xla_context()):
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


def depthwise_role(layer):
  """`(role, variable)` of a depthwise kernel: `depthwise_kernel` in
  `tf_keras` (and both Kerases' SeparableConv2D), `kernel` in Keras 3's
  DepthwiseConv2D."""
  if getattr(layer, "depthwise_kernel", None) is not None:
    return "depthwise_kernel", layer.depthwise_kernel
  return "kernel", layer.kernel


class DepthwiseConv2DSampler(Sampler):
  """DepthwiseConv2D: `g_i[k, c, m] = sum_t P_i[t, k, c] delta_i[t, c, m]`."""

  name = "depthwise conv: patches einsum"

  def roles(self, layer):
    role, kernel = depthwise_role(layer)
    out = {role: kernel}
    if layer.use_bias and layer.bias is not None:
      out["bias"] = layer.bias
    return out

  def supports(self, layer):
    return conv_support(layer)

  def forward(self, layer, inputs, *args, **kwargs):
    outputs, z = without_activation(layer, inputs, *args, **kwargs)
    return outputs, inputs, z

  def per_example(self, layer, captures, masks):
    role, kernel = depthwise_role(layer)
    _, _, cin, mult = kernel.shape
    pairs = [(c.inputs, d) for c, d in captures]
    results = {}
    if role in masks:
      results[role] = materialized_engine(
          depthwise_kernel_grads(layer, pairs), masks[role])
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
  _, kernel = depthwise_role(layer)
  kh, kw, cin, mult = kernel.shape
  sh, sw = layer.strides
  dh, dw = layer.dilation_rate
  a_parts, d_parts = [], []
  for x, delta in pairs:
    patches = tf.image.extract_patches(
        tf.cast(x, kernel.dtype), sizes=[1, kh, kw, 1],
        strides=[1, sh, sw, 1], rates=[1, dh, dw, 1],
        padding=layer.padding.upper())
    b = tf.shape(patches)[0]
    a_parts.append(tf.reshape(patches, [b, -1, kh * kw, cin]))
    d_parts.append(tf.reshape(tf.cast(delta, patches.dtype),
                              [b, -1, cin, mult]))
  g = tf.einsum("btkc,btcm->bkcm", tf.concat(a_parts, axis=1),
                tf.concat(d_parts, axis=1))
  return tf.reshape(g, [-1, kh, kw, cin, mult])
