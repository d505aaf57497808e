r"""Step-time and memory benchmark: DP-SGD variants vs non-private SGD.

Command (from the repo root; about 4 minutes on 2 CPU cores):

  python -m launch.benchmark_speed --output_json=/tmp/benchmark_speed.json

  # only our fast methods (a minute or two):
  python -m launch.benchmark_speed \
      --methods=sgd,tdp_nomask,tdp_random90,tdp_lastlayer

  # model-set mode, ten everyday models (about 2 minutes per Keras):
  python -m launch.benchmark_speed --models=all --batch_size=128 \
      --steps=15 --warmup=2 --keras=2   # or --keras=3, --keras=both

What is measured
  The TF Privacy tutorial CNN (Conv2D(16, 8, s2, same, relu) -> MaxPool(2, 1)
  -> Conv2D(32, 4, s2, valid, relu) -> MaxPool(2, 1) -> Flatten -> Dense(32,
  relu) -> Dense(10)) on 28x28x1 inputs, batch 256 (the first 256 images of
  the MNIST test split if /work/shared/data/mnist has it, else N(0, 1) data).
  Methods (each on its own clone of one model, same initial weights):

    sgd             keras.optimizers.legacy.SGD(0.1, momentum=0.9), mean loss
                    (the baseline, ratio 1.0)
    tfp_dpsgd       TF Privacy DPKerasSGDOptimizer(l2_norm_clip=1,
                    noise_multiplier=1.1, num_microbatches=None, lr=0.1):
                    jacobian + a while loop over examples (very slow, ~6 GB)
    tfp_vectorized  TF Privacy VectorizedDPKerasSGDOptimizer (same arguments)
    tdp_nomask      (a) tdp.MaskedDPKerasSGDOptimizer(1.0, 1.1, lr=0.1,
                    momentum=0.9) on tdp.prune(model), no masks
    tdp_random90    (b) the same, masks={kernel.ref(): m} with a random 90% of
                    each kernel's coordinates unselected (constant numpy masks;
                    biases fully selected)
    tdp_lastlayer   (c) the same, every variable but the last Dense's kernel and
                    bias fully unselected (all-zero numpy masks)
    tdp_freeze_layer90   tdp.prune(PruneConfig(freeze, random, sparsity 0.9,
                    global, granularity="layer")): whole layers frozen.
    tdp_freeze_random90  tdp.prune(PruneConfig(freeze, random, 0.9)) (weight).
    tdp_select_random90  tdp.prune(PruneConfig(select, random, 0.9, k=1)):
                    a new in-graph draw every step.
    tdp_fallback    ours on the plain, unpruned model (generic vectorized
                    jacobian fallback)

  DP methods use SparseCategoricalCrossentropy(from_logits=True,
  reduction=NONE). Each step is one call of `model.make_train_function()` on
  an iterator over the (repeated) batch -- what `model.fit` runs per step --
  followed by fetching the loss, timed with `time.perf_counter`. Every method
  is first warmed up (tracing excluded). Steps then ALTERNATE in one process:
  each round runs one step of every fast method in a freshly shuffled order;
  slow methods (tfp_*, tdp_fallback) take only --slow_steps steps, spread
  evenly over the rounds. Machine-load drift thus hits all methods alike.
  A step's ratio is its time over the median of the sgd steps of the rounds
  within +-2 of it; the table gives the median ratio and its interquartile
  range (IQR) over the timed steps.

  Peak memory: each method runs again in its own subprocess
  (`--memory_only=<method>`: build, warm up, a few steps) which reports its
  peak RSS (`VmHWM` of /proc/self/status; `ru_maxrss` is not used where /proc
  exists because a fork+exec child inherits its parent's value on Linux);
  "+RSS" is the increase of that high-water mark over its value just before
  the method's model and optimizer were built (TensorFlow and data loaded).

Model-set mode (--models): the ten builders below (MODELS), each timed
  like the above with two methods: "sgd" and the DP method of --keras, on
  copies of one model built with that Keras (same architecture and weights
  init either way). Keras 2 (tf_keras): sgd as above vs tdp_nomask. Keras 3:
  sgd is the plain model compiled with keras.optimizers.SGD(0.1,
  momentum=0.9) and SparseCategoricalCrossentropy(from_logits=True); the DP
  method, tdp_private, is tdp.make_private(model, l2_norm_clip=1.0,
  noise_multiplier=1.1, expected_batch_size=--batch_size) compiled with the
  same optimizer and loss. One row per model: the DP step's ratio to sgd
  (median [IQR]), both median step times, and the samplers of its wrapped
  layers (tdp.pruning.report); no memory measurement.

Targets (from the issue), step-time ratio to non-private SGD:
  (a) tdp_nomask <= 2.0x, (b) tdp_random90 <= 2.5x, (c) tdp_lastlayer <= 1.3x.

Result (2 CPUs, TF 2.21.0, tf_keras 2.21.0, TF Privacy 0.9.0, MNIST batch;
default flags, 3 min 18 s in all):

  | method         | ratio to SGD [IQR]      | step ms | peak RSS MB | +RSS |
  | sgd            |   1.00x [0.98, 1.03]    |     7.1 |         651 |   35 |
  | tfp_dpsgd      | 366.15x [363.04, 367.67]|  2629.2 |        6260 | 5644 |
  | tfp_vectorized | 402.13x [386.86, 512.62]|  2887.6 |        6273 | 5657 |
  | tdp_nomask     |   2.67x [2.64, 2.74]    |    18.8 |         685 |   69 |
  | tdp_random90   |   2.83x [2.77, 2.93]    |    19.9 |         710 |   94 |
  | tdp_lastlayer  |   0.47x [0.45, 0.50]    |     3.3 |         646 |   30 |
  | tdp_fallback   | 399.10x [384.25, 413.15]|  2865.8 |        6256 | 5639 |

  (a) and (b) are missed: about 10 ms of the ~19 ms step is
  `tf.image.extract_patches` for the two Conv2D layers (a step with free
  patches runs at 1.24x / 1.53x).
"""

import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata

from absl import app
from absl import flags
from absl import logging
import numpy as np

import tfdpprune as tdp
from tfdpprune import frontends
from tfdpprune._compat import DPKerasSGDOptimizer
from tfdpprune._compat import keras
from tfdpprune._compat import tf
# After tfdpprune, which skips TF Privacy's estimator imports (TF >= 2.16).
from tensorflow_privacy.privacy.optimizers import (
    dp_optimizer_keras_vectorized)

# TF Privacy's module-level classes are made from `tf.keras` (Keras 3).
VectorizedDPKerasSGDOptimizer = (
    dp_optimizer_keras_vectorized.make_vectorized_keras_optimizer_class(
        keras.optimizers.legacy.SGD))

ALL_METHODS = ("sgd", "tfp_dpsgd", "tfp_vectorized", "tdp_nomask",
               "tdp_random90", "tdp_lastlayer", "tdp_freeze_layer90",
               "tdp_freeze_random90", "tdp_select_random90", "tdp_fallback")
SLOW_METHODS = frozenset({"tfp_dpsgd", "tfp_vectorized", "tdp_fallback"})
TARGETS = {"tdp_nomask": 2.0, "tdp_random90": 2.5, "tdp_lastlayer": 1.3}
_MEMORY_TAG = "BENCHMARK_MEMORY_JSON "
_WINDOW = 2  # sgd rounds on each side of a step that form its reference.

_FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 256, "Examples per step.")
flags.DEFINE_integer("steps", 30, "Timed steps (rounds) per fast method.")
flags.DEFINE_integer("slow_steps", 3, "Timed steps per slow method "
                     f"({', '.join(sorted(SLOW_METHODS))}).")
flags.DEFINE_integer("warmup", 3, "Untimed steps per fast method (the first "
                     "one traces).")
flags.DEFINE_integer("slow_warmup", 1, "Untimed steps per slow method.")
flags.DEFINE_list("methods", list(ALL_METHODS),
                  f"Methods to run, among {', '.join(ALL_METHODS)}; sgd is "
                  "always added.")
flags.DEFINE_bool("memory", True, "Measure peak RSS per method in "
                  "subprocesses.")
flags.DEFINE_integer("memory_steps", 3, "Steps run by a memory subprocess "
                     "(after one warm-up step).")
flags.DEFINE_string("memory_only", None, "Internal: measure the peak RSS of "
                    "this one method and print it as JSON.")
flags.DEFINE_string("mnist_dir", "/work/shared/data/mnist", "Directory with "
                    "t10k-{images-idx3,labels-idx1}-ubyte.gz; random data if "
                    "missing.")
flags.DEFINE_integer("seed", 0, "Seed of the weights, masks, data and order.")
flags.DEFINE_string("output_json", None, "Write the results here.")
flags.DEFINE_list("models", None, "Model-set mode: benchmark sgd vs "
                  "the DP method of --keras on "
                  "each of these models instead, one table row per model "
                  "(use --batch_size=128). Known: tutorial_cnn, "
                  "keras_io_convnet, embedding_pooling, embedding_conv1d, "
                  "resnet_groupnorm_block, bilstm_text, transformer_block, "
                  "gru_text, separable_convnet, conv3d_net, or 'all'.")
flags.DEFINE_enum("keras", "2", ["2", "3", "both"], "Model-set mode: the "
                  "Keras of the models: 2 (tf_keras; DP: tdp.prune + the DP "
                  "optimizer), 3 (Keras 3; DP: tdp.make_private) or both (a "
                  "table each).")


# -- data and model -----------------------------------------------------------


def load_batch(batch_size, mnist_dir, seed):
  """`(x [B, 28, 28, 1] float32, y [B] int32, source)`."""
  images = os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz")
  labels = os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz")
  if os.path.exists(images) and os.path.exists(labels):
    with gzip.open(images, "rb") as f:
      x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(labels, "rb") as f:
      y = np.frombuffer(f.read(), np.uint8, offset=8)
    if len(x) >= batch_size:
      return ((x[:batch_size] / 255.0).astype(np.float32),
              y[:batch_size].astype(np.int32), "mnist_test")
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch_size, 28, 28, 1)).astype(np.float32),
          rng.integers(0, 10, size=batch_size).astype(np.int32), "random")


def tutorial_cnn(keras, seed):
  """The TF Privacy tutorial CNN for MNIST."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.Conv2D(16, 8, strides=2, padding="same",
                          activation="relu"),
      keras.layers.MaxPool2D(2, 1),
      keras.layers.Conv2D(32, 4, strides=2, padding="valid",
                          activation="relu"),
      keras.layers.MaxPool2D(2, 1),
      keras.layers.Flatten(),
      keras.layers.Dense(32, activation="relu"),
      keras.layers.Dense(10)])


def _text_input(keras, length):
  return keras.Input((length,), dtype="int32")


def keras_io_convnet(keras, seed):
  """keras.io "Simple MNIST convnet" (Dropout included)."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPool2D(2),
      keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPool2D(2),
      keras.layers.Flatten(), keras.layers.Dropout(0.5),
      keras.layers.Dense(10)])


def _text_model(keras, seed, *body, dim=64, vocab=20000, length=200):
  """Tokens -> Embedding(vocab, dim) -> `body` layers -> Dense(2) logits."""
  keras.utils.set_random_seed(seed)
  inputs = _text_input(keras, length)
  h = keras.layers.Embedding(vocab, dim)(inputs)
  for layer in body:
    h = layer(h)
  return keras.Model(inputs, keras.layers.Dense(2)(h))


def embedding_pooling(keras, seed):
  return _text_model(keras, seed, keras.layers.GlobalAveragePooling1D(),
                     keras.layers.Dense(64, activation="relu"))


def embedding_conv1d(keras, seed):
  return _text_model(keras, seed,
                     keras.layers.Conv1D(64, 5, activation="relu"),
                     keras.layers.GlobalMaxPooling1D())


def resnet_groupnorm_block(keras, seed):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((32, 32, 3))
  h = keras.layers.Conv2D(32, 3, padding="same")(inputs)
  skip = h
  h = keras.layers.GroupNormalization(8)(h)
  h = keras.layers.ReLU()(h)
  h = keras.layers.Conv2D(32, 3, padding="same")(h)
  h = keras.layers.GroupNormalization(8)(h)
  h = keras.layers.ReLU()(keras.layers.Add()([h, skip]))
  h = keras.layers.GlobalAveragePooling2D()(h)
  return keras.Model(inputs, keras.layers.Dense(10)(h))


def bilstm_text(keras, seed):
  """keras.io "Bidirectional LSTM on IMDB": two Bidirectional(LSTM(64))."""
  return _text_model(
      keras, seed, keras.layers.Bidirectional(keras.layers.LSTM(
          64, return_sequences=True)),
      keras.layers.Bidirectional(keras.layers.LSTM(64)), dim=128)


def transformer_block(keras, seed, vocab=20000, length=200, dim=32, heads=2):
  """keras.io "Text classification with Transformer": token + position
  embeddings, MultiHeadAttention, LayerNormalization, feed-forward. Position
  ids are broadcast to the batch (batch-major) so the position embedding has
  per-example gradients on the fast path."""
  keras.utils.set_random_seed(seed)
  inputs = _text_input(keras, length)
  positions = keras.layers.Lambda(lambda t: tf.broadcast_to(
      tf.range(tf.shape(t)[1])[tf.newaxis], tf.shape(t)))(inputs)
  h = keras.layers.Add()([keras.layers.Embedding(vocab, dim)(inputs),
                          keras.layers.Embedding(length, dim)(positions)])
  attention = keras.layers.MultiHeadAttention(heads, dim)(h, h)
  h = keras.layers.LayerNormalization(epsilon=1e-6)(
      keras.layers.Add()([h, keras.layers.Dropout(0.1)(attention)]))
  ff = keras.layers.Dense(dim, activation="relu")(h)
  ff = keras.layers.Dense(dim)(ff)
  h = keras.layers.LayerNormalization(epsilon=1e-6)(
      keras.layers.Add()([h, keras.layers.Dropout(0.1)(ff)]))
  h = keras.layers.GlobalAveragePooling1D()(h)
  h = keras.layers.Dense(20, activation="relu")(h)
  return keras.Model(inputs, keras.layers.Dense(2)(h))


def gru_text(keras, seed):
  return _text_model(keras, seed, keras.layers.GRU(64))


def separable_convnet(keras, seed):
  """SeparableConv2D and Conv2DTranspose: layers on the generic sampler."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((28, 28, 1)),
      keras.layers.SeparableConv2D(32, 3, strides=2, activation="relu"),
      keras.layers.Conv2DTranspose(16, 3, strides=2, activation="relu"),
      keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])


def conv3d_net(keras, seed):
  """Conv3D on 16^3 volumes (the generic per-layer sampler)."""
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((16, 16, 16, 1)),
      keras.layers.Conv3D(16, 3, strides=2, activation="relu"),
      keras.layers.GlobalAveragePooling3D(), keras.layers.Dense(10)])


# Benchmark models: builder and input kind; targets from the issue.
MODELS = {
    "tutorial_cnn": (tutorial_cnn, "mnist"),
    "keras_io_convnet": (keras_io_convnet, "mnist"),
    "embedding_pooling": (embedding_pooling, "tokens"),
    "embedding_conv1d": (embedding_conv1d, "tokens"),
    "resnet_groupnorm_block": (resnet_groupnorm_block, "cifar"),
    "bilstm_text": (bilstm_text, "tokens"),
    "transformer_block": (transformer_block, "tokens"),
    "gru_text": (gru_text, "tokens"),
    "separable_convnet": (separable_convnet, "mnist"),
    "conv3d_net": (conv3d_net, "volumes"),
}
MODEL_TARGETS = {"bilstm_text": 4.0, "transformer_block": 2.5}
MODEL_SET_TARGET = 4.0
# The DP method of model-set mode per Keras (see build_method).
MODEL_SET_DP = {"2": "tdp_nomask", "3": "tdp_private"}


def model_batch(kind, batch_size, seed):
  """`(x, y)` of a benchmark model's input kind (tokens/cifar: synthetic)."""
  rng = np.random.default_rng(seed)
  if kind == "mnist":
    return load_batch(batch_size, _FLAGS.mnist_dir, seed)[:2]
  if kind == "tokens":
    return (rng.integers(1, 20000, size=(batch_size, 200)).astype(np.int32),
            rng.integers(0, 2, size=batch_size).astype(np.int32))
  if kind == "volumes":
    return (rng.normal(size=(batch_size, 16, 16, 16, 1)).astype(np.float32),
            rng.integers(0, 10, size=batch_size).astype(np.int32))
  return (rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
          rng.integers(0, 10, size=batch_size).astype(np.int32))


def keras_module(version):
  """`tf_keras` (version "2") or Keras 3 ("3", on the TensorFlow backend)."""
  if version == "2":
    return keras
  import keras as keras3  # pylint: disable=g-import-not-at-top
  return keras3


def _copy(base):
  """A copy of `base`, same weights; Lambda layers (stateless) are shared, as
  Keras 3 refuses to rebuild a Python lambda."""
  keras_ = frontends.of(base).keras
  model = keras_.models.clone_model(base, clone_function=lambda layer: (
      layer if isinstance(layer, keras_.layers.Lambda) else
      layer.__class__.from_config(layer.get_config())))
  model.set_weights(base.get_weights())
  return model


def _xent(keras_, **kwargs):
  return keras_.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                     **kwargs)


def _per_example_xent():
  return _xent(keras, reduction=keras.losses.Reduction.NONE)


def _inner(layer):
  return getattr(layer, "layer", layer)  # a PruneWrapper's wrapped layer.


def _random90_masks(model, seed):
  """A random 90% of every kernel's coordinates unselected (exactly)."""
  rng = np.random.default_rng(seed)
  masks = {}
  for layer in model.layers:
    kernel = getattr(_inner(layer), "kernel", None)
    if kernel is None:
      continue
    size = int(np.prod(kernel.shape))
    flat = np.zeros(size, np.float32)
    flat[rng.permutation(size)[:round(0.1 * size)]] = 1.0
    masks[kernel.ref()] = flat.reshape(kernel.shape)
  return masks


def _lastlayer_masks(model):
  """Every variable but the last Dense's kernel and bias unselected."""
  last = _inner(model.layers[-1])
  keep = {last.kernel.ref(), last.bias.ref()}
  return {v.ref(): np.zeros(v.shape, np.float32)
          for v in model.trainable_variables if v.ref() not in keep}


def _ours(**kwargs):
  return tdp.MaskedDPKerasSGDOptimizer(1.0, 1.1, learning_rate=0.1,
                                       momentum=0.9, **kwargs)


def build_method(name, base, seed):
  """A compiled model of method `name`, on a copy of `base` (a Keras 3
  `base`: sgd or tdp_private)."""
  model = _copy(base)
  front_end = frontends.of(base)
  if front_end.name == "keras3":
    if name == "tdp_private":
      model = tdp.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.1,
                               expected_batch_size=_FLAGS.batch_size)
    model.compile(optimizer=front_end.keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=_xent(front_end.keras))
    return model
  loss = _per_example_xent()
  if name == "sgd":
    optimizer = keras.optimizers.legacy.SGD(learning_rate=0.1, momentum=0.9)
    loss = _xent(keras)
  elif name == "tfp_dpsgd":
    optimizer = DPKerasSGDOptimizer(
        l2_norm_clip=1.0, noise_multiplier=1.1, num_microbatches=None,
        learning_rate=0.1)
  elif name == "tfp_vectorized":
    optimizer = VectorizedDPKerasSGDOptimizer(
        l2_norm_clip=1.0, noise_multiplier=1.1, num_microbatches=None,
        learning_rate=0.1)
  elif name == "tdp_nomask":
    model = tdp.prune(model)
    optimizer = _ours()
  elif name == "tdp_random90":
    model = tdp.prune(model)
    optimizer = _ours(masks=_random90_masks(model, seed))
  elif name == "tdp_lastlayer":
    model = tdp.prune(model)
    optimizer = _ours(masks=_lastlayer_masks(model))
  elif name == "tdp_freeze_layer90":
    model = tdp.prune(model, tdp.PruneConfig(
        mode="freeze", method="random", sparsity=0.9, scope="global",
        granularity="layer", seed=seed))
    optimizer = _ours()
  elif name == "tdp_freeze_random90":
    model = tdp.prune(model, tdp.PruneConfig(
        mode="freeze", method="random", sparsity=0.9, seed=seed))
    optimizer = _ours()
  elif name == "tdp_select_random90":
    model = tdp.prune(model, tdp.PruneConfig(
        mode="select", method="random", sparsity=0.9, every_k_steps=1,
        seed=seed))
    optimizer = _ours()
  elif name == "tdp_fallback":
    optimizer = _ours()
  else:
    raise ValueError(f"unknown method {name!r}; known: {ALL_METHODS}")
  model.compile(optimizer=optimizer, loss=loss)
  return model


class Stepper:
  """One method's model and `fit`-style train function over a fixed batch."""

  def __init__(self, name, base, x, y, seed):
    self.name = name
    self.model = build_method(name, base, seed)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    self._iterator = iter(dataset)
    self.model.make_train_function()  # Keras 3's returns None
    self._train_function = self.model.train_function
    self.times = []   # seconds of the timed steps
    self.rounds = []  # the round of each timed step

  def step(self):
    """Runs one step (until its loss is on the host); returns seconds."""
    start = time.perf_counter()
    logs = self._train_function(self._iterator)
    loss = float(logs["loss"])
    elapsed = time.perf_counter() - start
    if not np.isfinite(loss):
      raise FloatingPointError(f"{self.name}: loss {loss}")
    return elapsed


# -- timing -----------------------------------------------------------------


def _slow_rounds(rounds, steps):
  """`steps` rounds spread evenly over `range(rounds)`."""
  steps = min(steps, rounds)
  return {int((i + 0.5) * rounds / steps) for i in range(steps)}


def run_timing(methods, base, x, y):
  """Warms up every method, then times them round-robin. Returns steppers."""
  steppers = {}
  for name in methods:
    start = time.perf_counter()
    steppers[name] = Stepper(name, base, x, y, _FLAGS.seed)
    warmup = _FLAGS.slow_warmup if name in SLOW_METHODS else _FLAGS.warmup
    for _ in range(max(1, warmup)):
      steppers[name].step()
    logging.info("%s: built and warmed up in %.1f s", name,
                 time.perf_counter() - start)

  rounds = _FLAGS.steps
  slow_at = _slow_rounds(rounds, _FLAGS.slow_steps)
  rng = np.random.default_rng(_FLAGS.seed)
  start = time.perf_counter()
  for r in range(rounds):
    names = [n for n in methods if n not in SLOW_METHODS or r in slow_at]
    for i in rng.permutation(len(names)):
      stepper = steppers[names[i]]
      stepper.times.append(stepper.step())
      stepper.rounds.append(r)
    if r % 5 == 4 or r == rounds - 1:
      logging.info("round %d/%d, %.0f s", r + 1, rounds,
                   time.perf_counter() - start)
  return steppers


def summarize(steppers):
  """Per method: median ratio to the local sgd median, IQR, median ms."""
  sgd = np.array(steppers["sgd"].times)
  out = {}
  for name, s in steppers.items():
    ratios = []
    for t, r in zip(s.times, s.rounds):
      lo, hi = max(0, r - _WINDOW), min(len(sgd), r + _WINDOW + 1)
      ratios.append(t / np.median(sgd[lo:hi]))
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    out[name] = dict(
        ratio_median=float(med), ratio_q1=float(q1), ratio_q3=float(q3),
        ratio_iqr=float(q3 - q1), ratio_of_medians=float(
            np.median(s.times) / np.median(sgd)),
        median_ms=float(1e3 * np.median(s.times)),
        steps_timed=len(s.times), times_s=[float(t) for t in s.times],
        rounds=list(s.rounds), target=TARGETS.get(name))
  return out


# -- memory -----------------------------------------------------------------


def _peak_rss_mb():
  """This process's peak RSS in MB.

  `VmHWM` of /proc/self/status where available: unlike `ru_maxrss`, which a
  child started by fork+exec inherits from its parent on Linux (so a small
  child of a 6 GB parent reports 6 GB), it belongs to the current address
  space only.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_memory_here(name, base, x, y):
  """Peak RSS of building and stepping `name` in this (fresh) process."""
  before = _peak_rss_mb()
  stepper = Stepper(name, base, x, y, _FLAGS.seed)
  for _ in range(1 + _FLAGS.memory_steps):
    stepper.step()
  peak = _peak_rss_mb()
  return dict(peak_rss_mb=peak, rss_before_mb=before,
              rss_increase_mb=peak - before)


def measure_memory_subprocess(name):
  """Runs `--memory_only=name` in a subprocess; its memory dict."""
  argv = [sys.executable, "-m", "launch.benchmark_speed",
          f"--memory_only={name}", f"--batch_size={_FLAGS.batch_size}",
          f"--memory_steps={_FLAGS.memory_steps}", f"--seed={_FLAGS.seed}",
          f"--mnist_dir={_FLAGS.mnist_dir}"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(argv, cwd=root, env=env, capture_output=True,
                        text=True, check=False)
  for line in done.stdout.splitlines():
    if line.startswith(_MEMORY_TAG):
      return json.loads(line[len(_MEMORY_TAG):])
  logging.error("memory subprocess for %s failed (exit %d):\n%s", name,
                done.returncode, done.stderr[-3000:])
  return dict(peak_rss_mb=None, rss_before_mb=None, rss_increase_mb=None)


# -- report -----------------------------------------------------------------


def environment():
  def version(package):
    try:
      return metadata.version(package)
    except metadata.PackageNotFoundError:
      return None
  return dict(
      cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)),
      processor=platform.processor() or platform.machine(),
      python=platform.python_version(), tensorflow=tf.__version__,
      tf_keras=version("tf-keras"),
      tensorflow_privacy=version("tensorflow-privacy"),
      intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
      inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads())


def _fmt(value, spec):
  return "n/a" if value is None else format(value, spec)


def markdown_table(results, memory):
  rows = ["| method | ratio to SGD (median [IQR]) | median step ms | "
          "peak RSS MB | +RSS MB | steps timed | target |",
          "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    m = memory.get(name, {})
    target = r["target"]
    verdict = ""
    if target is not None:
      verdict = (f"<= {target}x " +
                 ("met" if r["ratio_median"] <= target else "**missed**"))
    rows.append(
        f"| {name} | {r['ratio_median']:.2f}x [{r['ratio_q1']:.2f}, "
        f"{r['ratio_q3']:.2f}] | {r['median_ms']:.1f} | "
        f"{_fmt(m.get('peak_rss_mb'), '.0f')} | "
        f"{_fmt(m.get('rss_increase_mb'), '.0f')} | {r['steps_timed']} | "
        f"{verdict} |")
  return "\n".join(rows)


def benchmark_models(names, version):
  """sgd vs the DP method of Keras `version` on each model (alternating);
  one row per model."""
  keras_ = keras_module(version)
  dp = MODEL_SET_DP[version]
  rows = [f"Keras {version} ({keras_.__name__} {keras_.__version__}), DP: "
          f"{dp}\n",
          "| model | DP step / SGD step (median [IQR]) | SGD step ms | DP step "
          "ms | samplers | target |", "|---|---|---|---|---|---|"]
  for name in names:
    builder, kind = MODELS[name]
    x, y = model_batch(kind, _FLAGS.batch_size, _FLAGS.seed)
    base = builder(keras_, _FLAGS.seed)
    steppers = run_timing(["sgd", dp], base, x, y)
    result = summarize(steppers)[dp]
    dp_model = steppers[dp].model
    samplers = sorted({s.split(":")[0] for _, _, s in tdp.pruning.report(
        getattr(dp_model, "private_model_of", dp_model))})
    target = MODEL_TARGETS.get(name, MODEL_SET_TARGET)
    verdict = f"<= {target}x " + ("met" if result["ratio_median"] <= target
                                  else "**missed**")
    rows.append(
        f"| {name} | {result['ratio_median']:.2f}x [{result['ratio_q1']:.2f}, "
        f"{result['ratio_q3']:.2f}] | "
        f"{1e3 * np.median(steppers['sgd'].times):.1f} | "
        f"{result['median_ms']:.1f} | {', '.join(samplers)} | {verdict} |")
    logging.info(rows[-1])
  return "\n".join(rows)


def main(argv):
  del argv
  if _FLAGS.models:
    names = list(MODELS) if _FLAGS.models == ["all"] else _FLAGS.models
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
      raise app.UsageError(f"--models: unknown {unknown}; known: "
                           f"{', '.join(MODELS)}")
    env = environment()
    print(f"\nbatch {_FLAGS.batch_size}; {env['cpu_count']} CPUs; TF "
          f"{env['tensorflow']}; {_FLAGS.steps} alternating rounds\n")
    for version in ("2", "3") if _FLAGS.keras == "both" else (_FLAGS.keras,):
      print(benchmark_models(names, version))
      print()
    return
  x, y, source = load_batch(_FLAGS.batch_size, _FLAGS.mnist_dir, _FLAGS.seed)
  base = tutorial_cnn(keras, _FLAGS.seed)

  if _FLAGS.memory_only:
    result = measure_memory_here(_FLAGS.memory_only, base, x, y)
    print(_MEMORY_TAG + json.dumps(result), flush=True)
    return

  unknown = sorted(set(_FLAGS.methods) - set(ALL_METHODS))
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; known: "
                         f"{', '.join(ALL_METHODS)}")
  methods = [m for m in ALL_METHODS if m == "sgd" or m in _FLAGS.methods]
  env = environment()
  logging.info("environment: %s", env)

  start = time.perf_counter()
  steppers = run_timing(methods, base, x, y)
  results = summarize(steppers)
  timing_s = time.perf_counter() - start
  del steppers

  memory = {}
  if _FLAGS.memory:
    for name in methods:
      memory[name] = measure_memory_subprocess(name)
      logging.info("%s memory: %s", name, memory[name])

  header = (f"TF Privacy tutorial CNN, batch {_FLAGS.batch_size} "
            f"({source} data); {env['cpu_count']} CPUs "
            f"({env['cpus_usable']} usable), {env['processor']}; "
            f"TF {env['tensorflow']}, tf_keras {env['tf_keras']}, "
            f"TF Privacy {env['tensorflow_privacy']}; "
            f"{_FLAGS.steps} alternating rounds, "
            f"timing {timing_s:.0f} s")
  print()
  print(header)
  print()
  print(markdown_table(results, memory))
  print()
  if _FLAGS.output_json:
    with open(_FLAGS.output_json, "w") as f:
      json.dump(dict(
          config=dict(batch_size=_FLAGS.batch_size, steps=_FLAGS.steps,
                      slow_steps=_FLAGS.slow_steps, warmup=_FLAGS.warmup,
                      slow_warmup=_FLAGS.slow_warmup, methods=methods,
                      memory_steps=_FLAGS.memory_steps, seed=_FLAGS.seed,
                      data=source, sgd_window=_WINDOW),
          environment=env, targets=TARGETS, timing_seconds=timing_s,
          results=results, memory=memory), f, indent=1)
    logging.info("wrote %s", _FLAGS.output_json)


if __name__ == "__main__":
  app.run(main)
