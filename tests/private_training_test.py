"""Keras-native DP training: Poisson input, one-call setup, sampling checks."""

import logging

import numpy as np
import pytest
from scipy import stats

import tfdpprune as tdp
from tfdpprune import accounting
from tfdpprune import data

keras = tdp.keras


def _digits():
  ds = data.load_dataset("digits")
  return ds.x_train.reshape(len(ds.x_train), -1), ds.y_train


def _mlp():
  keras.utils.set_random_seed(0)
  return keras.Sequential([keras.Input((64,)),
                           keras.layers.Dense(32, activation="relu"),
                           keras.layers.Dense(10)])


def _loss():
  return keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=keras.losses.Reduction.NONE)


def test_poisson_dataset_samples_with_q_and_carries_its_spec():
  x, y = _digits()
  ds = tdp.poisson_dataset(x, y, batch_size=100, epochs=5)
  spec = data.poisson_spec(ds)
  assert spec.num_examples == len(y) == 1437
  assert spec.sampling_probability == pytest.approx(100 / 1437)
  assert spec.num_steps == accounting.steps_for(1437, 100, 5) == 72
  sizes = [len(yb) for _, yb in ds]
  assert len(sizes) == 72 and len(set(sizes)) > 5  # sizes vary
  # Binomial(N, q) per step, two-sided.
  assert stats.binomtest(sum(sizes), 72 * 1437, 100 / 1437).pvalue > 1e-3
  with pytest.raises(ValueError, match="exactly one of epochs or steps"):
    tdp.poisson_dataset(x, y, 100)
  with pytest.raises(ValueError, match="batch_size"):
    tdp.poisson_dataset(x, y, 5000, steps=3)


def test_make_private_with_epsilon_trains_within_the_target():
  x, y = _digits()
  private = tdp.make_private_with_epsilon(
      _mlp(), x, y, target_epsilon=2.0, epochs=3, batch_size=128,
      learning_rate=0.2, momentum=0.9)
  steps = accounting.steps_for(1437, 128, 3)
  assert private.steps == steps and private.epochs == 3
  assert accounting.compute_epsilon(1437, 128, private.noise_multiplier,
                                    steps=steps) <= 2.0 + 1e-6
  assert private.optimizer.noise_multiplier == private.noise_multiplier
  assert private.optimizer.expected_batch_size == 128
  assert any(isinstance(l, tdp.PruneWrapper) for l in private.model.layers)
  private.compile(_loss(), metrics=["accuracy"])
  history = private.fit(verbose=0)
  assert int(private.optimizer.iterations.numpy()) == steps
  assert history.history["epsilon"][-1] == pytest.approx(
      private.callback.epsilon) and private.callback.epsilon <= 2.0 + 1e-6


def test_make_private_with_adam_and_pruning():
  x, y = _digits()
  private = tdp.make_private_with_epsilon(
      _mlp(), x, y, target_epsilon=3.0, epochs=1, batch_size=128,
      optimizer="adam", learning_rate=1e-3,
      prune=tdp.PruneConfig(mode="select", sparsity=0.5))
  assert isinstance(private.optimizer, tdp.MaskedDPKerasAdamOptimizer)
  private.compile(_loss())
  private.fit(verbose=0)
  assert tdp.masks.density(private.model)["overall"] < 0.8


def test_privacy_callback_warns_without_poisson_input_and_refuses_mismatch(
    caplog):
  x, y = _digits()
  model = tdp.prune(_mlp())
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.1),
                _loss())
  with caplog.at_level(logging.WARNING):
    model.fit(x, y, batch_size=128, epochs=1, verbose=0,
              callbacks=[tdp.PrivacyCallback(1437, 128, 1.0)])
  assert any("cannot confirm" in r.getMessage() for r in caplog.records)
  caplog.clear()
  batches = tdp.poisson_dataset(x, y, 128, steps=3)
  with caplog.at_level(logging.WARNING):
    model.fit(batches, verbose=0, callbacks=[
        tdp.PrivacyCallback(1437, 128, 1.0, dataset=batches)])
  assert not any("cannot confirm" in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match="q = .* over N = 1437"):
    tdp.PrivacyCallback(1437, 64, 1.0, dataset=batches)


def test_privacy_callback_refuses_augmult_mismatch_with_the_optimizer():
  x, y = _digits()
  images = x.reshape(-1, 8, 8, 1)
  keras.utils.set_random_seed(1)
  model = tdp.prune(keras.Sequential([keras.Input((8, 8, 1)),
                                      keras.layers.Flatten(),
                                      keras.layers.Dense(10)]))
  model.compile(tdp.MaskedDPKerasSGDOptimizer(1.0, 1.0, learning_rate=0.1,
                                              expected_batch_size=128),
                _loss())
  batches = tdp.poisson_dataset(images, y, 128, steps=2, augmult=4)
  with pytest.raises(ValueError, match="4 augmented rows .* is 1"):
    model.fit(batches, verbose=0, callbacks=[
        tdp.PrivacyCallback(1437, 128, 1.0, dataset=batches)])
