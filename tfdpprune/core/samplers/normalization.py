"""LayerNormalization and GroupNormalization: the affine scale and offset."""

from tfdpprune.core._tf import tf
from tfdpprune.core.engines import combine
from tfdpprune.core.engines import materialized_engine
from tfdpprune.core.samplers import Sampler


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
        g = tf.reduce_sum(tf.cast(capture.inputs, delta.dtype) * delta,
                          axis=reduce_axes)
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
