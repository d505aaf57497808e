"""Fast per-example gradients (captured activations) vs a one-example loop."""

import numpy as np
import pytest

import tfdpprune as tdp
from tfdpprune import per_example
from tfdpprune import pruning
from tfdpprune._compat import tf

keras = tdp.keras
B = 5


def _loss_fn():
  return keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=keras.losses.Reduction.NONE)


def _loop_gradients(model, x, y, variables):
  """Reference: each example's gradient on its own (batch of one)."""
  loss_fn = _loss_fn()
  out = []
  for i in range(len(y)):
    with tf.GradientTape() as tape:
      xi = tf.nest.map_structure(lambda t: t[i:i + 1], x)
      loss = tf.reduce_sum(loss_fn(y[i:i + 1], model(xi)))
    grads = tape.gradient(loss, variables,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    out.append([tf.convert_to_tensor(g).numpy() for g in grads])
  return out


def _fast_gradients(model, x, y, masks=None):
  """Per-example gradients from the samplers: sum_fn(one_hot(i)) = g_i."""
  masks = masks or {}
  loss_fn = _loss_fn()
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(loss_fn(y, model(x)))
  owners = pruning.wrappers(model)
  caps = [(o, o.captures(None)[-1]) for o in owners if o.roles()]
  deltas = tape.gradient(loss, [c.outputs for _, c in caps])
  per_var, sq_total = {}, np.zeros(len(y))
  for (owner, cap), delta in zip(caps, deltas):
    specs = {r: per_example.MaskSpec(masks.get(v.ref()))
             if v.ref() in masks else per_example.MaskSpec(None)
             for r, v in owner.roles().items()}
    sq, sum_fn = owner.sampler.per_example(owner.layer, [(cap, delta)], specs)
    sq_total += sq.numpy()
    for i in range(len(y)):
      onehot = tf.one_hot(i, len(y))
      for role, g in sum_fn(onehot).items():
        per_var.setdefault(owner.roles()[role].ref(), []).append(g.numpy())
  return per_var, sq_total


def _check(model, x, y, masks=None, rtol=1e-4, atol=1e-5):
  pm = tdp.prune(model)
  assert any(isinstance(l, tdp.PruneWrapper) for l in pm.layers)
  variables = pm.trainable_variables
  ref = _loop_gradients(pm, x, y, variables)
  fast, sq = _fast_gradients(pm, x, y, masks)
  expected_sq = np.zeros(x.shape[0])
  for j, v in enumerate(variables):
    assert v.ref() in fast, f"{v.name} not covered by the fast path"
    m = masks.get(v.ref(), 1.0) if masks else 1.0
    for i in range(x.shape[0]):
      np.testing.assert_allclose(fast[v.ref()][i], ref[i][j] * m, rtol=rtol,
                                 atol=atol, err_msg=v.name)
      expected_sq[i] += np.sum((ref[i][j] * m) ** 2)
  np.testing.assert_allclose(sq, expected_sq, rtol=1e-3, atol=1e-6)


def _data(shape, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B,) + shape).astype("float32"),
          rng.integers(0, classes, size=B))


def test_dense_flat_matches_loop():
  keras.utils.set_random_seed(1)
  model = keras.Sequential([keras.Input((6,)),
                            keras.layers.Dense(4, activation="tanh"),
                            keras.layers.Dense(3)])
  _check(model, *_data((6,)))


def test_dense_on_sequences_matches_loop():
  keras.utils.set_random_seed(2)
  model = keras.Sequential([keras.Input((4, 6)),
                            keras.layers.Dense(5, activation="relu"),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
  _check(model, *_data((4, 6)))


@pytest.mark.parametrize("channels", [1, 5])  # depthwise-op / patch paths
@pytest.mark.parametrize("kernel,padding,strides,dilation", [
    (3, "same", 2, 1), (3, "valid", 1, 1), (3, "valid", 1, 2),
    (3, "same", 1, 1), (4, "same", 2, 1), (4, "valid", 2, 1),
    (2, "valid", 2, 1), (8, "same", 2, 1)])
def test_conv2d_matches_loop(channels, kernel, padding, strides, dilation):
  keras.utils.set_random_seed(3)
  model = keras.Sequential([
      keras.Input((9, 9, channels)),
      keras.layers.Conv2D(3, kernel, strides=strides, padding=padding,
                          dilation_rate=dilation, activation="relu"),
      keras.layers.Flatten(), keras.layers.Dense(3)])
  _check(model, *_data((9, 9, channels)))


def test_conv2d_masked_patch_path_matches_masked_loop():
  keras.utils.set_random_seed(11)
  model = keras.Sequential([
      keras.Input((8, 8, 4)),
      keras.layers.Conv2D(3, 4, strides=2, padding="same", activation="relu"),
      keras.layers.Flatten(), keras.layers.Dense(3)])
  pm = tdp.prune(model)
  kernel = pm.layers[0].layer.kernel
  mask = np.random.default_rng(0).integers(0, 2, kernel.shape)
  _check(model, *_data((8, 8, 4)),
         masks={kernel.ref(): tf.constant(mask, kernel.dtype)})


def test_conv2d_ghost_norm_path_matches_loop():
  # Few positions, wide kernel: the ghost norm is cheaper and gets chosen.
  keras.utils.set_random_seed(4)
  model = keras.Sequential([
      keras.Input((4, 4, 8)),
      keras.layers.Conv2D(16, 3, strides=2, padding="valid"),
      keras.layers.Flatten(), keras.layers.Dense(3)])
  _check(model, *_data((4, 4, 8)))


@pytest.mark.parametrize("padding", ["same", "causal", "valid"])
def test_conv1d_matches_loop(padding):
  keras.utils.set_random_seed(5)
  model = keras.Sequential([
      keras.Input((9, 2)),
      keras.layers.Conv1D(3, 3, padding=padding, activation="relu"),
      keras.layers.Flatten(), keras.layers.Dense(3)])
  _check(model, *_data((9, 2)))


def test_depthwise_conv2d_matches_loop():
  keras.utils.set_random_seed(6)
  model = keras.Sequential([
      keras.Input((6, 6, 3)),
      keras.layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2,
                                   padding="same", activation="relu"),
      keras.layers.Flatten(), keras.layers.Dense(3)])
  _check(model, *_data((6, 6, 3)))


def test_embedding_with_repeated_tokens_matches_loop():
  keras.utils.set_random_seed(7)
  model = keras.Sequential([
      keras.Input((6,), dtype="int32"),
      keras.layers.Embedding(5, 4),
      keras.layers.Flatten(), keras.layers.Dense(3)])
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, size=(B, 6)).astype("int32")  # repeats guaranteed
  _check(model, x, rng.integers(0, 3, size=B))


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_normalization_scale_matches_loop(norm):
  keras.utils.set_random_seed(8)
  layer = (keras.layers.LayerNormalization() if norm == "layer" else
           keras.layers.GroupNormalization(groups=2))
  model = keras.Sequential([
      keras.Input((3, 3, 4)),
      keras.layers.Conv2D(4, 2, padding="same"), layer,
      keras.layers.Flatten(), keras.layers.Dense(3)])
  # Non-trivial scale/offset, so their gradients are not degenerate.
  for v in model.layers[1].trainable_variables:
    v.assign(np.random.default_rng(1).normal(size=v.shape))
  _check(model, *_data((3, 3, 4)))


def test_wrapped_forward_equals_plain_forward():
  keras.utils.set_random_seed(9)
  model = keras.Sequential([
      keras.Input((5, 5, 2)),
      keras.layers.Conv2D(3, 3, activation="relu"),
      keras.layers.LayerNormalization(),
      keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
  x, _ = _data((5, 5, 2))
  np.testing.assert_allclose(tdp.prune(model)(x), model(x), rtol=1e-6,
                             atol=1e-6)


def test_masked_per_weight_gradients_match_masked_loop():
  keras.utils.set_random_seed(10)
  model = keras.Sequential([
      keras.Input((4, 4, 2)),
      keras.layers.Conv2D(3, 2, activation="relu"),
      keras.layers.Flatten(), keras.layers.Dense(3)])
  pm = tdp.prune(model)
  rng = np.random.default_rng(3)
  masks = {v.ref(): tf.constant(rng.integers(0, 2, v.shape), v.dtype)
           for v in pm.trainable_variables}
  x, y = _data((4, 4, 2))
  ref = _loop_gradients(pm, x, y, pm.trainable_variables)
  fast, _ = _fast_gradients(pm, x, y, masks)
  for j, v in enumerate(pm.trainable_variables):
    for i in range(B):
      np.testing.assert_allclose(fast[v.ref()][i],
                                 ref[i][j] * masks[v.ref()].numpy(),
                                 rtol=1e-4, atol=1e-5)


def test_linear_engine_masked_flat_norm_is_exact():
  # Hand-computed: a = [1, 2], delta = [3, 4], m = [[1, 0], [0, 1]]:
  # g = a^T delta = [[3, 4], [6, 8]]; g*m = [[3, 0], [0, 8]]; ||.||^2 = 73.
  a = tf.constant([[[1.0, 2.0]]])
  d = tf.constant([[[3.0, 4.0]]])
  m = per_example.MaskSpec(tf.constant([[1.0, 0.0], [0.0, 1.0]]))
  sq, sum_fn = per_example.linear_engine(a, d, m, (2, 2), positions=1)
  np.testing.assert_allclose(sq.numpy(), [73.0])
  np.testing.assert_allclose(sum_fn(tf.constant([0.5])).numpy(),
                             [[1.5, 0.0], [0.0, 4.0]])


# -- every layer with weights: generic and dedicated samplers -----------------


class _Gated(keras.layers.Layer):
  """A user-defined layer: y = tanh(x W) * sigmoid(x V) + b."""

  def build(self, input_shape):
    d = int(input_shape[-1])
    self.w = self.add_weight("w", [d, 4], initializer="glorot_uniform")
    self.v = self.add_weight("v", [d, 4], initializer="glorot_uniform")
    self.b = self.add_weight("b", [4], initializer="zeros")

  def call(self, x):
    return tf.tanh(x @ self.w) * tf.sigmoid(x @ self.v) + self.b


def _sequence_model(layer, steps=6, features=4, tokens=None):
  keras.utils.set_random_seed(3)
  if tokens:
    inputs = keras.Input((steps,), dtype="int32")
    h = keras.layers.Embedding(tokens, features, mask_zero=True)(inputs)
  else:
    inputs = keras.Input((steps, features))
    h = inputs
  h = layer(h)
  if h.shape.rank == 3:
    h = keras.layers.GlobalAveragePooling1D()(h)
  return keras.Model(inputs, keras.layers.Dense(3)(h))


@pytest.mark.parametrize("make", [
    lambda: keras.layers.SimpleRNN(5),
    lambda: keras.layers.LSTM(5, return_sequences=True),
    lambda: keras.layers.GRU(5),
    lambda: keras.layers.GRU(5, reset_after=False, go_backwards=True),
    lambda: keras.layers.Bidirectional(keras.layers.LSTM(4)),
    lambda: keras.layers.TimeDistributed(keras.layers.Dense(5)),
    lambda: keras.layers.Conv1DTranspose(3, 2) if hasattr(
        keras.layers, "Conv1DTranspose") else keras.layers.Conv1D(3, 2),
    lambda: _Gated(),
], ids=["simple_rnn", "lstm_seq", "gru", "gru_v1_backwards", "bi_lstm",
        "time_distributed", "conv1d_transpose", "user_defined"])
def test_sequence_layers_match_loop(make):
  x, y = _data((6, 4))
  _check(_sequence_model(make()), x, y)


def test_masked_bidirectional_lstm_on_tokens_matches_loop():
  rng = np.random.default_rng(4)
  x = rng.integers(1, 9, size=(B, 6)).astype("int32")
  x[0, 4:] = 0  # padded: masked steps
  x[2, 2:] = 0
  y = rng.integers(0, 3, size=B)
  _check(_sequence_model(keras.layers.Bidirectional(
      keras.layers.LSTM(4, return_sequences=True)), tokens=9), x, y)


@pytest.mark.parametrize("make,sampler", [
    (lambda: keras.layers.Conv2DTranspose(3, 3, strides=2), "transposed"),
    (lambda: keras.layers.Conv2DTranspose(3, 4, strides=2, padding="same",
                                          activation="relu"), "transposed"),
    (lambda: keras.layers.SeparableConv2D(3, 3, depth_multiplier=2),
     "separable"),
    (lambda: keras.layers.SeparableConv2D(4, 3, strides=2, padding="same",
                                          activation="tanh"), "separable"),
    (lambda: keras.layers.Conv2DTranspose(3, 3, dilation_rate=2), "generic"),
], ids=["conv2d_transpose", "conv2d_transpose_same", "separable_conv2d",
        "separable_strided", "dilated_transpose_generic"])
def test_image_layers_match_loop(make, sampler):
  keras.utils.set_random_seed(5)
  model = keras.Sequential([keras.Input((6, 6, 2)), make(),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
  assert pruning.report(tdp.prune(model))[0][2].startswith(sampler)
  x, y = _data((6, 6, 2))
  _check(model, x, y)


@pytest.mark.parametrize("make", [
    lambda: keras.layers.Conv3D(2, 2),
    lambda: keras.layers.Conv3D(3, (2, 3, 2), strides=2, padding="same",
                                activation="relu"),
], ids=["valid", "strided_same"])
def test_conv3d_matches_loop(make):
  keras.utils.set_random_seed(6)
  model = keras.Sequential([keras.Input((4, 5, 4, 2)), make(),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
  assert pruning.report(tdp.prune(model))[0][2].startswith("conv3d")
  x, y = _data((4, 5, 4, 2))
  _check(model, x, y)


def test_multi_head_attention_block_matches_loop():
  keras.utils.set_random_seed(7)
  inputs = keras.Input((5, 8))
  h = keras.layers.MultiHeadAttention(2, 4)(inputs, inputs)
  h = keras.layers.LayerNormalization()(h + inputs)
  h = keras.layers.EinsumDense("btd,de->bte", output_shape=(None, 6),
                               bias_axes="e")(h)
  h = keras.layers.GlobalAveragePooling1D()(h)
  model = keras.Model(inputs, keras.layers.Dense(3)(h))
  x, y = _data((5, 8))
  _check(model, x, y)


def test_nested_model_layers_are_wrapped_one_by_one():
  keras.utils.set_random_seed(8)
  inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5),
                            keras.layers.Dense(4)], name="inner")
  inputs = keras.Input((4,))
  model = keras.Model(inputs, keras.layers.Dense(3)(inner(inputs)))
  pm = tdp.prune(model)
  rows = pruning.report(pm)
  assert len(rows) == 3 and all(s.startswith("dense") for _, _, s in rows)
  x, y = _data((4,))
  _check(model, x, y)


def test_recurrent_layers_get_their_dedicated_samplers_and_same_outputs():
  rng = np.random.default_rng(9)
  x = rng.integers(1, 9, size=(B, 6)).astype("int32")
  x[1, 3:] = 0
  for make in (lambda: keras.layers.Bidirectional(
      keras.layers.GRU(4, return_sequences=True), merge_mode="sum"),
               lambda: keras.layers.LSTM(4, go_backwards=True),
               lambda: keras.layers.SimpleRNN(4, return_sequences=True)):
    model = _sequence_model(make(), tokens=9)
    pm = tdp.prune(model)
    samplers = {n: s for n, _, s in pruning.report(pm)}
    rnn = [s for n, s in samplers.items() if "embedding" not in n and
           "dense" not in n]
    assert rnn and all(s.startswith(("recurrent", "bidirectional")) for s in
                       rnn), samplers
    np.testing.assert_allclose(pm(x).numpy(), model(x).numpy(), rtol=1e-5,
                               atol=1e-6)
    _check(model, x, rng.integers(0, 3, size=B))


def test_lstm_returning_its_state_matches_loop():
  keras.utils.set_random_seed(10)
  inputs = keras.Input((6, 4))
  seq, h, c = keras.layers.LSTM(5, return_sequences=True,
                                return_state=True)(inputs)
  h = keras.layers.Concatenate()(
      [keras.layers.GlobalAveragePooling1D()(seq), h, c])
  model = keras.Model(inputs, keras.layers.Dense(3)(h))
  x, y = _data((6, 4))
  _check(model, x, y)


@pytest.mark.parametrize("equation,output_shape,bias_axes,input_shape", [
    ("ab,bc->ac", 4, "c", (5,)),
    ("abc,cd->abd", (None, 4), "d", (3, 5)),
    ("abc,cde->abde", (None, 2, 3), "de", (3, 5)),
    ("...b,bc->...c", 4, None, (3, 5)),
    ("abc,cd->abd", (3, 4), "b", (3, 5)),
], ids=["dense", "sequence", "heads", "ellipsis", "bias_on_time"])
def test_einsum_dense_matches_loop(equation, output_shape, bias_axes,
                                   input_shape):
  keras.utils.set_random_seed(11)
  inputs = keras.Input(input_shape)
  h = keras.layers.EinsumDense(equation, output_shape=output_shape,
                               bias_axes=bias_axes, activation="tanh")(inputs)
  model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
  pm = tdp.prune(model)
  assert pruning.report(pm)[0][2].startswith("einsum dense")
  x, y = _data(input_shape)
  _check(model, x, y)


def test_cross_attention_with_mask_and_masked_projection_matches_loop():
  keras.utils.set_random_seed(12)
  query, value = keras.Input((4, 6)), keras.Input((5, 8))
  mask = keras.Input((4, 5), dtype="bool")
  h = keras.layers.MultiHeadAttention(2, 3, value_dim=4)(
      query, value, attention_mask=mask)
  h = keras.layers.GlobalAveragePooling1D()(h)
  model = keras.Model([query, value, mask], keras.layers.Dense(3)(h))
  pm = tdp.prune(model)
  assert pruning.report(pm)[0][2].startswith("attention")
  rng = np.random.default_rng(13)
  x = [rng.normal(size=(B, 4, 6)).astype("float32"),
       rng.normal(size=(B, 5, 8)).astype("float32"),
       rng.random((B, 4, 5)) > 0.3]
  y = rng.integers(0, 3, size=B)
  attention = pm.layers[3]
  kernel = attention.roles()["query/kernel"]
  weight_mask = rng.integers(0, 2, kernel.shape).astype("float32")
  ref = _loop_gradients(pm, x, y, pm.trainable_variables)
  fast, _ = _fast_gradients(pm, x, y, {kernel.ref(): weight_mask})
  for j, v in enumerate(pm.trainable_variables):
    m = weight_mask if v is kernel else 1.0
    for i in range(B):
      np.testing.assert_allclose(fast[v.ref()][i], ref[i][j] * m, rtol=1e-4,
                                 atol=1e-5, err_msg=v.name)


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((7, 6, 5, 2), (3, 3, 3), (2, 2, 2), "VALID"),
    ((7, 6, 5, 2), (3, 2, 3), (2, 1, 3), "SAME"),
    ((4, 4, 4, 1), (2, 2, 2), (1, 1, 1), "SAME"),
])
def test_volume_patches_equal_tf_extract_volume_patches(shape, kernel,
                                                        strides, padding):
  from tfdpprune import per_example_conv  # pylint: disable=g-import-not-at-top
  x = tf.random.normal((3,) + shape)
  np.testing.assert_array_equal(
      per_example_conv.volume_patches(x, kernel, strides, padding),
      tf.extract_volume_patches(x, (1,) + kernel + (1,),
                                (1,) + strides + (1,), padding))


def test_prune_warns_naming_generic_layers_and_the_fix(caplog):
  import logging  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(3)
  model = keras.Sequential([keras.Input((6, 4)), _Gated(name="gated"),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
  with caplog.at_level(logging.INFO, logger="absl"):
    tdp.prune(model)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert any("gated (_Gated)" in w and "freeze" in w for w in warnings)
  infos = "\n".join(r.getMessage() for r in caplog.records)
  assert "dense" in infos and "einsum" in infos  # the report of every layer


@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_layers_with_initial_state_inputs_match_loop(bidirectional):
  keras.utils.set_random_seed(15)
  inputs = keras.Input((5, 3))
  h0 = keras.layers.Dense(4, activation="tanh")(
      keras.layers.GlobalAveragePooling1D()(inputs))
  if bidirectional:
    rnn = keras.layers.Bidirectional(keras.layers.LSTM(4))
    out = rnn(inputs, initial_state=[h0, h0, h0, h0])
  else:
    out = keras.layers.LSTM(4)(inputs, initial_state=[h0, h0])
  model = keras.Model(inputs, keras.layers.Dense(3)(out))
  x, y = _data((5, 3))
  np.testing.assert_allclose(tdp.prune(model)(x).numpy(), model(x).numpy(),
                             rtol=1e-5, atol=1e-6)
  _check(model, x, y)


def test_recurrent_dropout_model_is_validated_and_trains():
  keras.utils.set_random_seed(16)
  model = keras.Sequential([keras.Input((5, 3)),
                            keras.layers.LSTM(4, recurrent_dropout=0.2),
                            keras.layers.Dense(3)])
  assert tdp.validate(model) == []
  pm = tdp.prune(model)
  assert pruning.report(pm)[0][2].startswith("generic")
  pm.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.1),
             _loss_fn())
  x, y = _data((5, 3))
  pm.train_on_batch(x, y)
