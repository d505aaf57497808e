r"""Step-time and memory benchmark: DP-SGD variants vs non-private SGD.

Command (from the repo root; about 4 minutes on 2 CPU cores):

  python -m launch.benchmark_speed --output_json=/tmp/benchmark_speed.json

  # only our fast methods (a minute or two):
  python -m launch.benchmark_speed \
      --methods=sgd,tdp_nomask,tdp_random90,tdp_lastlayer

  # model-set mode, ten everyday models (about 2 minutes per Keras):
  python -m launch.benchmark_speed --models=all --batch_size=128 \
      --steps=15 --warmup=2 --keras=2   # or --keras=3, --keras=both
  # ... the same with P, XLA and a dtype policy (Keras 3):
  python -m launch.benchmark_speed --models=all --batch_size=128 \
      --steps=15 --warmup=2 --keras=3 --physical_batch_size=64 \
      --jit_compile --mixed_precision=mixed_bfloat16

  # memory mode: peak memory vs logical batch size at P = 256 and unsplit
  # (1 min 42 s on 2 CPUs):
  python -m launch.benchmark_speed \
      --memory_sweep=256,512,1024,2048,4096,8192 --physical_batch_size=256

  # XLA mode: jit_compile=True vs False per Keras 3 model (about 5 min on
  # 2 CPUs):
  python -m launch.benchmark_speed --xla_compare --models=all \
      --batch_size=128 --steps=8 --warmup=1

GPU section (not run here: no numbers for a GPU are claimed in this file).
  On a GPU the memory that matters is the device's: the sweep then also
  reports "GPU peak MB" (tf.config.experimental.get_memory_info("GPU:0")
  ["peak"], reset before the model is built); RSS stays a host figure.

  python -m launch.benchmark_speed \
      --memory_sweep=1024,2048,4096,8192,16384 --physical_batch_size=1024 \
      --jit_compile --mixed_precision=mixed_bfloat16
  python -m launch.benchmark_speed --memory_sweep=1024,2048,4096,8192,16384 \
      --physical_batch_size=1024 --memory_model=keras_io_convnet \
      --jit_compile --mixed_precision=mixed_bfloat16
  python -m launch.benchmark_speed --xla_compare --models=all \
      --batch_size=1024 --steps=15 --warmup=2 --physical_batch_size=256 \
      --mixed_precision=mixed_bfloat16
  python -m launch.benchmark_speed --models=all --keras=3 --batch_size=1024 \
      --steps=15 --warmup=2 --jit_compile --mixed_precision=mixed_bfloat16
  # float16 (fixed loss scale FLOAT16_LOSS_SCALE in the private model):
  #   the same with --mixed_precision=mixed_float16. Under XLA the library
  #   keeps Conv2D on the patches path (the depthwise-op path is quadratic
  #   in B on XLA:CPU, see the results); without XLA, compare both paths on
  #   a GPU with --conv2d_depthwise_max_channels=0.

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
  --physical_batch_size=P goes to tdp.make_private (Keras 3 only; refused
  with --keras=2, whose tdp_nomask is the optimizer path). --jit_compile
  compiles both methods with jit_compile=True and feeds both the batch
  padded to a static capacity (see below); without it jit_compile=False is
  passed explicitly (Keras 3's default "auto" would pick XLA on a GPU).
  --mixed_precision sets the global dtype policy of both Kerases before
  the models are built.

Static padded batches: capacity = tdp.accounting.poisson_capacity(
  --num_examples (60000), B / N, multiple=P or 1), the smallest multiple of
  P that a Poisson batch exceeds with probability < 1e-12; the batch is
  padded with zero rows of weight 0 to that many rows and fed as (x, y, w),
  as tdp.poisson_dataset(..., pad_to=capacity) yields it (a padding row is
  computed but contributes nothing). With P | capacity every chunk has a
  static shape, so XLA compiles the chunk loop once.

Memory mode (--memory_sweep=B1,B2,...): for each logical batch size B, a
  subprocess (--sweep_batch=B, internal) builds the Keras 3 private
  --memory_model (default tutorial_cnn, 28x28x1) with
  tdp.make_private(..., expected_batch_size=B, physical_batch_size=P) (P =
  --physical_batch_size, default 256), compiled like tdp_private above
  (--jit_compile, --mixed_precision apply), and runs 1 + --memory_steps DP
  steps of `model.train_function` on tdp.poisson_dataset(x, y, B,
  seed=--seed, pad_to=capacity) over N = --num_examples synthetic examples
  (N(0, 1) images; MNIST test if N <= 10000). A second subprocess does the
  same unsplit (physical_batch_size=None) on the same padded rows
  (--nosweep_unsplit skips it). --sweep_input=fixed feeds one batch of B
  examples padded to capacity, repeated, instead. Per cell: peak RSS
  (VmHWM) and "+MB", its increase over the baseline taken after TensorFlow
  and the N examples are loaded and just before the model is built, with
  the high-water mark
  reset there ("5" to /proc/self/clear_refs, so the transient of making the
  data does not hide growth); "input batch MB" is one padded batch (x, y,
  w), which is part of the +MB; "step ms" is the median of the steps after
  the first (a rough figure: one process, few steps, no alternation).

XLA mode (--xla_compare; --models, default all, Keras 3): per model, two
  copies of tdp_private (P = --physical_batch_size; --xla_method=sgd: of
  the non-private Keras 3 model instead) compiled with
  jit_compile=False ("graph", tf.function) and True ("xla"), on one batch of
  --batch_size padded to capacity, warmed up (tracing and XLA compilation
  excluded; "warm-up s" shows them) and timed in alternating rounds as
  above; the ratio is XLA step / graph step (median [IQR]) against the
  graph steps of the rounds within +-2. "traces a+b": traces of the train
  step in warm-up + after it (b > 0 would be a retrace every step; the
  run logs an error then). The train step's traces are counted by wrapping
  `model.train_step` before `make_train_function`.

The device is printed first (tf.config.list_physical_devices() and any
GPU's name).

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

Memory mode (2 CPUs, TF 2.21.0, Keras 3.15.1, no GPU; the command above,
1 min 42 s): peak RSS of 3 + 1 DP steps, tutorial CNN, P = 256:

  | logical B | padded rows | input batch MB | P=256 peak MB | P=256 +MB | unsplit peak MB | unsplit +MB |
  |---|---|---|---|---|---|---|
  |  256 |  512 |  1.5 | 1322 | 114 | 1322 |  115 |
  |  512 |  768 |  2.3 | 1323 | 115 | 1342 |  135 |
  | 1024 | 1280 |  3.8 | 1338 | 131 | 1396 |  188 |
  | 2048 | 2560 |  7.7 | 1323 | 116 | 1739 |  532 |
  | 4096 | 4608 | 13.8 | 1339 | 131 | 2228 | 1020 |
  | 8192 | 8960 | 26.9 | 1402 | 195 | 3276 | 2068 |

  At P = 256 the increase stays at 114-131 MB up to B = 4096 and is 195 MB
  at 8192 (+81 MB for 32x the examples); unsplit it grows about linearly
  (~0.24 MB per padded row). What grows at fixed P is the input, not the
  step: tdp.poisson_dataset ends in prefetch(tf.data.AUTOTUNE), which holds
  up to several future padded batches while a slow step runs. Between
  B = 4096 and 16384 (+40 MB per padded batch) the P = 256 increase grows
  by 61 MB with 1 + 1 steps, 226 MB with 3 + 1 and 243 MB with 8 + 1
  (--memory_steps), while a longer run at one B (2048: 3 + 1 vs 12 + 1
  steps) stays at 130 MB. Cells vary by tens of MB between runs at
  B >= 4096 (8192: 186-272 MB over four runs). The same sweep with
  --jit_compile (3 min): P = 256 stays at 304-360 MB, unsplit grows from
  356 to 2581 MB.

XLA mode (2 CPUs; the command above, batch 128 padded to 215 rows; the
three Conv2D rows measured after the fix below, --models=tutorial_cnn,
keras_io_convnet,resnet_groupnorm_block, 59 s):

  | model | XLA step / graph step (median [IQR]) | graph ms | XLA ms | warm-up s graph / XLA | traces graph / XLA |
  |---|---|---|---|---|---|
  | tutorial_cnn | 2.11x [1.99, 2.25] | 13.0 | 28.7 | 1 / 4 | 2+0 / 2+0 |
  | keras_io_convnet | 3.78x [3.64, 6.44] | 41.2 | 150.7 | 1 / 4 | 2+0 / 2+0 |
  | embedding_pooling | 2.84x [2.77, 2.92] | 58.5 | 169.8 | 1 / 3 | 2+0 / 2+0 |
  | embedding_conv1d | 3.36x [3.29, 3.40] | 142.4 | 478.9 | 1 / 3 | 2+0 / 2+0 |
  | resnet_groupnorm_block | 0.79x [0.79, 0.80] | 566.6 | 450.1 | 2 / 4 | 2+0 / 2+0 |
  | bilstm_text | 2.95x [2.82, 3.02] | 1245.7 | 3814.7 | 4 / 24 | 2+0 / 2+0 |
  | transformer_block | 1.20x [1.19, 1.21] | 189.4 | 226.0 | 3 / 8 | 2+0 / 2+0 |
  | gru_text | 4.56x [4.22, 4.83] | 422.9 | 1957.2 | 2 / 41 | 2+0 / 2+0 |
  | separable_convnet | 4.02x [3.00, 4.30] | 30.0 | 119.9 | 2 / 6 | 2+0 / 2+0 |
  | conv3d_net | 2.46x [2.38, 2.55] | 31.0 | 78.1 | 1 / 5 | 2+0 / 2+0 |

  No retrace anywhere (also with --physical_batch_size=64). On CPU XLA is
  slower for most models; for the non-private model (--xla_method=sgd) it
  is 0.53x-8.59x (tutorial_cnn 2.85x, conv3d_net 8.59x). The three Conv2D
  models were pathological before the fix (345x, 61x, 112x): a Conv2D with
  <= 3 input channels took every example's kernel gradient from one
  `depthwise_conv2d_native_backprop_filter` over B*Cin channels
  (tfdpprune/core/samplers/dense.py, `_conv2d_per_example_kernels`), which
  XLA lowers to a convolution with batch_group_count = B*Cin that XLA:CPU
  rewrites into an ungrouped convolution over a B*Cin-dilated extra
  dimension: time grows as B^2 (the op alone: 1.6 s at B = 64, 21 s at 256,
  72 s at 512, vs 4-20 ms in graph mode). The sampler now takes the
  patches path inside an XLA context (`core._tf.in_xla_context`). With
  --physical_batch_size=64 as well
  (256 rows, 4 chunks; 4 min) every model runs, no retrace, at 1.22x
  (transformer_block) to 4.97x (resnet_groupnorm_block, whose XLA step is
  2.55 s even for one chunk of 256 rows at P = 256 vs 0.23 s unsplit:
  XLA:CPU runs the chunk loop's body slowly there).
"""

import gzip
import json
import os
import platform
import re
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
flags.DEFINE_integer("physical_batch_size", None, "P for the DP method that "
                     "goes through tdp.make_private (Keras 3 tdp_private): "
                     "each logical batch in chunks of at most P examples. "
                     "Model-set, --xla_compare and --memory_sweep modes "
                     "(the sweep's default: 256).")
flags.DEFINE_bool("jit_compile", False, "Compile with jit_compile=True (XLA) "
                  "on static padded batches (capacity rows from "
                  "accounting.poisson_capacity(--num_examples, B/N, "
                  "multiple=P), weight 0 on padding). Model-set and "
                  "--memory_sweep modes; False is passed explicitly (Keras "
                  "3's 'auto' would pick XLA on a GPU).")
flags.DEFINE_enum("mixed_precision", "none",
                  ["none", "mixed_bfloat16", "mixed_float16"],
                  "Global dtype policy of both Kerases, set before any model "
                  "is built. Model-set, --xla_compare and --memory_sweep "
                  "modes.")
flags.DEFINE_list("memory_sweep", None, "Memory mode: logical batch sizes B "
                  "(e.g. 256,512,1024,2048,4096,8192); for each, the peak "
                  "memory of a few DP steps of the Keras 3 private "
                  "--memory_model on Poisson batches padded to capacity, at "
                  "P = --physical_batch_size and unsplit, each in its own "
                  "subprocess.")
flags.DEFINE_string("memory_model", "tutorial_cnn", "--memory_sweep's model "
                    "(a key of MODELS).")
flags.DEFINE_enum("sweep_input", "poisson", ["poisson", "fixed"],
                  "--memory_sweep's input: tdp.poisson_dataset(..., pad_to="
                  "capacity) over --num_examples examples (tf.data may hold "
                  "several batches), or one fixed batch of B examples padded "
                  "to capacity, repeated (exactly one batch in memory).")
flags.DEFINE_bool("sweep_unsplit", True, "--memory_sweep: also the rows "
                  "without physical batches.")
flags.DEFINE_bool("xla_compare", False, "XLA mode: step time of the Keras 3 "
                  "private model (tdp_private, P = --physical_batch_size) "
                  "compiled with jit_compile=True vs False, alternating "
                  "steps in one process, on the same static padded batch; "
                  "one row per model of --models (default all).")
flags.DEFINE_enum("xla_method", "tdp_private", ["tdp_private", "sgd"],
                  "--xla_compare: the Keras 3 method compared (sgd: the "
                  "non-private model, XLA's own effect on this machine).")
flags.DEFINE_integer("num_examples", 60000, "N of q = B/N for the Poisson "
                     "batches and the padded capacity (poisson_capacity, "
                     "tail 1e-12).")
flags.DEFINE_integer("conv2d_depthwise_max_channels", None, "Diagnostic: "
                     "overrides tfdpprune's Conv2DSampler."
                     "DEPTHWISE_MAX_CHANNELS (3; 0 sends every Conv2D to the "
                     "patches path instead of the one depthwise "
                     "filter-gradient op, which XLA:CPU runs in time "
                     "quadratic in the batch).")
flags.DEFINE_integer("sweep_batch", None, "Internal: one --memory_sweep "
                     "point, logical batch B (prints JSON).")
flags.DEFINE_integer("sweep_capacity", None, "Internal: the padded rows of "
                     "the --sweep_batch point.")


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


def build_method(name, base, seed, jit_compile=False,
                 physical_batch_size=None, expected_batch_size=None):
  """A compiled model of method `name`, on a copy of `base` (a Keras 3
  `base`: sgd or tdp_private, the latter with `physical_batch_size`).
  `jit_compile` is passed to `compile` (explicitly False on Keras 3, whose
  default "auto" means XLA on a GPU)."""
  model = _copy(base)
  front_end = frontends.of(base)
  if front_end.name == "keras3":
    if name == "tdp_private":
      model = tdp.make_private(
          model, l2_norm_clip=1.0, noise_multiplier=1.1,
          expected_batch_size=expected_batch_size or _FLAGS.batch_size,
          physical_batch_size=physical_batch_size)
    model.compile(optimizer=front_end.keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=_xent(front_end.keras), jit_compile=bool(jit_compile))
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
  model.compile(optimizer=optimizer, loss=loss,
                **({"jit_compile": True} if jit_compile else {}))
  return model


class Stepper:
  """One method's model and `fit`-style train function over a fixed batch
  (`data`: `(x, y)` or padded `(x, y, w)`), or over `dataset`'s batches.

  `traces` counts the traces of the train step (its Python body runs once
  per trace): constant after warm-up unless every step retraces.
  """

  def __init__(self, name, base, data, seed, dataset=None, **build_kwargs):
    self.name = name
    self.model = build_method(name, base, seed, **build_kwargs)
    if dataset is None:
      dataset = tf.data.Dataset.from_tensors(tuple(data)).repeat()
    self._iterator = iter(dataset)
    self.traces = 0
    train_step = self.model.train_step

    def counted_train_step(batch):
      self.traces += 1
      return train_step(batch)
    # Outside Keras' attribute tracking; read when the function is made.
    object.__setattr__(self.model, "train_step", counted_train_step)
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


def run_timing(methods, make_stepper):
  """Warms up every method (`make_stepper(name)` builds its Stepper), then
  times them round-robin. Returns steppers; each has `warmup_s` (build,
  tracing/compilation and warm-up steps) and `warmup_traces`."""
  steppers = {}
  for name in methods:
    start = time.perf_counter()
    warmup = _FLAGS.slow_warmup if name in SLOW_METHODS else _FLAGS.warmup
    try:
      steppers[name] = make_stepper(name)
      for _ in range(max(1, warmup)):
        steppers[name].step()
    except Exception as e:  # pylint: disable=broad-except
      e.benchmark_method = name  # for the table's "failed" row
      raise
    steppers[name].warmup_s = time.perf_counter() - start
    steppers[name].warmup_traces = steppers[name].traces
    logging.info("%s: built and warmed up in %.1f s", name,
                 steppers[name].warmup_s)

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


def summarize(steppers, reference="sgd"):
  """Per method: median ratio to the local `reference` median, IQR, median
  ms."""
  sgd = np.array(steppers[reference].times)
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
  stepper = Stepper(name, base, (x, y), _FLAGS.seed)
  for _ in range(1 + _FLAGS.memory_steps):
    stepper.step()
  peak = _peak_rss_mb()
  return dict(peak_rss_mb=peak, rss_before_mb=before,
              rss_increase_mb=peak - before)


def measure_memory_subprocess(name):
  """Runs `--memory_only=name` in a subprocess; its memory dict."""
  return _run_tagged(
      [f"--memory_only={name}", f"--batch_size={_FLAGS.batch_size}",
       f"--memory_steps={_FLAGS.memory_steps}", f"--seed={_FLAGS.seed}",
       f"--mnist_dir={_FLAGS.mnist_dir}"], name) or dict(
           peak_rss_mb=None, rss_before_mb=None, rss_increase_mb=None)


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

# -- devices, precision, padded batches --------------------------------------


def device_summary():
  """What TensorFlow sees: its physical devices and any GPU's name."""
  devices = tf.config.list_physical_devices()
  text = "devices: " + ", ".join(f"{d.name} ({d.device_type})"
                                 for d in devices)
  for gpu in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(gpu)
    text += (f"; {gpu.name}: {details.get('device_name', '?')} (compute "
             f"capability {details.get('compute_capability', '?')})")
  if not tf.config.list_physical_devices("GPU"):
    text += "; no GPU"
  return text


def set_precision(policy):
  """The global dtype policy of both Kerases (before any model is built)."""
  import keras as keras3  # pylint: disable=g-import-not-at-top
  name = "float32" if policy == "none" else policy
  keras3.mixed_precision.set_global_policy(name)
  keras.mixed_precision.set_global_policy(name)


def settings(physical_batch_size):
  """One line: P, XLA and the dtype policy of a table."""
  return (f"batch {_FLAGS.batch_size}, physical_batch_size="
          f"{physical_batch_size}, jit_compile={_FLAGS.jit_compile}"
          + (f" (padded to {capacity(_FLAGS.batch_size)} rows)"
             if _FLAGS.jit_compile else "")
          + f", mixed_precision={_FLAGS.mixed_precision}" + _override_note())


def _override_note():
  value = _FLAGS.conv2d_depthwise_max_channels
  return ("" if value is None else
          f", Conv2DSampler.DEPTHWISE_MAX_CHANNELS={value} (diagnostic)")


def capacity(batch_size, multiple=None):
  """The padded rows of a Poisson batch of expected size `batch_size` from
  --num_examples examples (tail 1e-12), a multiple of `multiple` (default:
  --physical_batch_size or 1)."""
  n = _FLAGS.num_examples
  if not 1 <= batch_size <= n:
    raise app.UsageError(f"batch size {batch_size} must be in [1, "
                         f"--num_examples={n}]")
  return tdp.accounting.poisson_capacity(
      n, batch_size / n, multiple=multiple or _FLAGS.physical_batch_size or 1)


def padded_batch(x, y, rows):
  """`(x, y, w)`: the batch padded with zero rows to `rows`, weight 1 on
  its examples and 0 on padding (what `tdp.poisson_dataset(pad_to=rows)`
  yields)."""
  pad = rows - len(y)
  def grow(a):
    return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
  w = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
  return grow(x), grow(y), w


def _first_line(error):
  """A short reason for a table cell: the method, and the op XLA lacks or
  the error's first line."""
  text = str(error)
  match = re.search(r"No registered '(\w+)' OpKernel for (\w+)", text)
  if match:
    reason = f"no {match.group(2)} kernel for {match.group(1)}"
  else:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    reason = lines[0] if lines else ""
  method = getattr(error, "benchmark_method", None)
  return ((f"{method}: " if method else "") +
          f"{type(error).__name__}: {reason}")[:200].replace("|", "/")


def _check_traces(name, steppers):
  """Logs an error if a method's train step was traced again after warm-up
  (a retrace every step)."""
  for method, s in steppers.items():
    if s.traces != s.warmup_traces:
      logging.error("%s/%s: the train step was traced %d times after "
                    "warm-up (%d in warm-up): it retraces", name, method,
                    s.traces - s.warmup_traces, s.warmup_traces)


# -- memory sweep ------------------------------------------------------------


def _reset_peak_rss():
  """Resets this process's `VmHWM` to its current RSS (Linux >= 4.0: "5" to
  /proc/self/clear_refs), so that transient allocations before (making the
  data) do not hide the growth after; False where unsupported."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _gpu_peak_mb():
  if not tf.config.list_physical_devices("GPU"):
    return None
  return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def measure_sweep_point_here(batch_size, rows):
  """Peak memory of a few DP steps of the Keras 3 private --memory_model at
  logical batch `batch_size` (Poisson, padded to `rows`), in this (fresh)
  process. The baseline is taken after TensorFlow and the N examples are
  loaded, before the model is built, with the RSS high-water mark reset
  there (`_reset_peak_rss`)."""
  keras3 = keras_module("3")
  builder, kind = MODELS[_FLAGS.memory_model]
  steps = 1 + _FLAGS.memory_steps
  if _FLAGS.sweep_input == "fixed":
    x_all, y_all = model_batch(kind, batch_size, _FLAGS.seed)
    data, dataset = padded_batch(x_all, y_all, rows), None
  else:
    x_all, y_all = model_batch(kind, _FLAGS.num_examples, _FLAGS.seed)
    data, dataset = None, tdp.poisson_dataset(
        x_all, y_all, batch_size, steps=steps, seed=_FLAGS.seed, pad_to=rows)
  row_bytes = (x_all[0].nbytes + y_all[0].nbytes + 4)
  reset = _reset_peak_rss()
  before = _peak_rss_mb()
  if tf.config.list_physical_devices("GPU"):
    tf.config.experimental.reset_memory_stats("GPU:0")
  base = builder(keras3, _FLAGS.seed)
  stepper = Stepper("tdp_private", base, data, _FLAGS.seed, dataset=dataset,
                    jit_compile=_FLAGS.jit_compile,
                    physical_batch_size=_FLAGS.physical_batch_size,
                    expected_batch_size=batch_size)
  times = [stepper.step() for _ in range(steps)]
  peak = _peak_rss_mb()
  return dict(batch_size=batch_size, physical_batch_size=(
      _FLAGS.physical_batch_size), rows=rows, input_batch_mb=(
          rows * row_bytes / 2**20), peak_rss_mb=peak, rss_before_mb=before,
              rss_increase_mb=peak - before, gpu_peak_mb=_gpu_peak_mb(),
              first_step_s=times[0], step_ms=1e3 * float(np.median(times[1:])),
              traces=stepper.traces, peak_reset=reset,
              jit_compile=bool(stepper.model.jit_compile))


def _passthrough_flags():
  return [f"--memory_steps={_FLAGS.memory_steps}", f"--seed={_FLAGS.seed}",
          f"--mnist_dir={_FLAGS.mnist_dir}",
          f"--num_examples={_FLAGS.num_examples}",
          f"--memory_model={_FLAGS.memory_model}",
          f"--sweep_input={_FLAGS.sweep_input}",
          f"--jit_compile={_FLAGS.jit_compile}",
          f"--mixed_precision={_FLAGS.mixed_precision}"] + (
              [] if _FLAGS.conv2d_depthwise_max_channels is None else
              ["--conv2d_depthwise_max_channels="
               f"{_FLAGS.conv2d_depthwise_max_channels}"])


def _run_tagged(argv, what):
  """Runs `python -m launch.benchmark_speed argv` and returns its tagged
  JSON line (None on failure, logged)."""
  argv = [sys.executable, "-m", "launch.benchmark_speed"] + argv
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(argv, cwd=root, env=env, capture_output=True,
                        text=True, check=False)
  for line in done.stdout.splitlines():
    if line.startswith(_MEMORY_TAG):
      return json.loads(line[len(_MEMORY_TAG):])
  logging.error("memory subprocess for %s failed (exit %d):\n%s", what,
                done.returncode, done.stderr[-3000:])
  return None


def memory_sweep(batch_sizes, physical_batch_size):
  """Per logical batch size: the sweep point at P and (--sweep_unsplit)
  unsplit, on the same padded rows (a multiple of P). Returns (rows of
  results, markdown)."""
  results = []
  for b in batch_sizes:
    rows = capacity(b, physical_batch_size)
    for p in ([physical_batch_size, None] if _FLAGS.sweep_unsplit else
              [physical_batch_size]):
      start = time.perf_counter()
      r = _run_tagged(
          [f"--sweep_batch={b}", f"--sweep_capacity={rows}"] +
          ([] if p is None else [f"--physical_batch_size={p}"]) +
          _passthrough_flags(), f"B={b}, P={p}")
      r = r or dict(batch_size=b, physical_batch_size=p, rows=rows)
      r["wall_s"] = time.perf_counter() - start
      logging.info("sweep B=%d P=%s: %s", b, p, r)
      results.append(r)
  return results, sweep_table(results, physical_batch_size)


def sweep_table(results, physical_batch_size):
  gpu = any(r.get("gpu_peak_mb") is not None for r in results)
  cols = ["peak RSS MB", "+MB"] + (["GPU peak MB"] if gpu else []) + [
      "step ms"]
  groups = [f"P={physical_batch_size}"] + (
      ["unsplit"] if _FLAGS.sweep_unsplit else [])
  head = ["logical B", "padded rows", "input batch MB"] + [
      f"{g} {c}" for g in groups for c in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  by = {(r["batch_size"], r["physical_batch_size"]): r for r in results}
  for b in sorted({r["batch_size"] for r in results}):
    first = by[(b, physical_batch_size)]
    cells = [str(b), str(first["rows"]),
             _fmt(first.get("input_batch_mb"), ".1f")]
    for p in [physical_batch_size] + ([None] if _FLAGS.sweep_unsplit else []):
      r = by[(b, p)]
      cells += [_fmt(r.get("peak_rss_mb"), ".0f"),
                _fmt(r.get("rss_increase_mb"), ".0f")]
      if gpu:
        cells.append(_fmt(r.get("gpu_peak_mb"), ".0f"))
      cells.append(_fmt(r.get("step_ms"), ".0f"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# -- XLA comparison ----------------------------------------------------------


def xla_compare(names):
  """--xla_method (tdp_private or sgd) with jit_compile=True ("xla") vs
  False ("graph") on each Keras 3 model, alternating, on one static padded
  batch."""
  keras3 = keras_module("3")
  p = _FLAGS.physical_batch_size
  rows = capacity(_FLAGS.batch_size)
  method = _FLAGS.xla_method
  lines = [f"Keras 3 ({keras3.__version__}), {method}, batch "
           f"{_FLAGS.batch_size} padded to {rows} rows, physical_batch_size="
           f"{p}, mixed_precision={_FLAGS.mixed_precision}"
           f"{_override_note()}; {_FLAGS.steps} alternating rounds\n",
           "| model | XLA step / graph step (median [IQR]) | graph ms | XLA "
           "ms | warm-up s graph / XLA | traces graph / XLA |",
           "|---|---|---|---|---|---|"]
  results = {}
  for name in names:
    builder, kind = MODELS[name]
    base = builder(keras3, _FLAGS.seed)
    data = padded_batch(*model_batch(kind, _FLAGS.batch_size, _FLAGS.seed),
                        rows)
    try:
      steppers = run_timing(["graph", "xla"], lambda m: Stepper(
          method, base, data, _FLAGS.seed, jit_compile=(m == "xla"),
          physical_batch_size=p))
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("%s failed", name)
      lines.append(f"| {name} | failed: {_first_line(e)} | | | | |")
      continue
    _check_traces(name, steppers)
    if not steppers["xla"].model.jit_compile:
      logging.error("%s: Keras turned jit_compile off (a layer does not "
                    "support XLA)", name)
    r = summarize(steppers, reference="graph")["xla"]
    results[name] = r
    g, x = steppers["graph"], steppers["xla"]
    lines.append(
        f"| {name} | {r['ratio_median']:.2f}x [{r['ratio_q1']:.2f}, "
        f"{r['ratio_q3']:.2f}] | {1e3 * np.median(g.times):.1f} | "
        f"{r['median_ms']:.1f} | {g.warmup_s:.0f} / {x.warmup_s:.0f} | "
        f"{g.warmup_traces}+{g.traces - g.warmup_traces} / "
        f"{x.warmup_traces}+{x.traces - x.warmup_traces} |")
    logging.info(lines[-1])
  return results, "\n".join(lines)


def benchmark_models(names, version):
  """sgd vs the DP method of Keras `version` on each model (alternating);
  one row per model."""
  keras_ = keras_module(version)
  dp = MODEL_SET_DP[version]
  p = _FLAGS.physical_batch_size if version == "3" else None
  rows = [f"Keras {version} ({keras_.__name__} {keras_.__version__}), DP: "
          f"{dp}; {settings(p)}\n",
          "| model | DP step / SGD step (median [IQR]) | SGD step ms | DP step "
          "ms | samplers | target |", "|---|---|---|---|---|---|"]
  for name in names:
    builder, kind = MODELS[name]
    base = builder(keras_, _FLAGS.seed)
    data = model_batch(kind, _FLAGS.batch_size, _FLAGS.seed)
    if _FLAGS.jit_compile:
      data = padded_batch(*data, capacity(_FLAGS.batch_size))
    try:
      steppers = run_timing(["sgd", dp], lambda m: Stepper(
          m, base, data, _FLAGS.seed, jit_compile=_FLAGS.jit_compile,
          physical_batch_size=p))
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("%s failed", name)
      rows.append(f"| {name} | failed: {_first_line(e)} | | | | |")
      continue
    _check_traces(name, steppers)
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


def _model_names():
  names = (list(MODELS) if _FLAGS.models in (None, ["all"]) else
           _FLAGS.models)
  unknown = sorted(set(names) - set(MODELS))
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; known: "
                         f"{', '.join(MODELS)}")
  return names


def check_flags():
  """Refuses flag combinations a mode would ignore; returns the mode:
  "point" (internal), "sweep", "xla", "models" or "default"."""
  modes = [m for m, on in (("point", _FLAGS.sweep_batch is not None),
                           ("sweep", bool(_FLAGS.memory_sweep)),
                           ("xla", _FLAGS.xla_compare)) if on]
  if len(modes) > 1:
    raise app.UsageError(f"one mode at a time; got {modes}")
  mode = modes[0] if modes else ("models" if _FLAGS.models else "default")
  if mode != "default" and _FLAGS.memory_only:
    raise app.UsageError("--memory_only belongs to the default mode")
  p = _FLAGS.physical_batch_size
  if p is not None and p < 1:
    raise app.UsageError(f"--physical_batch_size={p} must be >= 1")
  if mode == "default" and (p is not None or _FLAGS.jit_compile or
                            _FLAGS.mixed_precision != "none" or
                            _FLAGS.conv2d_depthwise_max_channels is not None):
    raise app.UsageError(
        "--physical_batch_size, --jit_compile, --mixed_precision and "
        "--conv2d_depthwise_max_channels belong to the --models, "
        "--xla_compare and --memory_sweep modes")
  if mode == "xla" and _FLAGS.jit_compile:
    raise app.UsageError("--xla_compare times jit_compile=True against "
                         "False itself; drop --jit_compile")
  if mode == "models" and p is not None and _FLAGS.keras == "2":
    raise app.UsageError("--physical_batch_size applies to tdp.make_private "
                         "(--keras=3 or both); Keras 2's tdp_nomask is the "
                         "optimizer path")
  if mode == "point" and _FLAGS.sweep_capacity is None:
    raise app.UsageError("--sweep_batch needs --sweep_capacity")
  if mode == "sweep":
    try:
      sizes = [int(b) for b in _FLAGS.memory_sweep]
    except ValueError as e:
      raise app.UsageError(f"--memory_sweep={_FLAGS.memory_sweep}: "
                           "integers expected") from e
    if any(b < 1 for b in sizes):
      raise app.UsageError(f"--memory_sweep={sizes}: sizes must be >= 1")
  if _FLAGS.memory_model not in MODELS:
    raise app.UsageError(f"--memory_model={_FLAGS.memory_model!r}; known: "
                         f"{', '.join(MODELS)}")
  return mode


def _write_json(payload):
  if _FLAGS.output_json:
    with open(_FLAGS.output_json, "w") as f:
      json.dump(payload, f, indent=1)
    logging.info("wrote %s", _FLAGS.output_json)


def main(argv):
  del argv
  mode = check_flags()
  if _FLAGS.conv2d_depthwise_max_channels is not None:
    # pylint: disable=g-import-not-at-top
    from tfdpprune.core.samplers import dense as dense_samplers
    dense_samplers.Conv2DSampler.DEPTHWISE_MAX_CHANNELS = (
        _FLAGS.conv2d_depthwise_max_channels)
  if mode != "default":
    set_precision(_FLAGS.mixed_precision)
  if mode == "point":
    result = measure_sweep_point_here(_FLAGS.sweep_batch,
                                      _FLAGS.sweep_capacity)
    print(_MEMORY_TAG + json.dumps(result), flush=True)
    return
  if not _FLAGS.memory_only:
    print(device_summary(), flush=True)
  env = environment()
  if mode == "sweep":
    p = _FLAGS.physical_batch_size or 256
    sizes = [int(b) for b in _FLAGS.memory_sweep]
    start = time.perf_counter()
    results, table = memory_sweep(sizes, p)
    wall = time.perf_counter() - start
    source = (f"Poisson batches of N={_FLAGS.num_examples}"
              if _FLAGS.sweep_input == "poisson" else "one fixed batch")
    print(f"\nPeak memory of {_FLAGS.memory_steps} + 1 DP steps, Keras 3 "
          f"tdp_private on {_FLAGS.memory_model} ({source}, padded to a "
          f"multiple of P={p}), "
          f"jit_compile={_FLAGS.jit_compile}, mixed_precision="
          f"{_FLAGS.mixed_precision}{_override_note()}; one subprocess per "
          "cell; "
          f"{env['cpu_count']} CPUs, TF {env['tensorflow']}; "
          f"{wall:.0f} s in all\n")
    print(table)
    print()
    _write_json(dict(mode="memory_sweep", physical_batch_size=p,
                     environment=env, device=device_summary(),
                     wall_seconds=wall, results=results))
    return
  if mode == "xla":
    start = time.perf_counter()
    results, table = xla_compare(_model_names())
    wall = time.perf_counter() - start
    print(f"\n{env['cpu_count']} CPUs, TF {env['tensorflow']}; {wall:.0f} "
          "s in all\n")
    print(table)
    print()
    _write_json(dict(mode="xla_compare", environment=env,
                     device=device_summary(), wall_seconds=wall,
                     results=results))
    return
  if mode == "models":
    names = _model_names()
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
  steppers = run_timing(methods, lambda m: Stepper(m, base, (x, y),
                                                   _FLAGS.seed))
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
