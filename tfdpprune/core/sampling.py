"""Batches: Poisson sampling from secret randomness, and evaluation batches.

DP-SGD's accounting assumes Poisson subsampling, so training batches come
from `poisson_batches` (each example joins each step's batch independently
with probability q, from a secret key), not from fixed-size shuffled
batches; `shuffled_batches` is for evaluation and non-private training.

Static shapes (XLA): `poisson_batches(..., pad_to=capacity)` yields every
batch padded to `capacity` rows with a 0/1 weight per row (`(x, y, w)`),
truncating the rare larger batch to a uniformly random subset; the cap is
recorded in the dataset's `PoissonSpec`, so `PrivacyCallback` adds the
truncation's cost to delta (`accounting.PrivacySpec.max_batch_size`;
`accounting.poisson_capacity` picks a capacity with a tail below 1e-12).
Padding rows weigh 0 and contribute exactly nothing.
"""

import dataclasses
import numbers
from typing import Optional

import numpy as np

from tfdpprune.core import randomness
from tfdpprune.core._tf import tf


def _as_tensors(x, y):
  x = tf.convert_to_tensor(x)
  y = tf.convert_to_tensor(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
  return x, y


def poisson_selection(num_examples: int, sampling_probability: float,
                      seed, step, max_batch_size: Optional[int] = None, *,
                      stream=0):
  """Indices of the examples in step `step`'s Poisson batch (sorted).

  `seed` is a key (an `(int64, int64)` pair, e.g. a secret one) or an
  integer seed, whose key is `randomness.derived_key(seed, "sampling")` (the
  batches of a `--noise_seed=seed` run). Example i joins iff `u_i < q` for
  `u = stateless_uniform([N], randomness.step_seed(key, step, stream))`
  (Philox), so the batch depends only on the key, the step and the stream (a
  replica's partition).
  With `max_batch_size`, a larger batch keeps the `max_batch_size` examples
  of smallest `u` (a uniformly random subset of the drawn batch).
  """
  key = (randomness.derived_key(int(seed), randomness.SAMPLING)
         if isinstance(seed, numbers.Integral) else seed)
  u = tf.random.stateless_uniform(
      [num_examples], seed=randomness.step_seed(key, step, stream),
      alg="philox")
  selected = tf.where(u < sampling_probability)[:, 0]
  if max_batch_size is not None:
    k = tf.minimum(tf.size(selected), max_batch_size)
    _, keep = tf.math.top_k(-tf.gather(u, selected), k=k, sorted=False)
    selected = tf.sort(tf.gather(selected, keep))
  return selected


@dataclasses.dataclass(frozen=True)
class PoissonSpec:
  """What a Poisson-sampled input promises the accountant (public values).

  Attributes:
    num_examples: N, the examples sampled from.
    sampling_probability: q.
    num_steps: the steps of the whole run (batches yielded from start_step).
    augmult: rows per example (augmentation multiplicity); the optimizer
      must group the same number.
    max_batch_size: the cap that truncates larger batches, or None (exact
      Poisson sampling); the accountant adds its cost to delta
      (`accounting.PrivacySpec.max_batch_size`).
  """
  num_examples: int
  sampling_probability: float
  num_steps: int
  augmult: int = 1
  max_batch_size: Optional[int] = None


def poisson_spec(dataset) -> Optional[PoissonSpec]:
  """The `PoissonSpec` of a dataset made here, or None (not confirmed)."""
  return getattr(dataset, "poisson_spec", None)


def _tagged(dataset, n, q, num_steps, augmult, max_batch_size=None):
  dataset.poisson_spec = PoissonSpec(int(n), float(q), int(num_steps),
                                     int(augmult), max_batch_size)
  return dataset


def augment_images(x, seed, pad: int, flip: bool = True):
  """Per image: a random crop of the reflect-padded image and a random
  horizontal flip, from a stateless `seed` (`[2]` int64)."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  if flip:
    x = tf.image.stateless_random_flip_left_right(x, seeds[0])
  if pad:
    n, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
    padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]],
                    mode="REFLECT")
    offsets = tf.random.stateless_uniform([n, 2], seeds[1], minval=0,
                                          maxval=2 * pad + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(h)[tf.newaxis]
    cols = offsets[:, 1:] + tf.range(w)[tf.newaxis]
    x = tf.gather(padded, rows, axis=1, batch_dims=1)
    x = tf.gather(x, cols, axis=2, batch_dims=1)
  return x


def default_augmentation_pad(height: int) -> int:
  """Crop padding: about 1/7 of the image side (4 for 28x28, 1 for 8x8)."""
  return max(1, int(round(height / 7)))


# The augmentation stream of a step: `step_seed(key, step, stream |
# _AUGMENT_STREAM)`, disjoint from the sampling streams (replica ids).
_AUGMENT_STREAM = 1 << 40


def _multiply(xb, yb, augmult, key, step, stream):
  """Each sampled example as `augmult` consecutive augmented rows."""
  if augmult == 1:
    return xb, yb
  xb = tf.repeat(xb, augmult, axis=0)
  yb = tf.repeat(yb, augmult, axis=0)
  xb = augment_images(xb, randomness.step_seed(
      key, step, tf.bitwise.bitwise_or(tf.cast(stream, tf.int64),
                                       _AUGMENT_STREAM)),
                      default_augmentation_pad(xb.shape[1]))
  return xb, yb


def _check_poisson_args(sampling_probability, num_steps, start_step,
                        augmult=1, x=None):
  if (isinstance(augmult, bool) or not isinstance(augmult, int) or
      augmult < 1):
    raise ValueError(f"augmult={augmult!r} must be an integer >= 1")
  if augmult > 1 and x is not None and len(np.shape(x)) != 4:
    raise ValueError(f"augmult={augmult} augments images: x must be "
                     f"[N, H, W, C], got shape {np.shape(x)}")
  if not 0.0 <= sampling_probability <= 1.0:
    raise ValueError(f"sampling_probability must be in [0, 1], got "
                     f"{sampling_probability}")
  if not 0 <= start_step <= num_steps:
    raise ValueError(f"start_step must be in [0, num_steps={num_steps}], got "
                     f"{start_step}")


def _padded(xb, yb, rows):
  """`(x, y, w)` of exactly `rows` rows: the batch, then zero rows of
  weight 0 (static shapes, so one XLA compilation serves every step)."""
  n = tf.shape(yb)[0]
  pad = rows - n

  def pad_rows(t):
    t = tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1))
    return tf.ensure_shape(t, [rows] + t.shape.as_list()[1:])
  w = tf.concat([tf.ones([n], tf.float32), tf.zeros([pad], tf.float32)], 0)
  return pad_rows(xb), pad_rows(yb), tf.ensure_shape(w, [rows])


def poisson_batches(x, y, sampling_probability: float, num_steps: int,
                    seed: Optional[int] = None,
                    max_batch_size: Optional[int] = None, *,
                    start_step: int = 0, augmult: int = 1,
                    pad_to: Optional[int] = None) -> tf.data.Dataset:
  """Poisson-subsampled batches from secret (or explicitly seeded) randomness.

  At step s each example joins the batch independently with probability
  q = `sampling_probability`; batch sizes vary (Binomial(N, q)) and can be 0
  (yielded with shape `[0, ...]`). This is the sampling DP-SGD's Poisson
  accounting assumes, and its guarantee assumes the adversary does not know
  which examples were sampled: by default (`seed=None`) the sampling key is
  drawn from OS entropy and held in memory only. Steps `start_step, ...,
  num_steps - 1` are yielded; a resumed run draws fresh secret batches,
  which is exactly as private as the uninterrupted run.

  Args:
    x: `[N, ...]` features (numpy or tensor).
    y: `[N, ...]` labels.
    sampling_probability: q in [0, 1].
    num_steps: total number of steps of the run.
    seed: None (secret, the default) or an integer for reproducible batches
      in experiments: the batch of step s then depends only on `(seed, s)`,
      and anyone who knows the seed knows the batches (no privacy
      amplification by sampling against them).
    max_batch_size: if given, a batch larger than this is truncated to a
      uniformly random subset of `max_batch_size` examples. Truncation is
      not Poisson sampling: if p is the per-step probability that
      Binomial(N + 1, q) > max_batch_size, the Poisson guarantee (eps,
      delta) only holds as (eps, delta + (1 + e^eps) * num_steps * p). The
      cap is recorded in the `PoissonSpec`, and `PrivacyCallback` accounts
      it (`accounting.PrivacySpec.max_batch_size`) or refuses a cap that
      spends more than half of delta. Pick a cap far in the tail (see
      `poisson_truncation_probability`).
    start_step: the first step yielded.
    augmult: K >= 1: every sampled example comes as K consecutive rows,
      randomly cropped and flipped (augmentation multiplicity, De et al.
      2022; images only), for an optimizer with
      `augmentation_multiplicity=K`.
    pad_to: static shapes: every batch has exactly `pad_to` examples
      (`pad_to * augmult` rows), truncated like `max_batch_size=pad_to`
      (accounted) and padded with zero rows; the dataset then yields
      `(x, y, w)` with `w` 1 for sampled rows and 0 for padding, which
      Keras passes as sample weights (a padding row contributes exactly
      nothing). See `accounting.poisson_capacity`.

  Returns:
    A `tf.data.Dataset` of `(x_batch, y_batch)` (or `(x, y, w)` with
    `pad_to`), tagged with its `PoissonSpec` (`poisson_spec(dataset)`) so
    that `PrivacyCallback` can confirm the sampling it accounts.

  Example:
    >>> x, y = np.zeros([1000, 2], "float32"), np.zeros([1000], "int32")
    >>> batches = poisson_batches(x, y, 0.01, num_steps=3)  # secret batches
    >>> len([int(xb.shape[0]) for xb, _ in batches])  # ~Binomial(1000, 0.01)
    3
  """
  _check_poisson_args(sampling_probability, num_steps, start_step, augmult,
                      x)
  if max_batch_size is not None and max_batch_size < 1:
    raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
  if pad_to is not None:
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
      raise ValueError(f"pad_to={pad_to!r} must be an integer >= 1")
    if max_batch_size is not None and max_batch_size != pad_to:
      raise ValueError(f"pad_to={pad_to} truncates at {pad_to}; "
                       f"max_batch_size={max_batch_size} contradicts it")
    max_batch_size = pad_to
  x, y = _as_tensors(x, y)
  n = int(x.shape[0])
  key = randomness.private_key(randomness.SAMPLING, seed)

  def batch(step):
    idx = poisson_selection(n, sampling_probability, key, step,
                            max_batch_size)
    xb, yb = _multiply(tf.gather(x, idx), tf.gather(y, idx), augmult, key,
                       step, 0)
    if pad_to is None:
      return xb, yb
    return _padded(xb, yb, pad_to * augmult)

  steps = tf.data.Dataset.range(start_step, num_steps)
  return _tagged(steps.map(batch).prefetch(tf.data.AUTOTUNE), n,
                 sampling_probability, num_steps, augmult, max_batch_size)


def distributed_poisson_batches(strategy: tf.distribute.Strategy, x, y,
                                sampling_probability: float, num_steps: int,
                                seed: Optional[int] = None, *,
                                start_step: int = 0, augmult: int = 1):
  """One global Poisson batch per step, split across `strategy`'s replicas.

  The N examples are partitioned across the R replicas (example i belongs to
  replica i mod R); at each step every replica Poisson-samples its own
  partition with rate q. Every example therefore joins the step's global
  batch independently with probability q — exactly Poisson sampling of the
  whole data set, as the accountant assumes — and is processed by exactly
  one replica. The DP optimizer clips per example on each replica, sums
  across replicas and adds the noise once. Each worker draws its own secret
  sampling key, which never leaves the worker; a `seed` makes all of it
  reproducible.

  Sharding is explicit: the input is built per worker with
  `strategy.distribute_datasets_from_function` and tf.data auto-sharding is
  OFF, so no tf.distribute default decides which examples a replica sees.

  Args:
    strategy: a `tf.distribute.Strategy` (Mirrored, MultiWorkerMirrored, or
      the default strategy, where this equals `poisson_batches`).
    x, y, sampling_probability, num_steps, seed, start_step, augmult: as in
      `poisson_batches`.

  Returns:
    A `tf.distribute.DistributedDataset` for `model.fit` (with
    `steps_per_epoch`), yielding each replica's part of each step's batch.
  """
  _check_poisson_args(sampling_probability, num_steps, start_step, augmult,
                      x)
  x, y = _as_tensors(x, y)
  n = int(x.shape[0])
  key = randomness.private_key(randomness.SAMPLING, seed)

  def dataset_fn(context):
    replicas = context.num_replicas_in_sync
    local = replicas // context.num_input_pipelines
    first = context.input_pipeline_id * local

    def batch(i):
      step = start_step + i // local
      replica = first + i % local   # elements go round-robin to replicas
      part = tf.range(replica, n, replicas, dtype=tf.int64)
      chosen = poisson_selection(tf.size(part), sampling_probability, key,
                                 step, stream=replica)
      idx = tf.gather(part, chosen)
      return _multiply(tf.gather(x, idx), tf.gather(y, idx), augmult, key,
                       step, replica)

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    elements = tf.data.Dataset.range((num_steps - start_step) * local)
    return elements.map(batch).with_options(options).prefetch(
        tf.data.AUTOTUNE)

  return _tagged(strategy.distribute_datasets_from_function(dataset_fn), n,
                 sampling_probability, num_steps, augmult)


def shuffled_batches(x, y, batch_size: int, seed: Optional[int], *,
                     drop_remainder: bool = False) -> tf.data.Dataset:
  """One epoch of fixed-size batches, shuffled from `seed`.

  For evaluation and non-private training only: DP-SGD's Poisson
  accounting does not cover fixed-size shuffled batches.

  Args:
    x: `[N, ...]` features.
    y: `[N, ...]` labels.
    batch_size: examples per batch (the last one may be smaller).
    seed: shuffling seed; None keeps the data order (evaluation). Iterating
      the dataset again reshuffles; the sequence of orders is determined by
      `seed` (and TensorFlow's global seed, if one is set).
    drop_remainder: drop a last, smaller batch.

  Returns:
    A `tf.data.Dataset` of `(x_batch, y_batch)`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  x, y = _as_tensors(x, y)
  n = int(x.shape[0])
  indices = tf.data.Dataset.range(n)
  if seed is not None:
    indices = indices.shuffle(max(n, 1), seed=seed,
                              reshuffle_each_iteration=True)
  indices = indices.batch(batch_size, drop_remainder=drop_remainder)
  batches = indices.map(lambda i: (tf.gather(x, i), tf.gather(y, i)))
  return batches.prefetch(tf.data.AUTOTUNE)
