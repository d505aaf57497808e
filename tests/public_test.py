"""Public data for masks: stateless batches, reading datasets, gradients."""

import numpy as np
import pytest

from tfdpprune import public
from tfdpprune import randomness
from tfdpprune._compat import keras
from tfdpprune._compat import tf


def _batches(n=10, batch_size=3, seed=0):
  x = np.arange(n, dtype="float32")[:, None]
  return public.PublicBatches(
      x, np.arange(n), batch_size,
      randomness.derived_key(seed, randomness.PUBLIC_BATCHES))


def test_batch_i_is_a_function_of_the_key_and_i():
  b = _batches()
  assert b.batches_per_epoch == 3  # 10 // 3; one example skipped per epoch
  epochs = [np.concatenate([b.indices(e * 3 + i).numpy() for i in range(3)])
            for e in range(3)]
  for e in epochs:
    assert len(set(e)) == 9 and set(e) <= set(range(10))  # no repeats
  assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch
  # Stateless: the same index gives the same batch, in any order of calls,
  # from a fresh object, in graph as eagerly.
  again = _batches()
  np.testing.assert_array_equal(again.indices(4), b.indices(4))
  np.testing.assert_array_equal(
      tf.function(lambda i: again.indices(i))(tf.constant(4, tf.int64)),
      b.indices(4))
  x, y = b.batch(4)
  np.testing.assert_array_equal(x.numpy()[:, 0], b.indices(4).numpy())
  np.testing.assert_array_equal(y, b.indices(4))
  assert not np.array_equal(_batches(seed=1).indices(4), b.indices(4))


def test_small_public_sets_give_one_full_batch():
  b = _batches(n=2, batch_size=5)
  assert (b.batch_size, b.batches_per_epoch) == (2, 1)
  assert sorted(b.indices(7).numpy()) == [0, 1]


def test_as_arrays_reads_pairs_and_datasets_of_batches_or_examples():
  x = np.arange(12, dtype="float32").reshape(6, 2)
  y = np.arange(6)
  pairs = tf.data.Dataset.from_tensor_slices((x, y))
  for given in [(x, y), pairs, pairs.batch(4)]:
    gx, gy = public.as_arrays(given)
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)
  with pytest.raises(ValueError, match="public_data is required"):
    public.as_arrays(None)
  with pytest.raises(ValueError, match="as many labels"):
    public.as_arrays((x, y[:3]))


def test_scorer_gradient_is_the_mean_over_its_batch():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
  x = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
  y = np.arange(8) % 3
  batches = public.PublicBatches(x, y, 4, (1, 2))
  scorer = public.PublicScorer(model, batches)
  grads = scorer.gradients(model.trainable_variables, 5)
  # Reference: one example at a time, averaged.
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  expected = [np.zeros(v.shape) for v in model.trainable_variables]
  for i in batches.indices(5).numpy():
    with tf.GradientTape() as tape:
      value = loss(y[i:i + 1], model(x[i:i + 1]))
    for e, g in zip(expected, tape.gradient(value,
                                            model.trainable_variables)):
      e += g.numpy() / 4
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_endless_public_dataset_is_refused_within_seconds():
  import threading  # pylint: disable=g-import-not-at-top
  from tfdpprune import pruning  # pylint: disable=g-import-not-at-top
  from tfdpprune.config import PruneConfig  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).random((64, 4)).astype("float32")
  y = np.arange(64) % 2
  endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  outcome = []

  def call():
    try:
      pruning.prune(model, PruneConfig(mode="select",
                                       method="public_gradient"),
                    public_data=endless)
      outcome.append("returned")
    except ValueError as e:
      outcome.append(str(e))
  thread = threading.Thread(target=call, daemon=True)
  thread.start()
  thread.join(timeout=60)  # it used to read forever (18 GB)
  assert outcome and "infinite" in outcome[0] and "take(n)" in outcome[0]


def test_unknown_length_public_dataset_is_read_with_a_bound():
  def forever():
    while True:
      yield np.zeros(256, np.float32), np.int64(0)
  stream = tf.data.Dataset.from_generator(forever, output_signature=(
      tf.TensorSpec([256], tf.float32), tf.TensorSpec([], tf.int64)))
  assert stream.cardinality() == tf.data.UNKNOWN_CARDINALITY
  with pytest.raises(ValueError, match="more than"):
    public.as_arrays(stream, max_bytes=1 << 20)
  x, _ = public.as_arrays(stream.take(10), max_bytes=1 << 20)
  assert x.shape == (10, 256)
