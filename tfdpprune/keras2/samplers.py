"""The samplers of `tf_keras` layer classes (one registration per class)."""

from tfdpprune.core import samplers
from tfdpprune.core.samplers import attention
from tfdpprune.core.samplers import conv
from tfdpprune.core.samplers import dense
from tfdpprune.core.samplers import embedding
from tfdpprune.core.samplers import normalization
from tfdpprune.core.samplers import recurrent
from tfdpprune.keras2.compat import keras

_layers = keras.layers
for _cls, _sampler in [
    (_layers.Dense, dense.DenseSampler()),
    (_layers.Conv2D, dense.Conv2DSampler()),
    (_layers.Conv1D, dense.Conv1DSampler()),
    (_layers.DepthwiseConv2D, dense.DepthwiseConv2DSampler()),
    (_layers.Embedding, embedding.EmbeddingSampler()),
    (_layers.LayerNormalization, normalization.AffineNormSampler()),
    (_layers.GroupNormalization, normalization.AffineNormSampler()),
    (_layers.Conv3D, conv.Conv3DSampler()),
    (_layers.SeparableConv2D, conv.SeparableConv2DSampler()),
    (_layers.Conv2DTranspose, conv.Conv2DTransposeSampler()),
    (_layers.EinsumDense, attention.EinsumDenseSampler()),
    (_layers.MultiHeadAttention, attention.MultiHeadAttentionSampler()),
    (_layers.LSTM, recurrent.RecurrentSampler(keras.backend.rnn)),
    (_layers.GRU, recurrent.RecurrentSampler(keras.backend.rnn)),
    (_layers.SimpleRNN, recurrent.RecurrentSampler(keras.backend.rnn)),
    (_layers.Bidirectional, recurrent.BidirectionalSampler(keras.backend.rnn)),
]:
  samplers.register_sampler(_cls, _sampler)
