"""Per-example gradients of SeparableConv2D, Conv2DTranspose, Conv3D layers.

SeparableConv2D is a depthwise convolution `D = depthwise(x)` followed by a
1x1 pointwise convolution `z = D P + b`. The wrapper computes the two stages
itself, capturing `x` and `D`; from `delta = dL/dz`:

    dP_i = sum_t D_it (x) delta_it          (a 1x1 conv is a dense layer)
    dD_i = delta_i P^T                      (per position, batched)
    dK_i = depthwise per-example kernels of (x_i, dD_i)

Conv2DTranspose `z = conv_transpose(x, K)` is the input-gradient of a
convolution from z's space to x's; its kernel gradient is the correlation of
`delta`'s patches with `x`, so with the patches of `delta` extracted by that
convolution's geometry:

    dK_i = sum_t patches(delta_i)_t (x) x_it      (`linear_engine`)

Conv3D is Conv2D's rule with volume patches (`tf.extract_volume_patches`).
"""

from typing import Optional

from tfdpprune.core import engines
from tfdpprune.core import samplers
from tfdpprune.core.samplers import dense
from tfdpprune.core._tf import tf


def _bias_result(layer, captures, mask):
  """Per-example bias gradients: output gradients summed over positions."""
  n_out = layer.bias.shape[-1]
  g = tf.add_n([tf.reduce_sum(tf.reshape(
      tf.cast(d, layer.bias.dtype), [tf.shape(d)[0], -1, n_out]), axis=1)
                for _, d in captures])
  return engines.materialized_engine(g, mask)


class _KernelConv(samplers.Sampler):
  """A convolution with `kernel` (and `bias`) whose kernel gradient is
  `linear_engine(patches, other)`; subclasses give the two factors."""

  def roles(self, layer):
    out = {"kernel": layer.kernel}
    if layer.use_bias and layer.bias is not None:
      out["bias"] = layer.bias
    return out

  def forward(self, layer, inputs, *args, **kwargs):
    outputs, z = samplers.without_activation(layer, inputs, *args,
                                                **kwargs)
    return outputs, inputs, z

  def _factors(self, layer, x, delta):
    """`(a [B, T, K], d [B, T, N])` with kernel gradient sum_t a_t (x) d_t."""
    raise NotImplementedError

  def per_example(self, layer, captures, masks):
    results = {}
    if "kernel" in masks:
      parts = [self._factors(layer, tf.cast(c.inputs, layer.kernel.dtype),
                             tf.cast(d, layer.kernel.dtype))
               for c, d in captures]
      a = tf.concat([engines.flatten_positions(p) for p, _ in parts], 1)
      d = tf.concat([engines.flatten_positions(q) for _, q in parts], 1)
      results["kernel"] = engines.linear_engine(
          a, d, masks["kernel"], layer.kernel.shape,
          a.shape[1] if len(captures) == 1 else None)
    if "bias" in masks:
      results["bias"] = _bias_result(layer, captures, masks["bias"])
    return engines.combine(results)


class SeparableConv2DSampler(samplers.Sampler):
  """SeparableConv2D: pointwise einsum, depthwise from `delta P^T`."""

  name = "separable conv: depthwise patches + pointwise einsum"

  def supports(self, layer) -> Optional[str]:
    return dense.conv_support(layer)

  def roles(self, layer):
    out = {"depthwise_kernel": layer.depthwise_kernel,
           "pointwise_kernel": layer.pointwise_kernel}
    if layer.use_bias and layer.bias is not None:
      out["bias"] = layer.bias
    return out

  def forward(self, layer, inputs, *args, **kwargs):
    del args, kwargs
    x = tf.cast(inputs, layer.depthwise_kernel.dtype)
    sh, sw = layer.strides
    depthwise = tf.nn.depthwise_conv2d(
        x, layer.depthwise_kernel, strides=[1, sh, sw, 1],
        padding=layer.padding.upper(), dilations=layer.dilation_rate)
    z = tf.nn.conv2d(depthwise, layer.pointwise_kernel, strides=1,
                     padding="VALID")
    if layer.use_bias:
      z = z + layer.bias
    outputs = layer.activation(z) if layer.activation is not None else z
    return outputs, {"x": x, "depthwise": depthwise}, z

  def per_example(self, layer, captures, masks):
    pointwise = layer.pointwise_kernel
    results = {}
    deltas = [tf.cast(d, pointwise.dtype) for _, d in captures]
    if "pointwise_kernel" in masks:
      a = tf.concat([engines.flatten_positions(c.inputs["depthwise"])
                     for c, _ in captures], axis=1)
      d = tf.concat([engines.flatten_positions(d) for d in deltas],
                    axis=1)
      results["pointwise_kernel"] = engines.linear_engine(
          a, d, masks["pointwise_kernel"], pointwise.shape,
          a.shape[1] if len(captures) == 1 else None)
    if "depthwise_kernel" in masks:
      pairs = [(c.inputs["x"], tf.einsum("bhwo,co->bhwc", d,
                                         pointwise[0, 0]))
               for (c, _), d in zip(captures, deltas)]
      results["depthwise_kernel"] = engines.materialized_engine(
          dense.depthwise_kernel_grads(layer, pairs),
          masks["depthwise_kernel"])
    if "bias" in masks:
      results["bias"] = _bias_result(layer, captures, masks["bias"])
    return engines.combine(results)


class Conv2DTransposeSampler(_KernelConv):
  """Conv2DTranspose: patches of `delta` times the input."""

  name = "transposed conv: output-gradient patches einsum"

  def supports(self, layer) -> Optional[str]:
    why = dense.conv_support(layer)
    if why:
      return why
    if tuple(layer.dilation_rate) != (1, 1):
      return "dilated transposed convolution"
    if layer.output_padding is not None:
      return "output_padding"
    return None

  def _factors(self, layer, x, delta):
    kh, kw, _, _ = layer.kernel.shape
    sh, sw = layer.strides
    patches = tf.image.extract_patches(
        delta, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
        rates=[1, 1, 1, 1], padding=layer.padding.upper())
    return patches, x


def volume_patches(x, kernel_size, strides, padding):
  """`[B, D', H', W', kd*kh*kw*C]` conv patches ([kd, kh, kw, C] order).

  Strided windows are read as contiguous slices of a blocked copy of `x`
  (reshape to `[B, D/s, s, ...]` and move the phases inward): about 3x
  faster than `tf.extract_volume_patches` or strided slices on CPU. Static
  spatial shapes only (else `tf.extract_volume_patches`).
  """
  spatial = x.shape[1:4]
  if any(d is None for d in spatial) or x.shape[-1] is None:
    return tf.extract_volume_patches(x, [1] + list(kernel_size) + [1],
                                     [1] + list(strides) + [1], padding)
  outs, blocks, pads = [], [], []
  for n, k, st in zip(spatial, kernel_size, strides):
    if padding == "SAME":
      out = -(-n // st)
      total = max((out - 1) * st + k - n, 0)
      before = total // 2
    else:
      out, total, before = (n - k) // st + 1, 0, 0
    nb = out + (k - 1) // st
    pads.append((before, max(nb * st - n - before, 0)))
    outs.append(out)
    blocks.append(nb)
  x = tf.pad(x, [[0, 0]] + [list(p) for p in pads] + [[0, 0]])
  x = x[:, :blocks[0] * strides[0], :blocks[1] * strides[1],
        :blocks[2] * strides[2], :]
  c = x.shape[-1]
  x = tf.reshape(x, [-1, blocks[0], strides[0], blocks[1], strides[1],
                     blocks[2], strides[2], c])
  x = tf.transpose(x, [0, 1, 3, 5, 2, 4, 6, 7])  # [B, D', H', W', s, s, s, C]
  (kd, kh, kw), (sd, sh, sw), (od, oh, ow) = kernel_size, strides, outs
  parts = [x[:, a // sd:a // sd + od, b // sh:b // sh + oh,
             e // sw:e // sw + ow, a % sd, b % sh, e % sw, :]
           for a in range(kd) for b in range(kh) for e in range(kw)]
  return tf.reshape(tf.stack(parts, axis=-2), [-1, od, oh, ow, kd * kh * kw * c])


class Conv3DSampler(_KernelConv):
  """Conv3D: volume patches times output gradients (`linear_engine`)."""

  name = "conv3d: volume patches / ghost norms"

  def supports(self, layer) -> Optional[str]:
    why = dense.conv_support(layer)
    if why:
      return why
    if tuple(layer.dilation_rate) != (1, 1, 1):
      return "dilated 3D convolution"
    return None

  def _factors(self, layer, x, delta):
    return volume_patches(x, layer.kernel_size, layer.strides,
                          layer.padding.upper()), delta
