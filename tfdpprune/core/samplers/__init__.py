"""Samplers: how each layer family is recorded and which engine it feeds.

A sampler (registered by exact layer class, as in Opacus' `grad_sample/`)
knows a layer family's variables by role, records what a layer saw in its
forward pass, and turns the recorded calls and their output gradients into
per-example norms and clipped sums (`tfdpprune.core.engines`). Samplers are
duck-typed over layer attributes that `tf_keras` and Keras 3 share; each
front end registers its own layer classes (`tfdpprune.keras2.samplers`,
`tfdpprune.keras3.samplers`).

One file per family: `dense` (Dense, Conv1D, Conv2D, DepthwiseConv2D),
`conv` (SeparableConv2D, Conv2DTranspose, Conv3D), `embedding`,
`normalization` (Layer/GroupNormalization), `attention` (EinsumDense,
MultiHeadAttention), `recurrent` (LSTM, GRU, SimpleRNN, Bidirectional) and
`generic` (any other layer with weights).
"""

from typing import Dict, List, Optional, Sequence, Tuple

from tfdpprune.core._tf import tf
from tfdpprune.core.engines import Capture
from tfdpprune.core.engines import LayerResult
from tfdpprune.core.engines import MaskSpec


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


def _identity(x):
  return x


def without_activation(layer, inputs, *args, **kwargs):
  """Calls `layer` with its activation replaced by the identity; returns
  `(layer output, pre-activation output)`."""
  activation = layer.activation
  object.__setattr__(layer, "activation", _identity)
  try:
    z = layer.call(inputs, *args, **kwargs)
  finally:
    object.__setattr__(layer, "activation", activation)
  return activation(z), z


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


def register_keras_layers(layers, rnn) -> None:
  """Registers the samplers of one Keras' built-in layer classes.

  Args:
    layers: that Keras' `keras.layers` module (duck-typed: the core imports
      no Keras).
    rnn: that Keras' `backend.rnn` loop, for the recurrent samplers (the
      exact semantics of its own recurrent layers).
  """
  # pylint: disable=g-import-not-at-top
  from tfdpprune.core.samplers import attention
  from tfdpprune.core.samplers import conv
  from tfdpprune.core.samplers import dense
  from tfdpprune.core.samplers import embedding
  from tfdpprune.core.samplers import normalization
  from tfdpprune.core.samplers import recurrent
  # pylint: enable=g-import-not-at-top
  for cls, sampler in [
      (layers.Dense, dense.DenseSampler()),
      (layers.Conv2D, dense.Conv2DSampler()),
      (layers.Conv1D, dense.Conv1DSampler()),
      (layers.DepthwiseConv2D, dense.DepthwiseConv2DSampler()),
      (layers.Embedding, embedding.EmbeddingSampler()),
      (layers.LayerNormalization, normalization.AffineNormSampler()),
      (layers.GroupNormalization, normalization.AffineNormSampler()),
      (layers.Conv3D, conv.Conv3DSampler()),
      (layers.SeparableConv2D, conv.SeparableConv2DSampler()),
      (layers.Conv2DTranspose, conv.Conv2DTransposeSampler()),
      (layers.EinsumDense, attention.EinsumDenseSampler()),
      (layers.MultiHeadAttention, attention.MultiHeadAttentionSampler()),
      (layers.LSTM, recurrent.RecurrentSampler(rnn)),
      (layers.GRU, recurrent.RecurrentSampler(rnn)),
      (layers.SimpleRNN, recurrent.RecurrentSampler(rnn)),
      (layers.Bidirectional, recurrent.BidirectionalSampler(rnn)),
  ]:
    register_sampler(cls, sampler)
