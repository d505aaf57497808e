"""MaskedDPKerasSGDOptimizer: the privacy mechanics and the Keras contract."""

import os

import numpy as np
import pytest

import tfdpprune as tdp
from tfdpprune import per_example
from tfdpprune import per_example_generic
from tfdpprune.keras2 import compat as keras2_compat
from tfdpprune._compat import tf

keras = tdp.keras


def _xent():
  return keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=keras.losses.Reduction.NONE)


def _mse():
  return keras.losses.MeanSquaredError(reduction=keras.losses.Reduction.NONE)


def _small_cnn(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((6, 6, 1)),
      keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu"),
      keras.layers.Flatten(),
      keras.layers.Dense(5, activation="relu"),
      keras.layers.Dense(3)])


def _data(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 6, 6, 1)).astype("float32"),
          rng.integers(0, 3, size=n))


def _bits(variables):
  return [v.numpy().tobytes() for v in variables]


def test_is_a_tf_privacy_optimizer_and_a_legacy_sgd():
  opt = tdp.MaskedDPKerasSGDOptimizer(1.0, 1.1, learning_rate=0.1)
  assert isinstance(opt, keras.optimizers.legacy.SGD)
  assert isinstance(opt, keras2_compat.GenericDPSGDOptimizer)
  assert opt.l2_norm_clip == 1.0 and opt.noise_multiplier == 1.1


@pytest.mark.parametrize("kwargs,message", [
    (dict(l2_norm_clip=0.0, noise_multiplier=1.0), "l2_norm_clip"),
    (dict(l2_norm_clip=1.0, noise_multiplier=-1.0), "noise_multiplier"),
    (dict(l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=0),
     "num_microbatches"),
    (dict(l2_norm_clip=1.0, noise_multiplier=1.0,
          gradient_accumulation_steps=4), "gradient_accumulation_steps"),
])
def test_invalid_arguments_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tdp.MaskedDPKerasSGDOptimizer(**kwargs)


def test_scalar_loss_is_refused_with_clear_error():
  model = tdp.prune(_small_cnn())
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  x, y = _data()
  with pytest.raises(ValueError, match="Reduction.NONE"):
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)


def _linear_model(w):
  model = keras.Sequential([keras.Input((2,)),
                            keras.layers.Dense(1, use_bias=False)])
  model.layers[0].kernel.assign(np.array(w, "float32").reshape(2, 1))
  return model


@pytest.mark.parametrize("prepared", [True, False])
def test_no_noise_step_equals_hand_computed_masked_clipped_mean(prepared):
  # w = [1, 1]; loss_i = (w.x_i - 0)^2, so g_i = 2 (w.x_i) x_i:
  #   x_1 = [3, 4]:   g_1 = 2*7*[3, 4]     = [42, 56]
  #   x_2 = [0, 0.1]: g_2 = 2*0.1*[0, 0.1] = [0, 0.02]
  # mask m = [0, 1] BEFORE the norm: g_1*m = [0, 56] -> clipped to [0, 1]
  # (clipping first would give [0.6, 0.8] -> [0, 0.8]); g_2*m = [0, 0.02].
  # Mean over B=2: [0, 0.51]; lr = 1: w' = [1, 0.49].
  model = _linear_model([1.0, 1.0])
  if prepared:
    model = tdp.prune(model)
  kernel = model.trainable_variables[0]
  opt = tdp.MaskedDPKerasSGDOptimizer(
      1.0, 0.0, masks={kernel.ref(): np.array([[0.0], [1.0]])},
      learning_rate=1.0)
  model.compile(opt, _mse())
  x = np.array([[3.0, 4.0], [0.0, 0.1]], "float32")
  model.train_on_batch(x, np.zeros((2, 1), "float32"))
  np.testing.assert_allclose(kernel.numpy().ravel(), [1.0, 0.49], rtol=1e-6)


def _reference_step(model, x, y, masks, clip, lr):
  """Masked, clipped mean gradient from a one-example loop (independent)."""
  loss_fn = _xent()
  total = [np.zeros(v.shape) for v in model.trainable_variables]
  for i in range(x.shape[0]):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(loss_fn(y[i:i + 1], model(x[i:i + 1])))
    grads = tape.gradient(loss, model.trainable_variables)
    grads = [g.numpy() * masks.get(v.ref(), 1.0)
             for g, v in zip(grads, model.trainable_variables)]
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
    for t, g in zip(total, grads):
      t += g * min(1.0, clip / norm)
  return [v.numpy() - lr * t / x.shape[0]
          for v, t in zip(model.trainable_variables, total)]


@pytest.mark.parametrize("prepared", [True, False])
def test_no_noise_step_matches_one_example_loop_with_random_masks(prepared):
  model = _small_cnn(seed=1)
  if prepared:
    model = tdp.prune(model)
  rng = np.random.default_rng(0)
  masks = {v.ref(): rng.integers(0, 2, v.shape).astype("float32")
           for v in model.trainable_variables}
  x, y = _data(8)
  expected = _reference_step(model, x, y, masks, clip=0.1, lr=0.5)
  model.compile(tdp.MaskedDPKerasSGDOptimizer(
      0.1, 0.0, masks=masks, learning_rate=0.5), _xent())
  model.train_on_batch(x, y)
  for v, e in zip(model.trainable_variables, expected):
    np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6)


def test_per_example_clipped_norm_is_bounded_by_clip():
  model = tdp.prune(_small_cnn(seed=2))
  x, y = _data(1)
  x = x * 100.0  # large gradients: certainly clipped
  before = [v.numpy() for v in model.trainable_variables]
  clip = 0.3
  model.compile(tdp.MaskedDPKerasSGDOptimizer(clip, 0.0, learning_rate=1.0),
                _xent())
  model.train_on_batch(x, y)
  step = np.sqrt(sum(np.sum((v.numpy() - b) ** 2)
                     for v, b in zip(model.trainable_variables, before)))
  np.testing.assert_allclose(step, clip, rtol=1e-4)


def test_noise_std_on_selected_coordinates_and_zero_elsewhere():
  # Zero inputs and targets make every per-example gradient zero, so the step
  # is pure noise: -lr * N(0, (sigma C)^2) * m / B.
  sigma, clip, batch = 2.0, 0.5, 4
  model = tdp.prune(keras.Sequential([
      keras.Input((50,)), keras.layers.Dense(200, use_bias=False)]))
  kernel = model.trainable_variables[0]
  mask = np.random.default_rng(0).integers(0, 2, kernel.shape)
  before = kernel.numpy().copy()
  model.compile(tdp.MaskedDPKerasSGDOptimizer(
      clip, sigma, masks={kernel.ref(): mask}, learning_rate=1.0,
      noise_seed=3), _mse())
  model.train_on_batch(np.zeros((batch, 50), "float32"),
                       np.zeros((batch, 200), "float32"))
  delta = kernel.numpy() - before
  assert np.array_equal(kernel.numpy()[mask == 0], before[mask == 0])
  assert np.all(delta[mask == 0] == 0.0)
  selected = delta[mask == 1]
  expected = sigma * clip / batch
  # ~5000 samples: the std estimate is within 2% of the truth (4+ s.e.);
  # the 10% band accepts sigma*C/B and rejects 2/3 and 1.5 of it.
  ratio = selected.std() / expected
  assert 0.9 < ratio < 1.1, ratio
  assert abs(selected.mean()) < 4 * expected / np.sqrt(selected.size)


def test_all_zero_mask_variables_are_bit_identical_and_excluded():
  model = tdp.prune(_small_cnn(seed=3))
  conv = model.layers[0]
  frozen = list(conv.trainable_variables)
  masks = {v.ref(): np.zeros(v.shape) for v in frozen}
  seen_roles = []

  class SpySampler(type(conv.sampler)):

    def per_example(self, layer, captures, masks):
      seen_roles.extend(masks)
      return super().per_example(layer, captures, masks)

  object.__setattr__(conv, "sampler", SpySampler())
  before = _bits(frozen)
  model.compile(tdp.MaskedDPKerasSGDOptimizer(
      1.0, 1.0, masks=masks, learning_rate=0.1, momentum=0.9), _xent())
  x, y = _data(8)
  model.fit(x, y, batch_size=4, epochs=3, verbose=0)
  assert _bits(frozen) == before
  assert seen_roles == []  # the frozen layer was never sampled
  others = model.layers[-1].trainable_variables
  assert any(np.any(v.numpy() != 0) for v in others)


def test_frozen_coordinates_unchanged_with_momentum_and_changing_mask():
  model = tdp.prune(_small_cnn(seed=4))
  variables = model.trainable_variables
  mask_vars = [tf.Variable(np.ones(v.shape, "float32"), trainable=False)
               for v in variables]
  opt = tdp.MaskedDPKerasSGDOptimizer(
      1.0, 1.0, masks=list(zip(variables, mask_vars)), learning_rate=0.1,
      momentum=0.9, nesterov=True)
  model.compile(opt, _xent())
  x, y = _data(8)
  rng = np.random.default_rng(5)
  model.train_on_batch(x, y)  # builds momentum for every coordinate
  traces = model.train_function.experimental_get_tracing_count()
  for _ in range(6):
    for m in mask_vars:
      m.assign(rng.integers(0, 2, m.shape).astype("float32"))
    before = [v.numpy().copy() for v in variables]
    model.train_on_batch(x, y)
    for v, b, m in zip(variables, before, mask_vars):
      off = m.numpy() == 0
      assert np.array_equal(v.numpy()[off], b[off]), v.name
      if (~off).sum() > 2:
        assert np.any(v.numpy()[~off] != b[~off]), v.name
  # New masks took effect without retracing.
  assert model.train_function.experimental_get_tracing_count() == traces


def test_fast_path_equals_fallback_and_fallback_warns(caplog):
  x, y = _data(6)
  plain = _small_cnn(seed=5)
  wrapped = tdp.prune(_small_cnn(seed=6))
  wrapped.set_weights(plain.get_weights())
  for model in (plain, wrapped):
    model.compile(tdp.MaskedDPKerasSGDOptimizer(0.5, 0.0, learning_rate=0.3),
                  _xent())
  tdp.MaskedDPKerasSGDOptimizer._warned_fallback = False
  plain.train_on_batch(x, y)
  assert any("vectorized" in r.getMessage() for r in caplog.records)
  wrapped.train_on_batch(x, y)
  for a, b in zip(plain.trainable_variables, wrapped.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_works_under_xla_jit_compile():
  model = tdp.prune(_small_cnn(seed=6))
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.1),
                _xent(), jit_compile=True)
  x, y = _data(8)
  history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"][0])


def test_config_round_trip():
  opt = tdp.MaskedDPKerasSGDOptimizer(0.7, 1.3, learning_rate=0.05,
                                      momentum=0.5, expected_batch_size=32)
  clone = tdp.MaskedDPKerasSGDOptimizer.from_config(opt.get_config())
  assert clone.l2_norm_clip == 0.7 and clone.noise_multiplier == 1.3
  assert clone.expected_batch_size == 32
  assert clone.get_config() == opt.get_config()


@pytest.mark.parametrize("prepared", [True, False])
def test_save_and_load_keras_file_restores_optimizer(tmp_path, prepared):
  model = _small_cnn(seed=7)
  if prepared:
    model = tdp.prune(model)
  model.compile(tdp.MaskedDPKerasSGDOptimizer(0.8, 1.2, learning_rate=0.1,
                                              momentum=0.9), _xent())
  x, y = _data(8)
  model.fit(x, y, batch_size=4, epochs=1, verbose=0)
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded.optimizer, tdp.MaskedDPKerasSGDOptimizer)
  assert loaded.optimizer.l2_norm_clip == 0.8
  assert loaded.optimizer.noise_multiplier == 1.2
  np.testing.assert_allclose(loaded.predict(x, verbose=0),
                             model.predict(x, verbose=0), rtol=1e-6)
  if prepared:
    assert any(isinstance(l, tdp.PruneWrapper) for l in loaded.layers)
  loaded.fit(x, y, batch_size=4, epochs=1, verbose=0)  # trains on


def test_uniform_output_masks_are_detected_as_structured():
  mask = np.zeros((4, 3))
  mask[:, 1] = 1
  assert tdp.optimizer._static_structure(mask.astype(bool)) == (  # pylint: disable=protected-access
      per_example.OUT, False)


def _fast_vs_fallback(build, x, y, clip=0.5):
  plain = build()
  wrapped = tdp.prune(build())
  wrapped.set_weights(plain.get_weights())
  for model in (plain, wrapped):
    tdp.MaskedDPKerasSGDOptimizer._warned_fallback = False
    model.compile(tdp.MaskedDPKerasSGDOptimizer(clip, 0.0, learning_rate=0.3,
                                                momentum=0.9), _xent())
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False)
  assert not tdp.MaskedDPKerasSGDOptimizer._warned_fallback  # fast path ran
  for a, b in zip(plain.trainable_variables, wrapped.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=1e-5)


def test_functional_text_model_fast_path_equals_fallback():
  def build():
    keras.utils.set_random_seed(12)
    tokens = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(11, 6)(tokens)
    h = keras.layers.Conv1D(5, 3, padding="causal", activation="relu")(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(3)(h))
  rng = np.random.default_rng(0)
  _fast_vs_fallback(build, rng.integers(0, 11, (8, 7)).astype("int32"),
                    rng.integers(0, 3, 8))


def test_shared_layer_called_twice_fast_path_equals_fallback():
  def build():
    keras.utils.set_random_seed(13)
    left, right = keras.Input((4,)), keras.Input((4,))
    shared = keras.layers.Dense(5, activation="tanh")
    h = keras.layers.Concatenate()([shared(left), shared(right)])
    return keras.Model([left, right], keras.layers.Dense(3)(h))
  rng = np.random.default_rng(1)
  x = [rng.normal(size=(8, 4)).astype("float32") for _ in range(2)]
  _fast_vs_fallback(build, x, rng.integers(0, 3, 8))


def test_depthwise_and_group_norm_model_fast_path_equals_fallback():
  def build():
    keras.utils.set_random_seed(14)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
        keras.layers.GroupNormalization(groups=2),
        keras.layers.Conv2D(4, 2, strides=2, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(3)])
  rng = np.random.default_rng(2)
  _fast_vs_fallback(build, rng.normal(size=(8, 6, 6, 2)).astype("float32"),
                    rng.integers(0, 3, 8))


# -- privacy by default -------------------------------------------------------


def _bn_model():
  keras.utils.set_random_seed(0)
  return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                           keras.layers.BatchNormalization(name="bn"),
                           keras.layers.Dense(3)])


def test_batch_norm_is_refused_by_the_optimizer_alone():
  x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
  y = np.arange(16) % 3
  model = _bn_model()  # never went through tdp.prune
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0), _xent())
  with pytest.raises(ValueError, match="'bn'.*BatchNormalization"):
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  with pytest.raises(ValueError, match="GroupNormalization"):
    model.train_on_batch(x, y)
  # A custom training loop too.
  opt = tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0)
  with pytest.raises(ValueError, match="BatchNormalization"):
    with tf.GradientTape() as tape:
      loss = _xent()(y, model(x, training=True))
    opt.minimize(loss, model.trainable_variables, tape=tape)
  # Frozen (inference-mode) BatchNorm is per-example, so it trains.
  model.get_layer("bn").trainable = False
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0), _xent())
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("prepared", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_example_gets_coefficient_zero(prepared, bad):
  x, y = _data(8)
  model = _small_cnn(seed=8)
  if prepared:
    model = tdp.prune(model)
  good = np.arange(8) != 3
  expected = _reference_step(model, x[good], y[good], {}, clip=0.2, lr=0.5)
  x_bad = x.copy()
  x_bad[3, 2, 2, 0] = bad
  # Divide by the 7 finite examples, as the reference does.
  model.compile(tdp.MaskedDPKerasSGDOptimizer(
      0.2, 0.0, learning_rate=0.5, expected_batch_size=7), _xent())
  model.train_on_batch(x_bad, y)
  for v, e in zip(model.trainable_variables, expected):
    assert np.all(np.isfinite(v.numpy()))
    if prepared:  # exactly the step without the bad example
      np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6)
  # (The generic jacobian fallback backpropagates the whole batch, so 0 * NaN
  # reaches every example's gradient: all get coefficient 0, none is NaN.)


def _pure_noise_step(**kwargs):
  model = tdp.prune(keras.Sequential([keras.Input((10,)),
                                      keras.layers.Dense(50)]))
  before = _bits(model.trainable_variables)
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=1.0,
                                              **kwargs), _mse())
  model.set_weights([np.zeros(v.shape) for v in model.trainable_variables])
  model.train_on_batch(np.zeros((4, 10), "float32"),
                       np.zeros((4, 50), "float32"))
  assert _bits(model.trainable_variables) != before
  return _bits(model.trainable_variables)


def test_noise_is_secret_by_default_and_reproducible_with_a_seed():
  assert _pure_noise_step() != _pure_noise_step()
  assert _pure_noise_step(noise_seed=5) == _pure_noise_step(noise_seed=5)
  assert _pure_noise_step(noise_seed=5) != _pure_noise_step(noise_seed=6)


def test_config_has_no_seed_unless_given_and_keeps_the_step_count():
  opt = tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0)
  assert "noise_seed" not in opt.get_config()
  assert tdp.MaskedDPKerasSGDOptimizer(
      1.0, 1.0, noise_seed=3).get_config()["noise_seed"] == 3
  opt.iterations.assign(17)
  clone = tdp.MaskedDPKerasSGDOptimizer.from_config(opt.get_config())
  assert int(clone.iterations.numpy()) == 17
  with pytest.raises(ValueError, match="iterations"):
    tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, iterations=-1)


def test_step_count_and_epsilon_survive_keras_save_and_load(tmp_path):
  model = tdp.prune(_small_cnn(seed=9))
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.1, learning_rate=0.1),
                _xent())
  x, y = _data(24)
  model.fit(x, y, batch_size=4, epochs=5, verbose=0)  # 30 steps
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert int(loaded.optimizer.iterations.numpy()) == 30
  callback = tdp.PrivacyCallback(24, 4, 1.1)
  callback.set_model(loaded)
  assert callback.steps == 30
  assert callback.epsilon == pytest.approx(
      tdp.accounting.compute_epsilon(24, 4, 1.1, steps=30))
  loaded.fit(x, y, batch_size=4, epochs=1, verbose=0)
  assert int(loaded.optimizer.iterations.numpy()) == 36


def test_no_artifact_holds_the_noise_or_sampling_key(tmp_path, drawn_keys,
                                                     key_files_holding):
  from tfdpprune import data  # pylint: disable=g-import-not-at-top
  drawn = drawn_keys
  x, y = _data(64)
  model = tdp.prune(_small_cnn(seed=10))
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.1,
                                              momentum=0.9,
                                              expected_batch_size=8), _xent())
  batches = data.poisson_batches(x, y, 8 / 64, num_steps=6)
  assert len(drawn) == 2  # the noise key and the sampling key
  model.fit(batches, epochs=1, verbose=0, callbacks=[
      keras.callbacks.TensorBoard(str(tmp_path / "tb"), write_graph=True)])
  model.save(str(tmp_path / "m.keras"))
  model.save(str(tmp_path / "savedmodel"), save_format="tf")
  tdp.strip(model).save(str(tmp_path / "stripped.keras"))
  tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
      str(tmp_path / "ckpt" / "c"))
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "m.keras", "savedmodel",
                                          "stripped.keras", "tb"]
  assert key_files_holding(str(tmp_path), drawn) == []
  # The search does find a key that is written down.
  (tmp_path / "leak.txt").write_text(f"{drawn[0][1]}")
  assert key_files_holding(str(tmp_path), drawn) == [str(tmp_path /
                                                          "leak.txt")]


def test_batch_norm_is_refused_wherever_the_model_is_held():
  x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
  y = np.arange(16) % 3

  class Trainer:

    def __init__(self):
      self.net = _bn_model()
      self.opt = tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0)

    @tf.function
    def step(self, x, y):
      with tf.GradientTape() as tape:
        loss = _xent()(y, self.net(x, training=True))
      self.opt.minimize(loss, self.net.trainable_variables, tape=tape)

  trainer = Trainer()
  with pytest.raises(ValueError, match="BatchNormalization"):
    trainer.step(x, y)
  models = {"net": _bn_model()}
  opt = tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0)
  with pytest.raises(ValueError, match="BatchNormalization"):
    with tf.GradientTape() as tape:
      loss = _xent()(y, models["net"](x, training=True))
    opt.minimize(loss, models["net"].trainable_variables, tape=tape)

  # Only variables and a forward function reach the optimizer: the traced
  # graph's batch-statistics ops give the BatchNorm away.
  def make_step():
    net = _bn_model()
    forward, variables = net.__call__, net.trainable_variables
    opt = tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0)
    del net

    @tf.function
    def step(x, y):
      with tf.GradientTape() as tape:
        loss = _xent()(y, forward(x, training=True))
      opt.minimize(loss, variables, tape=tape)
    return step
  with pytest.raises(ValueError, match="batch statistics"):
    make_step()(x, y)


# -- DP Adam --------------------------------------------------------------------


def test_adam_is_a_tf_privacy_optimizer_and_a_legacy_adam():
  opt = tdp.MaskedDPKerasAdamOptimizer(1.0, 1.1, learning_rate=1e-3)
  assert isinstance(opt, keras.optimizers.legacy.Adam)
  assert isinstance(opt, keras2_compat.GenericDPAdamOptimizer)
  assert opt.l2_norm_clip == 1.0 and opt.noise_multiplier == 1.1


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_no_noise_step_equals_reference_with_masks(amsgrad):
  model = tdp.prune(_small_cnn(seed=14))
  rng = np.random.default_rng(3)
  masks = {v.ref(): rng.integers(0, 2, v.shape).astype("float32")
           for v in model.trainable_variables}
  x, y = _data(8)
  before = [v.numpy().copy() for v in model.trainable_variables]
  # The clipped masked mean gradient g, from a one-example loop (lr = 1).
  g = [b - e for b, e in zip(before, _reference_step(
      model, x, y, masks, clip=0.1, lr=1.0))]
  lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7
  model.compile(tdp.MaskedDPKerasAdamOptimizer(
      0.1, 0.0, masks=masks, learning_rate=lr, epsilon=eps, amsgrad=amsgrad),
                _xent())
  model.train_on_batch(x, y)
  lr_t = lr * np.sqrt(1 - b2) / (1 - b1)
  for v, b, gi in zip(model.trainable_variables, before, g):
    m, s = (1 - b1) * gi, (1 - b2) * gi * gi
    expected = b - lr_t * m / (np.sqrt(s) + eps)
    mask = masks[v.ref()]
    np.testing.assert_allclose(v.numpy(), np.where(mask > 0, expected, b),
                               rtol=1e-4, atol=1e-6)
    assert np.array_equal(v.numpy()[mask == 0], b[mask == 0])


def test_adam_unselected_coordinates_keep_value_and_moments():
  model = tdp.prune(_small_cnn(seed=15))
  variables = model.trainable_variables
  mask_vars = [tf.Variable(np.ones(v.shape, "float32"), trainable=False)
               for v in variables]
  opt = tdp.MaskedDPKerasAdamOptimizer(1.0, 1.0, masks=list(zip(
      variables, mask_vars)), learning_rate=0.01)
  model.compile(opt, _xent())
  x, y = _data(8)
  model.train_on_batch(x, y)  # every coordinate has moments now
  rng = np.random.default_rng(6)
  for _ in range(4):
    for m in mask_vars:
      m.assign(rng.integers(0, 2, m.shape).astype("float32"))
    state = [(v.numpy().copy(), opt.get_slot(v, "m").numpy().copy(),
              opt.get_slot(v, "v").numpy().copy()) for v in variables]
    model.train_on_batch(x, y)
    for v, (value, m1, m2), mask in zip(variables, state, mask_vars):
      off = mask.numpy() == 0
      assert np.array_equal(v.numpy()[off], value[off])
      assert np.array_equal(opt.get_slot(v, "m").numpy()[off], m1[off])
      assert np.array_equal(opt.get_slot(v, "v").numpy()[off], m2[off])
      if (~off).sum() > 2:
        assert np.any(opt.get_slot(v, "m").numpy()[~off] != m1[~off])


def test_adam_noise_only_on_selected_coordinates_and_save_load(tmp_path):
  model = tdp.prune(keras.Sequential([keras.Input((10,)),
                                      keras.layers.Dense(40)]))
  kernel = model.trainable_variables[0]
  mask = np.random.default_rng(0).integers(0, 2, kernel.shape)
  before = kernel.numpy().copy()
  model.compile(tdp.MaskedDPKerasAdamOptimizer(
      1.0, 2.0, masks={kernel.ref(): mask}, learning_rate=0.1), _mse())
  model.train_on_batch(np.zeros((4, 10), "float32"),
                       np.zeros((4, 40), "float32"))
  moved = kernel.numpy() != before
  assert not moved[mask == 0].any() and moved[mask == 1].all()
  path = str(tmp_path / "adam.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded.optimizer, tdp.MaskedDPKerasAdamOptimizer)
  assert loaded.optimizer.noise_multiplier == 2.0
  assert int(loaded.optimizer.iterations.numpy()) == 1


# -- TF Privacy compatibility -------------------------------------------------


def test_num_microbatches_none_or_batch_size_means_per_example():
  x, y = _data(8)
  for n in (None, 8):
    model = tdp.prune(_small_cnn(seed=16))
    model.compile(tdp.MaskedDPKerasSGDOptimizer(
        1.0, 0.0, num_microbatches=n, learning_rate=0.1), _xent())
    model.train_on_batch(x, y)
  model = tdp.prune(_small_cnn(seed=16))
  model.compile(tdp.MaskedDPKerasSGDOptimizer(
      1.0, 0.0, num_microbatches=1, learning_rate=0.1), _xent())
  with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                     match="clips every example"):
    model.train_on_batch(x, y)


def test_tf_privacy_positional_order_works():
  # DPKerasSGDOptimizer(l2_norm_clip, noise_multiplier, num_microbatches)
  opt = tdp.MaskedDPKerasSGDOptimizer(1.0, 1.1, 8, learning_rate=0.1)
  assert opt._num_microbatches == 8 and opt._masks == {}  # pylint: disable=protected-access
  model = tdp.prune(_small_cnn(seed=17))
  model.compile(opt, _xent())
  model.train_on_batch(*_data(8))


# -- augmentation multiplicity -------------------------------------------------


def _augmult_reference(model, x, y, k, clip, lr):
  """Per example: the mean gradient of its k rows, clipped; one-row loop."""
  loss_fn = _xent()
  variables = model.trainable_variables
  total = [np.zeros(v.shape) for v in variables]
  examples = len(y) // k
  for i in range(examples):
    mean = [np.zeros(v.shape) for v in variables]
    for r in range(i * k, (i + 1) * k):
      with tf.GradientTape() as tape:
        xr = tf.nest.map_structure(lambda t: t[r:r + 1], x)
        loss = tf.reduce_sum(loss_fn(y[r:r + 1], model(xr)))
      grads = tape.gradient(loss, variables,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      mean = [m + tf.convert_to_tensor(g).numpy() / k
              for m, g in zip(mean, grads)]
    norm = np.sqrt(sum(np.sum(g ** 2) for g in mean))
    total = [t + g * min(1.0, clip / norm) for t, g in zip(total, mean)]
  return [v.numpy() - lr * t / examples for v, t in zip(variables, total)]


def _text_lstm():
  keras.utils.set_random_seed(21)
  tokens = keras.Input((5,), dtype="int32")
  h = keras.layers.Embedding(9, 4)(tokens)
  h = keras.layers.LSTM(3, return_sequences=True)(h)
  h = keras.layers.MultiHeadAttention(1, 2)(h, h)
  h = keras.layers.LayerNormalization()(h)
  return keras.Model(tokens, keras.layers.Dense(3)(
      keras.layers.GlobalAveragePooling1D()(h)))


@pytest.mark.parametrize("build,data", [
    (lambda: _small_cnn(seed=20), lambda rng: (
        rng.normal(size=(12, 6, 6, 1)).astype("float32"))),
    (_text_lstm, lambda rng: rng.integers(0, 9, (12, 5)).astype("int32")),
], ids=["cnn", "text_lstm_attention"])
@pytest.mark.parametrize("prepared", [True, False])
def test_augmentation_multiplicity_clips_each_examples_mean_gradient(
    build, data, prepared):
  k, clip, lr = 3, 0.05, 0.5
  rng = np.random.default_rng(4)
  x = data(rng)
  y = np.repeat(rng.integers(0, 3, 4), k)  # 4 examples, 3 rows each
  model = build()
  if prepared:
    model = tdp.prune(model)
  expected = _augmult_reference(model, x, y, k, clip, lr)
  model.compile(tdp.MaskedDPKerasSGDOptimizer(
      clip, 0.0, learning_rate=lr, augmentation_multiplicity=k), _xent())
  model.train_on_batch(x, y)
  for v, e in zip(model.trainable_variables, expected):
    np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6,
                               err_msg=v.name)


def test_arguments_after_tf_privacys_num_microbatches_are_keyword_only():
  with pytest.raises(TypeError):
    tdp.MaskedDPKerasSGDOptimizer(1.0, 1.1, 6, 0.3)  # TF Privacy's 4th arg


def test_num_microbatches_counts_examples_with_augmult():
  x, y = _data(6)
  model = tdp.prune(_small_cnn(seed=22))
  model.compile(tdp.MaskedDPKerasSGDOptimizer(
      1.0, 0.0, num_microbatches=3, augmentation_multiplicity=2,
      learning_rate=0.1), _xent())
  model.train_on_batch(x, y)  # 6 rows = 3 examples of 2 rows


def test_layer_called_more_than_16_times_gets_its_full_gradient():
  # 16 was once the number of calls kept per layer and trace.
  def build():
    keras.utils.set_random_seed(15)
    inputs = keras.Input((4,))
    shared, h = keras.layers.Dense(4, activation="tanh"), inputs
    for _ in range(20):
      h = shared(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))
  rng = np.random.default_rng(3)
  _fast_vs_fallback(build, rng.normal(size=(8, 4)).astype("float32"),
                    rng.integers(0, 3, 8))


class _TiedLogits(keras.layers.Layer):
  """Logits from another layer's embedding matrix (a tied weight)."""

  def __init__(self, embedding, **kwargs):
    super().__init__(**kwargs)
    self.embedding = embedding

  def call(self, h):
    return tf.einsum("btd,vd->btv", h, self.embedding.embeddings)[:, 0, :3]


def test_tied_variable_gets_the_per_example_gradient_of_both_uses():
  def build():
    keras.utils.set_random_seed(16)
    tokens = keras.Input((5,), dtype="int32")
    embedding = keras.layers.Embedding(9, 4)
    return keras.Model(tokens, _TiedLogits(embedding)(embedding(tokens)))
  rng = np.random.default_rng(4)
  x = rng.integers(0, 9, (8, 5)).astype("int32")
  wrapped = tdp.prune(build())
  samplers = {s for _, _, s in tdp.pruning.report(wrapped)}
  assert samplers == {per_example_generic.GENERIC.name}  # both uses summed
  _fast_vs_fallback(build, x, rng.integers(0, 3, 8), clip=0.05)
