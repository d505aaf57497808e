"""`tdp.make_private` on Keras 3 (and Keras 2) models: the DP step against
independent references, masks with any optimizer, state, and refusals."""

import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tfdpprune as tdp
from tfdpprune import accounting
from tfdpprune import frontends
from tfdpprune import pruning
from tfdpprune._compat import tf
from tests import keras3_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K2 = tdp.keras


def _loss():
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mlp(keras_module=keras, seed=0, width=8):
  keras_module.utils.set_random_seed(seed)
  return keras_module.Sequential([
      keras_module.Input((6,)),
      keras_module.layers.Dense(width, activation="tanh", name="hidden"),
      keras_module.layers.Dense(3, name="logits")])


def _data(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 6)).astype("float32"),
          rng.integers(0, 3, size=n))


# -- per-example gradients of every sampler against a one-example loop ------


@pytest.mark.parametrize("onednn", ["0", "1"])
@pytest.mark.parametrize("mode", ["eager", "graph", "jit"])
def test_every_keras3_sampler_matches_a_one_example_loop(mode, onednn):
  env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn,
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "-m", "tests.keras3_families", mode], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
  results = json.loads(line[-1][len("RESULTS "):])
  expected = {name: sampler for name, _, _, sampler in
              keras3_families.families()}
  assert set(results) == set(expected)
  for name, (error, samplers) in results.items():
    assert error < 1e-4, (name, error)
    assert any(s.startswith(expected[name]) for s in samplers), (name,
                                                                 samplers)


def test_keras2_private_model_matches_a_one_example_loop():
  model = _mlp(K2)
  x, y = _data(8)
  variables = model.trainable_variables
  grads = []
  for i in range(len(y)):
    with tf.GradientTape() as tape:
      loss = K2.losses.SparseCategoricalCrossentropy(from_logits=True)(
          y[i:i + 1], model(x[i:i + 1]))
    grads.append([g.numpy() for g in tape.gradient(loss, variables)])
  norms = np.sqrt([sum(np.sum(g ** 2) for g in gs) for gs in grads])
  clip = float(np.median(norms))
  coef = np.minimum(1.0, clip / norms)
  expected = [sum(c * gs[j] for c, gs in zip(coef, grads)) / len(y)
              for j in range(len(variables))]
  private = tdp.make_private(model, l2_norm_clip=clip, noise_multiplier=0.0,
                             expected_batch_size=len(y))
  private.compile(optimizer=K2.optimizers.SGD(1.0),
                  loss=K2.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  before = [v.numpy() for v in variables]
  private.train_on_batch(x, y)
  for v, b, e in zip(variables, before, expected):
    np.testing.assert_allclose(v.numpy() - b, -e, rtol=1e-4, atol=1e-6)


def test_keras2_and_keras3_give_the_same_clipped_sum():
  x, y = _data(16)
  updates = []
  for keras_module in (K2, keras):
    model = _mlp(keras_module)
    if updates:  # the same weights as the Keras 2 model
      for v, w in zip(model.trainable_variables, weights):
        v.assign(w)
    weights = [v.numpy() for v in model.trainable_variables]
    private = tdp.make_private(model, l2_norm_clip=0.3, noise_multiplier=0.0,
                               expected_batch_size=16)
    private.compile(optimizer=keras_module.optimizers.SGD(1.0),
                    loss=keras_module.losses.SparseCategoricalCrossentropy(
                        from_logits=True))
    private.train_on_batch(x, y)
    updates.append([v.numpy() - w for v, w in
                    zip(model.trainable_variables, weights)])
  for a, b in zip(*updates):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert max(float(np.abs(u).max()) for u in updates[0]) > 1e-3


# -- noise ---------------------------------------------------------------------


@pytest.mark.parametrize("keras_module", [keras, K2], ids=["keras3",
                                                           "keras2"])
def test_noise_std_is_sigma_c_over_expected_batch(keras_module):
  """Zero inputs give zero gradients: one SGD(1) step moves each of 20,000
  coordinates by noise / B. Two-sided: the interval holds sigma C / B and
  excludes 2/3 and 3/2 of it."""
  sigma, clip, b, width = 1.3, 0.7, 10, 20000
  model = keras_module.Sequential([
      keras_module.Input((1,)), keras_module.layers.Dense(
          width, use_bias=False, kernel_initializer="zeros")])
  private = tdp.make_private(model, l2_norm_clip=clip,
                             noise_multiplier=sigma, expected_batch_size=b)
  private.compile(optimizer=keras_module.optimizers.SGD(1.0),
                  loss=keras_module.losses.MeanSquaredError())
  private.train_on_batch(np.zeros([7, 1], np.float32),  # 7 realized rows
                         np.zeros([7, width], np.float32))
  std = float(np.std(model.trainable_variables[0].numpy()))
  target = sigma * clip / b
  low, high = 0.95 * target, 1.05 * target   # ~7 standard errors each side
  assert low < std < high
  assert not low < 2 / 3 * target < high and not low < 1.5 * target < high
  # Dividing by the realized 7 rows would give 10/7 of the target.
  assert not low < target * b / 7 < high


# -- masks: unselected coordinates and their optimizer state stay still -----


@pytest.mark.parametrize("optimizer", [
    lambda: keras.optimizers.Adam(0.05),
    lambda: keras.optimizers.AdamW(0.05, weight_decay=0.5),
    lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    lambda: keras.optimizers.Lion(0.05),
    lambda: keras.optimizers.RMSprop(0.05, momentum=0.5)],
                         ids=["adam", "adamw", "sgd", "lion", "rmsprop"])
@pytest.mark.parametrize("mode", ["freeze", "select"])
def test_masked_coordinates_and_state_do_not_move(optimizer, mode):
  config = tdp.PruneConfig(mode=mode, method="random", sparsity=0.5,
                           weights="all",
                           every_k_steps=1000 if mode == "select" else None)
  model = tdp.prune(_mlp(), config)
  private = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0,
                             expected_batch_size=8)
  private.compile(optimizer=optimizer(), loss=_loss())
  x, y = _data(32)
  private.fit(x, y, batch_size=8, epochs=1, verbose=0)  # builds the slots
  opt = private.optimizer
  from tfdpprune.keras3 import masked_update  # pylint: disable=g-import-not-at-top
  state = {}
  for w in pruning.wrappers(private):
    for role, var in w.roles().items():
      state[var.path] = (w.mask(role).numpy(), var.numpy().copy(), [
          s.numpy().copy() for s in masked_update.slots(opt, var)])
  private.fit(x, y, batch_size=8, epochs=2, verbose=0)
  moved = 0
  for w in pruning.wrappers(private):
    for role, var in w.roles().items():
      mask, value, slots = state[var.path]
      frozen = mask == 0
      assert frozen.any() and (~frozen).any()
      np.testing.assert_array_equal(var.numpy()[frozen], value[frozen])
      for s, old in zip(masked_update.slots(opt, var), slots):
        np.testing.assert_array_equal(s.numpy()[frozen], old[frozen])
      moved += int(np.sum(var.numpy()[~frozen] != value[~frozen]))
  assert moved > 0


def test_fully_frozen_variable_is_left_out_of_the_step():
  config = tdp.PruneConfig(mode="freeze", granularity="layer", scope="global",
                           layers="hidden", sparsity=0.99, weights="all")
  model = tdp.prune(_mlp(), config)
  frozen = [v.numpy().copy() for v in model.get_layer(
      "prune_hidden").layer.trainable_variables]
  private = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0,
                             expected_batch_size=8)
  private.compile(optimizer=keras.optimizers.AdamW(0.1, weight_decay=0.5),
                  loss=_loss())
  private.fit(*_data(16), batch_size=8, verbose=0)
  for v, old in zip(model.get_layer("prune_hidden").layer.trainable_variables,
                    frozen):
    np.testing.assert_array_equal(v.numpy(), old)


# -- accounting and callbacks --------------------------------------------------


def test_privacy_callback_epsilon_equals_compute_epsilon():
  x, y = _data(64)
  private = tdp.make_private(_mlp(), l2_norm_clip=1.0, noise_multiplier=1.1,
                             expected_batch_size=8)
  private.compile(optimizer=keras.optimizers.SGD(0.1), loss=_loss())
  batches = tdp.poisson_dataset(x, y, batch_size=8, steps=24)
  callback = tdp.PrivacyCallback(64, 8, 1.1, dataset=batches)
  history = private.fit(batches, epochs=3, steps_per_epoch=8,
                        callbacks=[callback], verbose=0)
  assert int(private.iterations.numpy()) == 24
  assert history.history["epsilon"] == [
      accounting.compute_epsilon(64, 8, 1.1, steps=s) for s in (8, 16, 24)]
  assert callback.epsilon == accounting.compute_epsilon(64, 8, 1.1, steps=24)


def test_make_private_with_epsilon_takes_keras3_and_a_standard_loss():
  x, y = _data(128)
  private = tdp.make_private_with_epsilon(
      _mlp(), x, y, target_epsilon=3.0, epochs=2, batch_size=16,
      learning_rate=0.1, momentum=0.9)
  private.compile(_loss(), metrics=["accuracy"])
  private.fit(validation_data=(x, y), verbose=0)
  assert private.callback.epsilon <= 3.0
  assert int(private.model.iterations.numpy()) == private.steps
  assert frontends.of(private.model).name == "keras3"


# -- state: .keras files and checkpoints keep masks and steps, no key --------


def test_keras_file_and_checkpoint_keep_masks_and_steps_without_the_key(
    tmp_path, drawn_keys, key_files_holding):
  config = tdp.PruneConfig(mode="select", method="random", sparsity=0.7,
                           every_k_steps=3)
  model = tdp.prune(_mlp(), config)
  private = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0,
                             expected_batch_size=8)
  private.compile(optimizer=keras.optimizers.Adam(0.01), loss=_loss())
  x, y = _data(64)
  batches = tdp.poisson_dataset(x, y, batch_size=8, steps=7)
  private.fit(batches, verbose=0)
  assert len(drawn_keys) == 2  # noise and sampling, from OS entropy
  masks = [w.select_masks["kernel"].numpy() for w in pruning.wrappers(
      private)]
  path = str(tmp_path / "private.keras")
  private.save(path)
  checkpoint = tf.train.Checkpoint(model=private)
  prefix = checkpoint.save(str(tmp_path / "ckpt" / "ckpt"))
  loaded = keras.models.load_model(path)
  assert int(loaded.iterations.numpy()) == 7
  assert loaded.noise_multiplier == 1.0 and loaded.expected_batch_size == 8
  for w, m in zip(pruning.wrappers(loaded), masks):
    np.testing.assert_array_equal(w.select_masks["kernel"].numpy(), m)
  restored = tdp.make_private(tdp.prune(_mlp(seed=5), config),
                              l2_norm_clip=1.0, noise_multiplier=1.0,
                              expected_batch_size=8)
  tf.train.Checkpoint(model=restored).restore(prefix).expect_partial()
  assert int(restored.iterations.numpy()) == 7
  for w, m in zip(pruning.wrappers(restored), masks):
    np.testing.assert_array_equal(w.select_masks["kernel"].numpy(), m)
  # An attacker's search of every file written: no key, any encoding.
  assert key_files_holding(str(tmp_path), drawn_keys) == []
  # A loaded model draws a fresh noise key, which no file holds either.
  loaded.compile(optimizer=keras.optimizers.Adam(0.01), loss=_loss())
  loaded.train_on_batch(x[:8], y[:8])
  assert len(drawn_keys) >= 3 and key_files_holding(str(tmp_path),
                                                    drawn_keys) == []
  plain = tdp.strip(loaded)
  assert not pruning.wrappers(plain)
  np.testing.assert_allclose(plain(x), loaded(x), rtol=1e-5, atol=1e-6)


# -- refusals --------------------------------------------------------------------


def test_batch_normalization_is_refused_naming_it():
  model = keras.Sequential([keras.Input((6,)),
                            keras.layers.BatchNormalization(name="bn"),
                            keras.layers.Dense(3)])
  with pytest.raises(ValueError, match=r"'bn'.*BatchNormalization"):
    tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0,
                     expected_batch_size=8)
  assert [p.layer for p in tdp.validate(model)] == ["bn"]


def test_other_keras_backend_is_refused_with_the_fix(monkeypatch):
  monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
  with pytest.raises(ValueError, match=r"'jax'.*KERAS_BACKEND=tensorflow"):
    tdp.prune(_mlp())


def test_missing_expected_batch_size_is_refused():
  with pytest.raises(ValueError, match="expected_batch_size"):
    tdp.make_private(_mlp(), l2_norm_clip=1.0, noise_multiplier=1.0,
                     expected_batch_size=None)


def test_non_finite_example_gets_coefficient_zero():
  x, y = _data(8)
  model = _mlp()
  private = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=0.0,
                             expected_batch_size=8)
  private.compile(optimizer=keras.optimizers.SGD(1.0), loss=_loss())
  before = [v.numpy() for v in model.trainable_variables]
  bad = x.copy()
  bad[3] = np.nan
  private.train_on_batch(bad, y)
  after_bad = [v.numpy() for v in model.trainable_variables]
  for v, b in zip(model.trainable_variables, before):
    v.assign(b)
  keep = np.arange(8) != 3
  reference = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=0.0,
                               expected_batch_size=8)
  reference.compile(optimizer=keras.optimizers.SGD(1.0), loss=_loss())
  reference.train_on_batch(x[keep], y[keep])
  for a, v in zip(after_bad, model.trainable_variables):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, v.numpy(), rtol=1e-5, atol=1e-7)


def test_subclassed_model_uses_the_exact_fallback():

  class Net(keras.Model):

    def __init__(self):
      super().__init__()
      self.hidden = keras.layers.Dense(5, activation="tanh")
      self.out = keras.layers.Dense(3)

    def call(self, x):
      return self.out(self.hidden(x))

  x, y = _data(6)
  net = Net()
  net(x)
  _, norms = keras3_families.loop_clipped_mean(net, x, y, 1.0)
  clip = float(np.median(norms))
  expected, _ = keras3_families.loop_clipped_mean(net, x, y, clip)
  private = tdp.make_private(net, l2_norm_clip=clip, noise_multiplier=0.0,
                             expected_batch_size=6)
  private.compile(optimizer=keras.optimizers.SGD(1.0), loss=_loss())
  before = [v.numpy() for v in net.trainable_variables]
  private.train_on_batch(x, y)
  for v, b, e in zip(net.trainable_variables, before, expected):
    np.testing.assert_allclose(v.numpy() - b, -e, rtol=1e-4, atol=1e-6)


def test_keras3_select_masks_are_the_public_stream_independent_of_sampling():
  """The Keras 3 step re-draws select masks from the same public stream as
  Keras 2 (`masks.compute_masks`, keyed by the PruneConfig seed and the
  draw), which randomness_test shows independent of Poisson sampling."""
  from tfdpprune import masks  # pylint: disable=g-import-not-at-top
  config = tdp.PruneConfig(mode="select", method="random", sparsity=0.5,
                           every_k_steps=1, seed=0)
  model = tdp.prune(_mlp(), config)
  private = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.0,
                             expected_batch_size=8)
  private.compile(optimizer=keras.optimizers.SGD(0.1), loss=_loss())
  x, y = _data(8)
  wrappers = pruning.wrappers(private)
  for step in range(3):
    private.train_on_batch(x, y)  # re-draw `step` happens in step `step`
    kernels = [w.roles()["kernel"] for w in wrappers]
    expected = masks.compute_masks(config, kernels, draw=step)
    for w, m in zip(wrappers, expected):
      np.testing.assert_array_equal(w.select_masks["kernel"].numpy(),
                                    m.numpy())


def test_keras3_resume_with_changed_privacy_flags_is_refused(tmp_path):
  from tfdpprune import experiment  # pylint: disable=g-import-not-at-top
  from tfdpprune import ledger  # pylint: disable=g-import-not-at-top
  from tfdpprune.config import TrainConfig  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  experiment.run(TrainConfig(steps=3, noise_multiplier=1.0, keras=3),
                 workdir, verbose=0)
  with pytest.raises(ledger.LedgerMismatch,
                     match="--noise_multiplier: 1.0 in the checkpoint, 2.0"):
    experiment.run(TrainConfig(steps=3, noise_multiplier=2.0, keras=3),
                   workdir, verbose=0)


def test_a_saved_private_model_loads_in_a_fresh_process(tmp_path):
  path = str(tmp_path / "private.keras")
  private = tdp.make_private(
      tdp.prune(_mlp(), tdp.PruneConfig(mode="freeze", sparsity=0.5)),
      l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=8)
  private.compile(optimizer=keras.optimizers.SGD(0.1), loss=_loss())
  private.train_on_batch(*_data(8))
  private.save(path)
  density = tdp.masks.density(private)["overall"]
  code = ("import keras, tfdpprune as tdp\n"
          f"m = keras.models.load_model({path!r})\n"
          "print('LOADED', type(m).__name__, int(m.iterations.numpy()), "
          "tdp.masks.density(m)['overall'])")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("LOADED")][0]
  assert line.split()[1:3] == ["PrivateModel", "1"]
  assert float(line.split()[3]) == pytest.approx(density)
