"""Scale: physical batches (noise once), static shapes for XLA, and mixed
precision, on Keras 3 and Keras 2 private models."""

import keras
import numpy as np
import pytest

import tfdpprune as tdp
from tfdpprune import accounting
from tfdpprune import experiment
from tfdpprune import pruning
from tfdpprune._compat import tf
from tfdpprune.config import TrainConfig

K2 = tdp.keras
B = 12


def _images(n=B, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 6, 6, 1)).astype("float32"),
          rng.integers(0, 3, size=n))


def _private(module, *, physical=None, augmult=1, sigma=0.0, clip=0.3,
             seed=0, jit=False, optimizer=None):
  module.utils.set_random_seed(seed)
  model = tdp.prune(module.Sequential([
      module.Input((6, 6, 1)),
      module.layers.Conv2D(3, 3, activation="tanh", name="conv"),
      module.layers.Flatten(),
      module.layers.Dense(3, name="logits")]),
                    tdp.PruneConfig(mode="select", method="random",
                                    sparsity=0.5, every_k_steps=1))
  private = tdp.make_private(model, l2_norm_clip=clip, noise_multiplier=sigma,
                             expected_batch_size=B, noise_seed=3,
                             augmentation_multiplicity=augmult,
                             physical_batch_size=physical)
  private.compile(
      optimizer=optimizer or module.optimizers.Adam(0.05),
      loss=module.losses.SparseCategoricalCrossentropy(from_logits=True),
      jit_compile=jit)
  return private


def _train(private, batches):
  for batch in batches:
    private.train_on_batch(*batch)
  return [v.numpy() for v in private.trainable_variables]


@pytest.mark.parametrize("module", [keras, K2], ids=["keras3", "keras2"])
@pytest.mark.parametrize("augmult", [1, 2])
def test_physical_batches_equal_the_unsplit_step(module, augmult):
  """Masks re-drawn every step, Adam, noise (the same noise seed: noise is
  keyed by the step, drawn once per logical batch) and K augmented rows per
  example: chunks of 1, 5 and 12 examples give the unsplit step's weights;
  a batch of 11 examples chunks unevenly."""
  x, y = _images()
  rows = (np.repeat(x, augmult, axis=0), np.repeat(y, augmult))
  batches = [rows, (rows[0][:11 * augmult], rows[1][:11 * augmult])]
  reference = _train(_private(module, augmult=augmult, sigma=0.7), batches)
  for physical in (1, 5, 12):
    got = _train(_private(module, physical=physical, augmult=augmult,
                          sigma=0.7), batches)
    for a, b in zip(got, reference):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_empty_logical_batch_is_a_noise_only_step():
  sigma, clip, width = 1.3, 0.7, 20000
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(
      width, use_bias=False, kernel_initializer="zeros")])
  private = tdp.make_private(model, l2_norm_clip=clip, noise_multiplier=sigma,
                             expected_batch_size=10, physical_batch_size=4)
  private.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.MeanSquaredError())
  private.train_on_batch(np.zeros([0, 1], np.float32),
                         np.zeros([0, width], np.float32))
  assert int(private.iterations.numpy()) == 1
  std = float(np.std(model.trainable_variables[0].numpy()))
  target = sigma * clip / 10
  assert 0.95 * target < std < 1.05 * target  # rejects 2/3 and 3/2 of it


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_padding_rows_contribute_exactly_nothing(jit):
  # (XLA draws other random select masks than the CPU kernels: the
  # reference runs the same way.)
  x, y = _images()
  reference = _train(_private(keras, jit=jit), [(x[:9], y[:9])])
  padded_x = np.concatenate([x[:9], np.zeros((7, 6, 6, 1), np.float32)])
  padded_y = np.concatenate([y[:9], np.zeros(7, np.int64)])
  weights = np.concatenate([np.ones(9), np.zeros(7)]).astype("float32")
  private = _private(keras, physical=4, jit=jit)
  private.train_on_batch(padded_x, padded_y, sample_weight=weights)
  for a, b in zip([v.numpy() for v in private.trainable_variables],
                  reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_static_capacity_compiles_once_and_accounts_its_truncation():
  n, b, steps = 600, 60, 12
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 6, 6, 1)).astype("float32")
  y = rng.integers(0, 3, size=n)
  cap = accounting.poisson_capacity(n, b / n, multiple=16)
  assert cap % 16 == 0 and accounting.poisson_truncation_probability(
      n + 1, b / n, cap) < 1e-12
  batches = tdp.poisson_dataset(x, y, b, steps=steps, pad_to=cap)
  assert batches.element_spec[0].shape == (cap, 6, 6, 1)
  assert batches.poisson_spec.max_batch_size == cap
  private = _private(keras, physical=16, jit=True, sigma=1.0)
  traces = []
  step = private.train_step
  private.train_step = lambda data: (traces.append(1), step(data))[1]
  callback = tdp.PrivacyCallback(n, b, 1.0, dataset=batches)
  private.fit(batches, verbose=0, callbacks=[callback], shuffle=False)
  assert int(private.iterations.numpy()) == steps
  assert 0 < len(traces) <= 2  # Keras traces its step function once or twice
  # The truncation at the capacity is paid in delta, and tiny.
  spent = callback.spec.truncation_delta(steps)
  assert 0 < spent < 1e-3 * 1e-5
  assert callback.epsilon >= accounting.compute_epsilon(n, b, 1.0,
                                                        steps=steps)


# -- mixed precision -----------------------------------------------------------


@pytest.fixture
def policy():
  """Sets a global dtype policy in both Kerases; restores float32."""
  def set_policy(name):
    keras.mixed_precision.set_global_policy(name)
    K2.mixed_precision.set_global_policy(name)
  yield set_policy
  set_policy("float32")


@pytest.mark.parametrize("module", [keras, K2], ids=["keras3", "keras2"])
@pytest.mark.parametrize("name", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_step_matches_float32(policy, module, name):
  x, y = _images()
  reference = _train(_private(module, physical=5), [(x, y)])
  policy(name)
  private = _private(module, physical=5)
  assert private.model.compute_dtype in ("bfloat16", "float16")
  got = _train(private, [(x, y)])
  scale = max(float(np.abs(r).max()) for r in reference)
  for a, b in zip(got, reference):
    assert a.dtype == np.float32  # float32 variables, sums and noise
    assert float(np.abs(a - b).max()) < 2e-2 * scale
  if name == "mixed_float16":
    assert type(private.optimizer).__name__.startswith("LossScaleOptimizer")
    assert private._loss_scale() == 2.0 ** 10  # pylint: disable=protected-access


def test_float16_overflow_gets_coefficient_zero_never_a_skipped_step(policy):
  x, y = _images()
  keep = np.arange(B) != 4
  reference = _train(_private(keras), [(x[keep], y[keep])])
  policy("mixed_float16")
  huge = x.copy()
  huge[4] = 1e5  # overflows float16 (max 65504)
  private = _private(keras)
  scale = float(private.optimizer.dynamic_scale.numpy()) if hasattr(
      private.optimizer, "dynamic_scale") else None
  got = _train(private, [(huge, y)])
  assert int(private.iterations.numpy()) == 1  # the step was taken
  for a, b in zip(got, reference):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=2e-3)
  if scale is not None:  # the dynamic scale (private) never moved
    assert float(private.optimizer.dynamic_scale.numpy()) == scale


def test_keras2_optimizer_under_a_loss_scale_is_refused_with_the_fix(policy):
  policy("mixed_float16")
  model = tdp.prune(K2.Sequential([K2.Input((6,)), K2.layers.Dense(
      3, dtype="float32")]))
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, expected_batch_size=8),
                K2.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction="none"))
  with pytest.raises(ValueError, match=r"LossScaleOptimizer.*tdp.make_priv"):
    model.train_on_batch(np.zeros((8, 6), np.float32), np.arange(8) % 3)


# -- the trainer ---------------------------------------------------------------


def test_trainer_physical_batches_and_xla_keep_the_ledger_and_epsilon(
    tmp_path):
  common = dict(steps=11, noise_multiplier=1.0, keras=3)
  plain = experiment.run(TrainConfig(**common), str(tmp_path / "a"),
                         verbose=0)
  chunked = experiment.run(TrainConfig(physical_batch_size=16, **common),
                           str(tmp_path / "b"), verbose=0)
  assert chunked["epsilon"] == plain["epsilon"]
  assert chunked["ledger"] == plain["ledger"]
  xla = experiment.run(TrainConfig(physical_batch_size=16, jit_compile=True,
                                   **common), str(tmp_path / "c"), verbose=0)
  cap = xla["batch_capacity"]
  assert cap % 16 == 0 and cap > 128
  spec = accounting.PrivacySpec(xla["num_examples"], 128, 1.0,
                                max_batch_size=cap)
  assert xla["epsilon"] == pytest.approx(spec.epsilon(11))
  assert xla["epsilon"] >= plain["epsilon"]
  with pytest.raises(ValueError, match="mixed_precision"):
    TrainConfig(mixed_precision="float8")


def _text_model(module):
  module.utils.set_random_seed(1)
  tokens = module.Input((6,), dtype="int32")
  h = module.layers.Embedding(20, 8)(tokens)
  h = module.layers.Bidirectional(module.layers.LSTM(4, return_sequences=True))(
      h)
  h = module.layers.MultiHeadAttention(2, 4)(h, h)
  h = module.layers.LayerNormalization()(h)
  h = module.layers.GlobalAveragePooling1D()(h)
  return module.Model(tokens, module.layers.Dense(3)(h))


def _conv_model(module):
  module.utils.set_random_seed(2)
  return module.Sequential([
      module.Input((8, 8, 2)),
      module.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
      module.layers.DepthwiseConv2D(3, padding="same"),
      module.layers.GroupNormalization(2),
      module.layers.Flatten(), module.layers.Dense(3)])


@pytest.mark.parametrize("build,x", [
    (_text_model, np.random.default_rng(0).integers(0, 20, (8, 6))),
    (_conv_model, np.random.default_rng(0).normal(size=(8, 8, 8, 2)))],
                         ids=["text", "conv"])
@pytest.mark.parametrize("path", ["keras3", "keras2_private",
                                  "keras2_optimizer"])
def test_xla_step_equals_the_graph_step(build, x, path):
  """Noiseless (XLA draws other random bits), every sampler family of the
  model set on the XLA-compiled DP step of each path."""
  module = keras if path == "keras3" else K2
  y = np.arange(8) % 3
  x = x.astype("int32" if x.dtype.kind == "i" else "float32")
  updates = []
  for jit in (False, True):
    model = build(module)
    start = [v.numpy() for v in model.trainable_variables]
    if path == "keras2_optimizer":
      model = tdp.prune(model)
      model.compile(tdp.MaskedDPKerasSGDOptimizer(
          0.5, 0.0, learning_rate=1.0, expected_batch_size=8),
                    K2.losses.SparseCategoricalCrossentropy(
                        from_logits=True, reduction="none"), jit_compile=jit)
    else:
      model = tdp.make_private(model, l2_norm_clip=0.5, noise_multiplier=0.0,
                               expected_batch_size=8, physical_batch_size=4)
      model.compile(optimizer=module.optimizers.SGD(1.0),
                    loss=module.losses.SparseCategoricalCrossentropy(
                        from_logits=True), jit_compile=jit)
    model.train_on_batch(x, y)
    updates.append([v.numpy() - s for v, s in
                    zip(model.trainable_variables, start)])
  for a, b in zip(*updates):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert max(float(np.abs(u).max()) for u in updates[1]) > 1e-4
