"""Keras 3 models, one per sampler family, and the DP step checked on each
against a one-example loop (run by `private_model_test.py`, also in
subprocesses with TF_ENABLE_ONEDNN_OPTS=0 and 1).

`python -m tests.keras3_families MODE` prints `{family: [relative error of
the DP update, samplers used]}` as JSON, MODE in eager, graph, jit.
"""

import json
import sys

import keras
import numpy as np

import tfdpprune as tdp
from tfdpprune import pruning
from tfdpprune._compat import tf

B = 6
L = keras.layers


class TiedOutput(keras.layers.Layer):
  """Logits from the embedding matrix of another layer (a tied weight)."""

  def __init__(self, embedding, **kwargs):
    super().__init__(**kwargs)
    self.embedding = embedding

  def call(self, h):
    return tf.einsum("btd,vd->btv", h, self.embedding.embeddings)[:, 0, :3]


def data(shape, seed=0, ints=None):
  rng = np.random.default_rng(seed)
  if ints:
    x = rng.integers(0, ints, size=(B,) + shape).astype("int32")
  else:
    x = rng.normal(size=(B,) + shape).astype("float32")
  return x, rng.integers(0, 3, size=B)


def _seq(shape, *layers):
  return keras.Sequential([keras.Input(shape)] + list(layers))


def families():
  """`(name, model, (x, y), sampler that must be used)` per family."""
  yield ("dense", _seq((6,), L.Dense(4, activation="tanh"), L.Dense(3)),
         data((6,)), "dense")
  yield ("conv2d_depthwise_op", _seq((9, 9, 1), L.Conv2D(
      3, 3, strides=2, padding="same", activation="relu"), L.Flatten(),
                                     L.Dense(3)), data((9, 9, 1)), "conv2d")
  yield ("conv2d_patches", _seq((9, 9, 5), L.Conv2D(3, 4, strides=2),
                                L.Flatten(), L.Dense(3)), data((9, 9, 5)),
         "conv2d")
  yield ("conv2d_dilated", _seq((9, 9, 2), L.Conv2D(3, 3, dilation_rate=2),
                                L.Flatten(), L.Dense(3)), data((9, 9, 2)),
         "conv2d")
  yield ("conv1d_causal", _seq((10, 3), L.Conv1D(4, 3, padding="causal"),
                               L.Flatten(), L.Dense(3)), data((10, 3)),
         "conv1d")
  yield ("depthwise", _seq((8, 8, 3), L.DepthwiseConv2D(3, depth_multiplier=2),
                           L.Flatten(), L.Dense(3)), data((8, 8, 3)),
         "depthwise conv")
  yield ("separable", _seq((8, 8, 3), L.SeparableConv2D(
      4, 3, strides=2, padding="same"), L.Flatten(), L.Dense(3)),
         data((8, 8, 3)), "separable conv")
  yield ("conv2d_transpose", _seq((5, 5, 2), L.Conv2DTranspose(
      3, 3, strides=2, padding="same"), L.Flatten(), L.Dense(3)),
         data((5, 5, 2)), "transposed conv")
  yield ("conv3d", _seq((6, 6, 6, 2), L.Conv3D(3, 3, strides=2,
                                                padding="same"),
                        L.Flatten(), L.Dense(3)), data((6, 6, 6, 2)),
         "conv3d")
  yield ("embedding", _seq((7,), L.Embedding(11, 4),
                           L.GlobalAveragePooling1D(), L.Dense(3)),
         data((7,), ints=11), "embedding")
  yield ("layer_norm", _seq((5, 6), L.LayerNormalization(), L.Flatten(),
                            L.Dense(3)), data((5, 6)), "normalization")
  yield ("group_norm", _seq((4, 4, 6), L.GroupNormalization(3), L.Flatten(),
                            L.Dense(3)), data((4, 4, 6)), "normalization")
  yield ("einsum_dense", _seq((4, 6), L.EinsumDense(
      "abc,cd->abd", output_shape=(4, 5), bias_axes="d"), L.Flatten(),
                              L.Dense(3)), data((4, 6)), "einsum dense")
  inputs = keras.Input((5, 6))
  attended = L.MultiHeadAttention(2, 3)(inputs, inputs)
  yield ("multi_head_attention", keras.Model(inputs, L.Dense(3)(
      L.Flatten()(attended))), data((5, 6)), "attention")
  yield ("lstm", _seq((5, 4), L.LSTM(3), L.Dense(3)), data((5, 4)),
         "recurrent")
  yield ("gru_sequences", _seq((5, 4), L.GRU(3, return_sequences=True),
                               L.Flatten(), L.Dense(3)), data((5, 4)),
         "recurrent")
  yield ("gru_reset_before", _seq((5, 4), L.GRU(3, reset_after=False),
                                  L.Dense(3)), data((5, 4)), "recurrent")
  yield ("simple_rnn_backwards", _seq((5, 4), L.SimpleRNN(
      3, go_backwards=True), L.Dense(3)), data((5, 4)), "recurrent")
  yield ("bidirectional", _seq((5, 4), L.Bidirectional(L.LSTM(3)),
                               L.Dense(3)), data((5, 4)),
         "bidirectional recurrent")
  yield ("time_distributed_generic", _seq((4, 5), L.TimeDistributed(
      L.Dense(3)), L.Flatten(), L.Dense(3)), data((4, 5)), "generic")
  inputs = keras.Input((5,), dtype="int32")
  embedding = L.Embedding(9, 4)
  yield ("tied_embedding", keras.Model(inputs, TiedOutput(embedding)(
      embedding(inputs))), data((5,), ints=9), "generic")
  inputs = keras.Input((6,))
  shared, h = L.Dense(6, activation="tanh"), inputs
  for _ in range(20):  # more than the 16 calls once kept per layer
    h = shared(h)
  yield ("dense_called_20_times", keras.Model(inputs, L.Dense(3)(h)),
         data((6,)), "dense")


def loss_fn():
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def loop_clipped_mean(model, x, y, clip):
  """The reference: each example's gradient alone, clipped, averaged."""
  variables = model.trainable_variables
  grads = []
  for i in range(len(y)):
    with tf.GradientTape() as tape:
      loss = loss_fn()(y[i:i + 1], model(x[i:i + 1], training=True))
    grads.append([tf.convert_to_tensor(g).numpy() for g in tape.gradient(
        loss, variables, unconnected_gradients="zero")])
  norms = np.array([np.sqrt(sum(np.sum(g ** 2) for g in gs)) for gs in grads])
  coef = np.minimum(1.0, clip / norms)
  return [sum(c * gs[j] for c, gs in zip(coef, grads)) / len(y)
          for j in range(len(variables))], norms


def check(mode, families_=None):
  """`{family: (relative error, samplers)}` of one noiseless DP step with
  SGD(1): the update must be minus the loop's clipped mean."""
  out = {}
  for name, model, (x, y), _ in (families_ or families()):
    _, norms = loop_clipped_mean(model, x, y, 1.0)
    clip = float(np.median(norms))  # about half the examples clipped
    expected, _ = loop_clipped_mean(model, x, y, clip)
    private = tdp.make_private(model, l2_norm_clip=clip, noise_multiplier=0.0,
                               expected_batch_size=len(y))
    options = ({"run_eagerly": True} if mode == "eager" else
               {"jit_compile": mode == "jit"})
    private.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss_fn(),
                    **options)
    before = [v.numpy() for v in private.trainable_variables]
    private.train_on_batch(x, y)
    after = [v.numpy() for v in private.trainable_variables]
    error = max(float(np.max(np.abs(a - b + e)))
                for a, b, e in zip(after, before, expected))
    scale = max(float(np.max(np.abs(e))) for e in expected)
    samplers = sorted({s.split(":")[0] for _, _, s in pruning.report(
        private.model)})
    out[name] = (error / scale, samplers)
  return out


if __name__ == "__main__":
  print("RESULTS " + json.dumps(check(sys.argv[1])))
