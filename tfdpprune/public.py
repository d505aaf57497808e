"""Public data for mask scores: in memory, batches chosen statelessly, losses.

Everything here reads `public_data` only — examples that are not the private
training data and not counted in N (the trainer refuses public data that
share an example with the private set). Masks computed from it, and from
weights already released, cost no privacy.

Methods that step through public data (select-mode public scores, Dirichlet
pruning's inference) take batch `i` from `PublicBatches.batch(i)`: the
examples of epoch `i // batches_per_epoch` in an order drawn from a public
stream derived from the `PruneConfig` seed (`randomness.PUBLIC_BATCHES`), so
batch `i` depends only on (seed, i, the public data) — not on an iterator's
state — and a resumed or reloaded run reads the same batches.
"""

from typing import List, Tuple

import numpy as np

from tfdpprune import frontends
from tfdpprune.core import randomness
from tfdpprune.core._tf import tf


# The most a `tf.data` public input may hold in memory (as arrays).
MAX_PUBLIC_BYTES = 2 << 30


def as_arrays(public_data, max_bytes: int = MAX_PUBLIC_BYTES
              ) -> Tuple[np.ndarray, np.ndarray]:
  """`(x, y)` arrays of `public_data`: an `(x, y)` pair or a finite `tf.data`
  dataset of `(x, y)` batches or examples (read once, into memory).

  A dataset that repeats forever is refused at once (`.repeat()` without a
  count is the usual idiom for a training input, but here it would never
  end); one of unknown length is read until it ends or holds more than
  `max_bytes` (2 GiB), then refused.

  Raises:
    ValueError: no data, mismatched lengths, an infinite dataset or one
      larger than `max_bytes` (with the fix).
  """
  if public_data is None:
    raise ValueError("public_data is required by the public-data mask "
                     "methods (public_gradient, public_saliency, dirichlet)")
  if isinstance(public_data, tf.data.Dataset):
    fix = ("Pass a finite dataset (e.g. without .repeat(), or "
           "ds.take(n)) or (x, y) arrays; the mask methods draw their own "
           "public batches from it")
    if public_data.cardinality() == tf.data.INFINITE_CARDINALITY:
      raise ValueError(f"public_data is an infinite tf.data.Dataset (it "
                       f"repeats forever), so it cannot be read. {fix}")
    xs, ys, size = [], [], 0
    for element in public_data:
      x, y = np.asarray(element[0]), np.asarray(element[1])
      if y.ndim == 0:  # one example, not a batch
        x, y = x[np.newaxis], y[np.newaxis]
      xs.append(x)
      ys.append(y)
      size += x.nbytes + y.nbytes
      if size > max_bytes:
        raise ValueError(
            f"public_data holds more than {max_bytes / 2**30:.3g} GiB (read "
            f"{sum(len(v) for v in ys)} examples so far; a dataset of "
            f"unknown length may repeat forever). {fix}, smaller than that")
    if not xs:
      raise ValueError("public_data is empty")
    x, y = np.concatenate(xs), np.concatenate(ys)
  else:
    x, y = (np.asarray(a) for a in public_data)
  if len(x) == 0 or len(x) != len(y):
    raise ValueError(f"public_data needs as many labels as examples (at "
                     f"least one); got {len(x)} examples, {len(y)} labels")
  if x.dtype.kind == "f":
    x = x.astype(np.float32)
  return x, y.astype(np.int64)


def loss_fn(model):
  """Summed sparse categorical cross-entropy of `model`'s outputs (from
  logits unless the last layer applies a softmax), in `model`'s Keras."""
  keras = frontends.of(model).keras
  last = model.layers[-1]
  last = getattr(last, "layer", last)
  softmax = getattr(last, "activation", None) is keras.activations.softmax
  return keras.losses.SparseCategoricalCrossentropy(
      from_logits=not softmax, reduction="sum")


def _in_replica(fn):
  """`fn()`, run in a replica when called in a strategy's cross-replica
  context (gradients of distributed variables need one); every replica
  computes the same public value, the first one's is returned."""
  if not (tf.distribute.has_strategy() and
          tf.distribute.in_cross_replica_context()):
    return fn()
  strategy = tf.distribute.get_strategy()
  return [strategy.experimental_local_results(g)[0]
          for g in strategy.run(fn)]


def mean_gradients(model, variables, x, y, batch_size=256):
  """Mean gradient of the model's loss over all public examples `(x, y)`
  (eager; freeze-mode public methods)."""
  loss = loss_fn(model)

  def batch_sum(xb, yb):
    with tf.GradientTape() as tape:
      value = loss(yb, model(xb, training=False))
    return [tf.convert_to_tensor(g) for g in tape.gradient(
        value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)]

  totals = [tf.zeros_like(v) for v in variables]
  for start in range(0, len(x), batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    grads = _in_replica(lambda: batch_sum(xb, yb))  # pylint: disable=cell-var-from-loop
    totals = [t + g for t, g in zip(totals, grads)]
  return [t / len(x) for t in totals]


class PublicBatches:
  """Batch `i` of the public data, a function of (key, i) only.

  Batches have `batch_size` examples (all of them if fewer); an epoch is
  `batches_per_epoch = N // batch_size` batches of a permutation drawn from
  `step_seed(key, epoch)` (the last `N % batch_size` examples of each
  permutation are skipped, different ones in every epoch).

  Args:
    x, y: the public examples and labels (arrays).
    batch_size: examples per batch, >= 1.
    key: a public key, e.g. `randomness.derived_key(seed,
      randomness.PUBLIC_BATCHES)`.
  """

  def __init__(self, x, y, batch_size: int, key: randomness.Key):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    with tf.init_scope():
      self._x = tf.convert_to_tensor(x)
      self._y = tf.convert_to_tensor(y)
    self.num_examples = int(self._x.shape[0])
    self.batch_size = min(int(batch_size), self.num_examples)
    self.batches_per_epoch = self.num_examples // self.batch_size
    self._key = key

  def indices(self, i) -> tf.Tensor:
    """The indices of the examples of batch `i` (graph-safe)."""
    i = tf.cast(i, tf.int64)
    epoch = i // self.batches_per_epoch
    start = (i % self.batches_per_epoch) * self.batch_size
    order = tf.argsort(tf.random.stateless_uniform(
        [self.num_examples], randomness.step_seed(self._key, epoch)))
    return tf.slice(order, tf.reshape(tf.cast(start, tf.int32), [1]),
                    [self.batch_size])

  def batch(self, i) -> Tuple[tf.Tensor, tf.Tensor]:
    """`(x, y)` of batch `i`."""
    index = self.indices(i)
    return tf.gather(self._x, index), tf.gather(self._y, index)


class PublicScorer:
  """Loss gradients on public batch `draw`, for select-mode re-draws.

  Args:
    model: a Keras model over the variables being scored whose forward pass
      records nothing for the DP optimizer (e.g. `tdp.strip(model)`: the
      same layers and variables without the wrappers).
    batches: the `PublicBatches`.
  """

  def __init__(self, model, batches: PublicBatches):
    self.model = model
    self.batches = batches
    self._loss = loss_fn(model)

  def gradients(self, variables, draw) -> List[tf.Tensor]:
    """Mean gradient of the loss on batch `draw` (in graph or eagerly)."""
    def compute():
      x, y = self.batches.batch(draw)
      with tf.GradientTape() as tape:
        value = self._loss(y, self.model(x, training=False))
      grads = tape.gradient(
          value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
      scale = 1.0 / self.batches.batch_size
      return [tf.convert_to_tensor(g) * tf.cast(scale, g.dtype)
              for g in grads]
    return _in_replica(compute)
