"""PrivacyCallback: epsilon in logs and TensorBoard, budget stop, resume."""

import glob
import os

import numpy as np
import pytest

from tfdpprune import accounting
from tfdpprune import callbacks
from tfdpprune._compat import keras
from tfdpprune._compat import tf
from tfdpprune.callbacks import PrivacyCallback

# 64 examples in batches of 8: 8 optimizer steps per epoch, q = 1/8.
N, B, SIGMA = 64, 8, 1.0


def _eps(steps):
  return accounting.compute_epsilon(N, B, SIGMA, steps=steps)


def _model(steps_per_execution=1, optimizer=None):
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
  model.compile(optimizer=optimizer or keras.optimizers.legacy.SGD(0.01),
                loss="mse", steps_per_execution=steps_per_execution)
  return model


def _data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(N, 4)).astype("float32"),
          rng.normal(size=(N, 1)).astype("float32"))


def _fit(model, callback, epochs):
  x, y = _data()
  return model.fit(x, y, batch_size=B, epochs=epochs, shuffle=False,
                   verbose=0, callbacks=[callback])


def _iterations(model):
  return int(model.optimizer.iterations.numpy())


def test_history_epsilon_equals_compute_epsilon_at_optimizer_steps():
  model, cb = _model(), PrivacyCallback(N, B, SIGMA)
  history = _fit(model, cb, epochs=3)
  assert _iterations(model) == 24
  assert history.history["epsilon"] == [_eps(8), _eps(16), _eps(24)]
  assert cb.epsilon == _eps(24)
  assert cb.max_steps is None


def test_epsilon_counts_steps_across_fits():
  model = _model()
  _fit(model, PrivacyCallback(N, B, SIGMA), epochs=2)
  # A new callback in a second fit reads the optimizer's 16 earlier steps.
  history = _fit(model, PrivacyCallback(N, B, SIGMA), epochs=1)
  assert history.history["epsilon"] == [_eps(24)]


def test_epsilon_survives_checkpoint_restore(tmp_path):
  model = _model()
  _fit(model, PrivacyCallback(N, B, SIGMA), epochs=2)
  path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
      str(tmp_path / "ckpt"))
  restored = _model()
  tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).restore(
      path)
  cb = PrivacyCallback(N, B, SIGMA)
  cb.set_model(restored)
  assert cb.steps == 16
  assert cb.epsilon == _eps(16)


def test_budget_stops_at_the_largest_step_count_within_target():
  # eps(13) = 4.388 <= target = 4.44 < eps(14) = 4.495.
  target = (_eps(13) + _eps(14)) / 2
  model, cb = _model(), PrivacyCallback(N, B, SIGMA, target_epsilon=target)
  assert cb.max_steps == 13
  history = _fit(model, cb, epochs=5)
  assert _iterations(model) == 13
  assert _eps(13) <= target < _eps(14)
  assert history.history["epsilon"] == [_eps(8), _eps(13)]


def test_budget_with_steps_per_execution_does_not_split_an_execution():
  target = (_eps(13) + _eps(14)) / 2
  model = _model(steps_per_execution=4)
  _fit(model, PrivacyCallback(N, B, SIGMA, target_epsilon=target), epochs=5)
  assert _iterations(model) == 12  # 12 + 4 > 13


def test_fit_after_budget_is_spent_raises():
  target = (_eps(13) + _eps(14)) / 2
  model, cb = _model(), PrivacyCallback(N, B, SIGMA, target_epsilon=target)
  _fit(model, cb, epochs=5)
  with pytest.raises(RuntimeError, match="budget"):
    _fit(model, cb, epochs=1)
  assert _iterations(model) == 13


def _read_scalars(log_dir):
  """{tag: [(step, value)]} and {tag: plugin names} of the event files."""
  scalars, plugins = {}, {}
  for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(
            (event.step, float(tf.make_ndarray(value.tensor))))
        if value.metadata.plugin_data.plugin_name:
          plugins.setdefault(value.tag, set()).add(
              value.metadata.plugin_data.plugin_name)
  return scalars, plugins


def test_tensorboard_gets_privacy_epsilon_at_optimizer_steps(tmp_path):
  model = _model()
  _fit(model, PrivacyCallback(N, B, SIGMA, log_dir=str(tmp_path)), epochs=2)
  scalars, plugins = _read_scalars(str(tmp_path))
  assert plugins["privacy/epsilon"] == {"scalars"}  # TensorBoard's scalars
  steps, values = zip(*sorted(scalars["privacy/epsilon"]))
  assert steps == (0, 8, 16)
  np.testing.assert_allclose(values, [0.0, _eps(8), _eps(16)], rtol=1e-6)
  assert {v for _, v in scalars["privacy/noise_multiplier"]} == {SIGMA}


def test_noise_multiplier_must_match_the_optimizers():

  class NoisySGD(keras.optimizers.legacy.SGD):
    noise_multiplier = 2.0

  model = _model(optimizer=NoisySGD(0.01))
  with pytest.raises(ValueError, match="noise_multiplier"):
    _fit(model, PrivacyCallback(N, B, SIGMA), epochs=1)


@pytest.mark.parametrize("kwargs,name", [
    (dict(delta=2.0), "delta"),
    (dict(batch_size=N + 1), "batch_size"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(target_epsilon=0.0), "target_epsilon"),
    (dict(accountant="moments"), "accountant"),
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
  args = dict(num_examples=N, batch_size=B, noise_multiplier=SIGMA)
  args.update(kwargs)
  with pytest.raises(ValueError, match=rf"\b{name}="):
    PrivacyCallback(**args)


def test_weight_averaging_updates_and_evaluates_on_the_average():
  import numpy as np  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(3)
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  averaging = callbacks.WeightAveraging(decay=0.5).build(model)
  kernel, bias = model.trainable_variables
  start = kernel.numpy().copy()
  kernel.assign(kernel + 1.0)
  averaging.on_train_batch_end(0)   # t=0: d = min(0.5, 1/10) = 0.1
  expected = 0.1 * start + 0.9 * (start + 1.0)
  np.testing.assert_allclose(averaging.state.shadow[0].numpy(), expected,
                             rtol=1e-6)
  kernel.assign(kernel + 1.0)
  averaging.on_train_batch_end(1)   # t=1: d = min(0.5, 2/11)
  d = 2 / 11
  expected = d * expected + (1 - d) * (start + 2.0)
  np.testing.assert_allclose(averaging.state.shadow[0].numpy(), expected,
                             rtol=1e-6)
  with averaging.swapped():
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-6)
  np.testing.assert_allclose(kernel.numpy(), start + 2.0, rtol=1e-6)
  with pytest.raises(ValueError, match="decay"):
    callbacks.WeightAveraging(decay=1.0)


# -- the released update must not reveal the realized batch size -------------


def test_noise_scale_is_sigma_c_over_expected_batch_not_realized():
  """An adversary reading one released update estimates the noise std from
  coordinates the private data do not move. Dividing by the realized
  Poisson batch |B_t| (about 20 +- 4.4 here) would make that std
  sigma C / |B_t| and reveal |B_t|; it must be sigma C / E[B] at every step.
  """
  from tfdpprune import private_training  # pylint: disable=g-import-not-at-top
  from tfdpprune.optimizer import MaskedDPKerasSGDOptimizer  # pylint: disable=g-import-not-at-top
  n, b, sigma, width = 1000, 20, 2.0, 4000
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(
      width, use_bias=False, kernel_initializer="zeros")])
  # No expected_batch_size: the docstring case the red team attacked.
  optimizer = MaskedDPKerasSGDOptimizer(1.0, sigma, learning_rate=1.0)
  model.compile(optimizer, loss=keras.losses.MeanSquaredError(
      reduction=keras.losses.Reduction.NONE))
  x = np.zeros([n, 1], np.float32)  # zero inputs: zero kernel gradients
  batches = private_training.poisson_dataset(x, np.ones([n, 1], np.float32),
                                             b, steps=12)
  kernels = []
  record = keras.callbacks.LambdaCallback(
      on_train_batch_end=lambda *_: kernels.append(
          model.layers[0].kernel.numpy().copy()))
  model.fit(batches, verbose=0, callbacks=[
      PrivacyCallback(n, b, sigma, dataset=batches), record])
  previous = np.zeros([1, width], np.float32)
  stds = []
  for kernel in kernels:
    stds.append(float(np.std(kernel - previous)))
    previous = kernel
  ratio = np.array(stds) * b / sigma  # 1 +- 1/sqrt(2 * 4000) = 1.1 %
  assert len(ratio) == 12
  assert np.all(np.abs(ratio - 1.0) < 0.06), ratio  # > 5 standard errors
  assert optimizer.expected_batch_size == b


def test_tf_privacy_optimizer_dividing_by_realized_batch_is_refused():
  from tfdpprune.keras2 import compat  # pylint: disable=g-import-not-at-top
  optimizer = compat.DPKerasSGDOptimizer(
      l2_norm_clip=1.0, noise_multiplier=SIGMA, num_microbatches=None,
      learning_rate=0.01)
  model = _model(optimizer=optimizer)
  with pytest.raises(ValueError, match="realized batch size"):
    _fit(model, PrivacyCallback(N, B, SIGMA), epochs=1)


# -- truncated Poisson batches -------------------------------------------------


def test_truncating_input_at_the_expected_size_is_refused():
  from tfdpprune import private_training  # pylint: disable=g-import-not-at-top
  x, y = _data()
  batches = private_training.poisson_dataset(x, y, B, steps=80,
                                             max_batch_size=B)
  assert batches.poisson_spec.max_batch_size == B
  with pytest.raises(ValueError, match=r"max_batch_size=8.*more than half"):
    PrivacyCallback(N, B, SIGMA, dataset=batches)


def test_truncation_is_added_to_delta_by_the_stated_bound():
  from scipy import stats  # pylint: disable=g-import-not-at-top
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from tfdpprune import private_training  # pylint: disable=g-import-not-at-top
  n, b, steps, delta, cap = 10000, 100, 500, 1e-5, 185
  x = np.zeros([n, 1], np.float32)
  batches = private_training.poisson_dataset(x, np.zeros([n], np.float32), b,
                                             steps=steps, max_batch_size=cap)
  cb = PrivacyCallback(n, b, SIGMA, delta=delta, dataset=batches)

  def rdp_epsilon(at_delta):  # an independent accountant call
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            b / n, dp_accounting.GaussianDpEvent(SIGMA)), steps))
    return accountant.get_epsilon(at_delta)
  p = stats.binom.sf(cap, n + 1, b / n)  # N + 1: the larger neighbour
  spent = (1 + np.exp(rdp_epsilon(delta / 2))) * steps * p
  assert 0 < spent < delta / 2
  assert cb.spec.truncation_delta(steps) == pytest.approx(spent, rel=1e-9)
  assert cb.spec.epsilon(steps) == pytest.approx(
      rdp_epsilon(delta - spent), rel=1e-9)
  assert cb.spec.epsilon(steps) > accounting.compute_epsilon(
      n, b, SIGMA, steps=steps, delta=delta)


def test_prior_steps_count_in_epsilon():
  model, cb = _model(), PrivacyCallback(N, B, SIGMA, prior_steps=5)
  history = _fit(model, cb, epochs=1)
  assert history.history["epsilon"] == [_eps(13)]
  with pytest.raises(ValueError, match="prior_steps"):
    PrivacyCallback(N, B, SIGMA, prior_steps=-1)
