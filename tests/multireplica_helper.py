"""Subprocess of tests/multireplica_test.py: one DP step under tf.distribute.

  python tests/multireplica_helper.py mirrored OUT.json   # 2 logical CPUs
  TF_CONFIG=... python tests/multireplica_helper.py worker OUT.json

Measures, with R = 2 replicas and the real optimizer:
* `noise_ratio`: the std of one global step's noise over sigma*C (a pure
  noise step: zero data, every gradient 0), on 20,000 coordinates;
* `max_abs_diff`: a noiseless global step on a fixed batch split across the
  replicas vs the single-replica step on the same batch (same process);
* (mirrored) the per-replica Poisson batches of
  `data.distributed_poisson_batches`: counts per example and replica.
Only the chief (task 0) writes OUT.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

import tfdpprune as tdp
from tfdpprune import data
from tfdpprune._compat import keras
from tfdpprune._compat import tf
# pylint: enable=g-import-not-at-top,wrong-import-position

SIGMA, CLIP, BATCH = 2.0, 0.5, 8


def _xent():
  return keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=keras.losses.Reduction.NONE)


def _cnn(seed):
  keras.utils.set_random_seed(seed)
  return tdp.prune(keras.Sequential([
      keras.Input((6, 6, 1)),
      keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu"),
      keras.layers.Flatten(), keras.layers.Dense(5, activation="tanh"),
      keras.layers.Dense(3)]))


def _step(strategy, model, optimizer, loss_fn, x, y):
  """One optimizer step on the global batch (x, y) split over replicas."""
  replicas = strategy.num_replicas_in_sync
  with strategy.scope():  # no variable creation inside the tf.function
    optimizer._create_all_weights(model.trainable_variables)  # pylint: disable=protected-access

  def part(t):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(t[ctx.replica_id_in_sync_group::replicas]))

  @tf.function
  def run(xs, ys):
    def fn(xb, yb):
      with tf.GradientTape() as tape:
        loss = loss_fn(yb, model(xb, training=True))
      optimizer.minimize(loss, model.trainable_variables, tape=tape)
    strategy.run(fn, args=(xs, ys))

  run(part(x), part(y))


def noise_ratio(strategy):
  with strategy.scope():
    model = tdp.prune(keras.Sequential([
        keras.Input((50,)), keras.layers.Dense(400, use_bias=False)]))
    optimizer = tdp.MaskedDPKerasSGDOptimizer(
        CLIP, SIGMA, learning_rate=1.0, expected_batch_size=BATCH)
  before = model.trainable_variables[0].numpy().copy()
  loss = keras.losses.MeanSquaredError(reduction=keras.losses.Reduction.NONE)
  _step(strategy, model, optimizer, loss, np.zeros((BATCH, 50), np.float32),
        np.zeros((BATCH, 400), np.float32))
  moved = model.trainable_variables[0].numpy() - before
  return float(moved.std() * BATCH / (SIGMA * CLIP))


def fit_noise_ratio(strategy):
  """The noise of one global step taken by Keras `model.fit` (the optimizer
  built in the strategy's scope, nothing read from it beforehand)."""
  with strategy.scope():
    model = tdp.prune(keras.Sequential([
        keras.Input((50,)), keras.layers.Dense(400, use_bias=False)]))
    model.compile(tdp.MaskedDPKerasSGDOptimizer(
        CLIP, SIGMA, learning_rate=1.0, expected_batch_size=BATCH),
                  keras.losses.MeanSquaredError(
                      reduction=keras.losses.Reduction.NONE))
  before = model.trainable_variables[0].numpy().copy()
  model.fit(np.zeros((BATCH, 50), np.float32),
            np.zeros((BATCH, 400), np.float32), batch_size=BATCH, epochs=1,
            verbose=0, shuffle=False)
  moved = model.trainable_variables[0].numpy() - before
  return float(moved.std() * BATCH / (SIGMA * CLIP))


def noiseless_difference(strategy):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(BATCH, 6, 6, 1)) * 3).astype(np.float32)
  y = rng.integers(0, 3, BATCH).astype(np.int32)
  reference = _cnn(1)
  reference.compile(tdp.MaskedDPKerasSGDOptimizer(
      0.1, 0.0, learning_rate=0.5, momentum=0.9), _xent())
  reference.train_on_batch(x, y)
  with strategy.scope():
    model = _cnn(1)
    optimizer = tdp.MaskedDPKerasSGDOptimizer(0.1, 0.0, learning_rate=0.5,
                                              momentum=0.9)
  _step(strategy, model, optimizer, _xent(), x, y)
  return float(max(np.max(np.abs(a.numpy() - b.numpy())) for a, b in zip(
      model.trainable_variables, reference.trainable_variables)))


def poisson_counts(strategy, n=60, q=0.3, steps=300):
  x = np.arange(n, dtype=np.float32)[:, None]
  y = np.arange(n, dtype=np.int32)
  batches = data.distributed_poisson_batches(strategy, x, y, q, steps)
  counts = np.zeros((strategy.num_replicas_in_sync, n), np.int64)
  for _, yb in batches:
    for r, part in enumerate(strategy.experimental_local_results(yb)):
      np.add.at(counts[r], part.numpy(), 1)
  return counts.tolist()


def keras3_noise_ratio(strategy):
  """The noise of one global step of a Keras 3 private model's `fit`."""
  import keras as keras3  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    model = keras3.Sequential([keras3.Input((50,)),
                               keras3.layers.Dense(400, use_bias=False)])
    private = tdp.make_private(model, l2_norm_clip=CLIP,
                               noise_multiplier=SIGMA,
                               expected_batch_size=BATCH)
    private.compile(optimizer=keras3.optimizers.SGD(1.0),
                    loss=keras3.losses.MeanSquaredError())
  before = model.trainable_variables[0].numpy().copy()
  private.fit(np.zeros((BATCH, 50), np.float32),
              np.zeros((BATCH, 400), np.float32), batch_size=BATCH,
              epochs=1, verbose=0, shuffle=False)
  moved = model.trainable_variables[0].numpy() - before
  return float(moved.std() * BATCH / (SIGMA * CLIP))


def keras3_masked_difference(strategy, physical_batch_size=None):
  """A noiseless masked Keras 3 step with Adam on two replicas (each in
  chunks of `physical_batch_size` examples) vs one unsplit: the largest
  difference, whether the replicas' copies agree, and whether the frozen
  coordinates stayed."""
  import keras as keras3  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, 6)).astype(np.float32)
  y = rng.integers(0, 3, BATCH).astype(np.int32)
  config = tdp.PruneConfig(mode="freeze", sparsity=0.5, weights="all")

  def build(physical=None):
    keras3.utils.set_random_seed(3)
    model = tdp.prune(keras3.Sequential([
        keras3.Input((6,)), keras3.layers.Dense(5, activation="tanh"),
        keras3.layers.Dense(3)]), config)
    private = tdp.make_private(model, l2_norm_clip=0.1, noise_multiplier=0.0,
                               expected_batch_size=BATCH,
                               physical_batch_size=physical)
    private.compile(optimizer=keras3.optimizers.Adam(0.1),
                    loss=keras3.losses.SparseCategoricalCrossentropy(
                        from_logits=True))
    return private

  reference = build()
  start = [v.numpy() for v in reference.trainable_variables]
  reference.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
  with strategy.scope():
    private = build(physical_batch_size)
  private.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
  diff = max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(
      private.trainable_variables, reference.trainable_variables))
  copies = max(float(np.max(np.abs(
      strategy.experimental_local_results(v.value)[0].numpy() -
      strategy.experimental_local_results(v.value)[1].numpy())))
               for v in private.trainable_variables)
  index = {id(v): i for i, v in enumerate(private.trainable_variables)}
  frozen = all(
      bool(np.all(var.numpy()[w.mask(role).numpy() == 0] ==
                  start[index[id(var)]][w.mask(role).numpy() == 0]))
      for w in tdp.pruning.wrappers(private)
      for role, var in w.roles().items())
  return diff, copies, frozen


def main(mode, out):
  if mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    chief = True
  else:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    chief = strategy.cluster_resolver.task_id == 0
  results = {"replicas": strategy.num_replicas_in_sync,
             "noise_ratio": noise_ratio(strategy),
             "max_abs_diff": noiseless_difference(strategy)}
  if mode == "mirrored":
    results["poisson_counts"] = poisson_counts(strategy)
    results["fit_noise_ratio"] = fit_noise_ratio(strategy)
    results["keras3_noise_ratio"] = keras3_noise_ratio(strategy)
    (results["keras3_max_abs_diff"], results["keras3_replica_copies_diff"],
     results["keras3_frozen_kept"]) = keras3_masked_difference(strategy)
    # Each replica's 4 examples in chunks of 3 (an uneven last chunk).
    (results["keras3_physical_max_abs_diff"],
     results["keras3_physical_copies_diff"], _) = keras3_masked_difference(
         strategy, physical_batch_size=3)
  if chief:
    with open(out, "w") as f:
      json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:3])
