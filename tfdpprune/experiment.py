"""The training loop of `python -m tfdpprune.train`: build, restore, train,
evaluate, log, save. Flags are parsed in `train.py`; this module takes a
validated `TrainConfig` and a working directory.
"""

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from typing import Optional

from absl import logging

from tfdpprune import accounting
from tfdpprune import callbacks as callbacks_lib
from tfdpprune import checkpointing
from tfdpprune import frontends
from tfdpprune import data as data_lib
from tfdpprune import ledger as ledger_lib
from tfdpprune import masks as masks_lib
from tfdpprune import randomness
from tfdpprune import models as models_lib
from tfdpprune import private_training
from tfdpprune import pruning
from tfdpprune import scattering
from tfdpprune._compat import tf
from tfdpprune.config import TrainConfig
from tfdpprune.optimizer import MaskedDPKerasAdamOptimizer
from tfdpprune.optimizer import MaskedDPKerasSGDOptimizer

RESULTS = "results.json"
CONFIG = "config.json"


def _versions():
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  import tfdpprune  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version(), "tensorflow": tf.__version__,
         "tfdpprune": tfdpprune.__version__}
  for pkg in ("keras", "tf-keras", "tensorflow-privacy", "dp-accounting"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return out


def _flag_error(flag, value, error):
  return ValueError(f"--{flag}={value!r}: {error}")


def load_data(config: TrainConfig, workdir: Optional[str] = None):
  """(private Dataset, public (x, y) or None), never counting public in N.

  With `validation_fraction`, the returned Dataset's training part excludes
  the validation examples; see `validation_split`. `workdir` is the run
  directory, where no feature cache may be.
  """
  try:
    dataset = data_lib.load_dataset(config.dataset, data_dir=config.data_dir,
                                    num_classes=config.num_classes)
  except (ValueError, FileNotFoundError) as e:
    raise _flag_error("dataset", config.dataset, e) from e
  if not dataset.num_train or not dataset.num_test:
    raise _flag_error(
        "dataset", config.dataset,
        f"has {dataset.num_train} training and {dataset.num_test} test "
        "examples: the trainer needs both (it trains on the first and "
        "reports the second)")
  public = None
  if config.public_dataset is not None:
    try:
      pub = data_lib.load_dataset(config.public_dataset)
    except (ValueError, FileNotFoundError) as e:
      raise _flag_error("public_dataset", config.public_dataset, e) from e
    if pub.x_train.shape[1:] != dataset.x_train.shape[1:]:
      raise _flag_error(
          "public_dataset", config.public_dataset,
          f"images of shape {pub.x_train.shape[1:]} do not match the "
          f"private data's {dataset.x_train.shape[1:]}")
    shared = data_lib.overlapping_examples(pub.x_train, dataset.x_train)
    if shared.size:
      raise _flag_error(
          "public_dataset", config.public_dataset,
          f"at least {shared.size} of its {pub.num_train} examples also "
          "appear in the "
          f"private training data (--dataset={config.dataset!r}; the first "
          f"is public example {shared[0]}). Public data must be disjoint "
          "from the private data: training on it is not private. Use "
          "another data set, or --public_fraction to hold out a public part")
    public = (pub.x_train, pub.y_train)
  elif config.public_fraction > 0:
    dataset, public = data_lib.split_public(dataset, config.public_fraction,
                                            seed=config.seed)
  if config.features is not None:
    dataset, public = _with_features(config, dataset, public, workdir)
  return dataset, public


# A directory (outside any run directory) to keep computed features in.
FEATURE_CACHE_ENV = "TFDPPRUNE_FEATURE_CACHE"


def feature_cache_dir(workdir: Optional[str] = None) -> Optional[str]:
  """`$TFDPPRUNE_FEATURE_CACHE`, refused inside `workdir` or any run
  directory: the cache holds a transform of the private data, and a run
  directory is released."""
  cache = os.environ.get(FEATURE_CACHE_ENV) or None
  if cache is None:
    return None
  inside = checkpointing.run_directory_of(cache)
  if inside is None and workdir is not None:
    real, run = os.path.realpath(cache), os.path.realpath(workdir)
    inside = run if os.path.commonpath([real, run]) == run else None
  if inside is not None:
    raise ValueError(
        f"${FEATURE_CACHE_ENV}={cache!r} lies inside the run directory "
        f"{inside}, which is released, but the cache holds a transform of "
        "the private data: keep it as private as the data, outside every "
        f"run directory (e.g. {FEATURE_CACHE_ENV}=~/.cache/tfdpprune/"
        "features)")
  return cache


def _with_features(config: TrainConfig, dataset, public, workdir=None):
  """The data with every image replaced by its fixed features: a public,
  data-independent map applied to each example alone, so the DP guarantee
  on the features is the guarantee on the images."""
  try:
    cache = feature_cache_dir(workdir)
  except ValueError as e:
    raise _flag_error("features", config.features, e) from e

  def features(x):
    return scattering.transform(
        x, progress="scattering features" if sys.stderr.isatty() else None,
        cache_dir=cache)

  try:  # the images' size is checked when the transform is built
    x_train = features(dataset.x_train)
  except ValueError as e:
    raise _flag_error("features", config.features, e) from e
  dataset = dataclasses.replace(dataset, x_train=x_train,
                                x_test=features(dataset.x_test))
  if public is not None:
    public = (features(public[0]), public[1])
  return dataset, public


def validation_split(config: TrainConfig, dataset):
  """`(training Dataset, (x_val, y_val) or None)`: the held-out validation
  part of the private training set (a public, seeded choice of examples)."""
  if not config.validation_fraction:
    return dataset, None
  seed = randomness.derived_key(config.seed, "validation")[0] % 2**32
  return data_lib.split_public(dataset, config.validation_fraction, seed)


def plan(config: TrainConfig, num_examples: int):
  """(steps, sampling probability, noise multiplier) of the run."""
  if num_examples < 1:
    raise _flag_error("dataset", config.dataset,
                      "leaves no private training examples after the "
                      "public and validation parts are held out")
  if config.delta >= 1.0 / num_examples:
    raise _flag_error("delta", config.delta,
                      f"must be < 1/N = {1.0 / num_examples:.3g} for N = "
                      f"{num_examples} private training examples")
  if config.batch_size > num_examples:
    raise _flag_error("batch_size", config.batch_size,
                      f"must be <= N = {num_examples}")
  q = config.batch_size / num_examples
  steps = config.steps or int(math.ceil(config.epochs / q))
  sigma = config.noise_multiplier
  if sigma is None:
    sigma = accounting.compute_noise_multiplier(
        config.target_epsilon, num_examples, config.batch_size, steps=steps,
        delta=config.delta, accountant=config.accountant,
        max_batch_size=capacity(config, num_examples))
  return steps, q, float(sigma)


# The flags a run's epsilon depends on: a resume must not change them.
PRIVACY_FLAGS = ("dataset", "data_dir", "num_classes", "features",
                 "public_dataset",
                 "public_fraction",
                 "validation_fraction",
                 "batch_size", "epochs", "steps", "noise_multiplier",
                 "target_epsilon", "l2_norm_clip", "delta", "accountant",
                 "noise_seed", "jit_compile")


def privacy_ledger(config: TrainConfig, dataset, sigma: float, q: float,
                   salt: str) -> ledger_lib.Ledger:
  """The run's `Ledger`: what its epsilon depends on."""
  return ledger_lib.Ledger(
      noise_multiplier=sigma, sampling_probability=q,
      num_examples=dataset.num_train, l2_norm_clip=config.l2_norm_clip,
      delta=config.delta, accountant=config.accountant,
      data_fingerprint=ledger_lib.fingerprint(
          dataset.x_train, dataset.y_train, salt=salt),
      private_randomness=config.noise_seed is None,
      flags=tuple((f, getattr(config, f)) for f in PRIVACY_FLAGS),
      fingerprint_salt=salt)


def fit_epochs(config: TrainConfig, steps: int, q: float):
  """`(steps_per_epoch, epochs)` of `model.fit`: with --epochs=E the
  progress shows ceil(E) epochs (not one more from rounding 1/q)."""
  if config.epochs is not None:
    epochs = max(1, int(math.ceil(config.epochs - 1e-9)))
    return int(math.ceil(steps / epochs)), epochs
  steps_per_epoch = max(1, int(round(1.0 / q)))
  return steps_per_epoch, int(math.ceil(steps / steps_per_epoch))


def keras_of(config: TrainConfig):
  """The Keras module of `--keras` (`tf_keras` for 2, `keras` for 3)."""
  return (frontends.keras3() if config.keras == 3 else
          frontends.keras2()).keras


def _loss(config: TrainConfig):
  """Keras 2's DP optimizer takes one loss per example; a private model
  (`uses_private_model`) takes the standard loss and computes them itself."""
  keras = keras_of(config)
  if uses_private_model(config):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                    reduction="none")


def _sgd(config: TrainConfig, learning_rate, momentum):
  """Non-private SGD for public pre-training (Keras 2: its legacy class)."""
  keras = keras_of(config)
  optimizers = (keras.optimizers if config.keras == 3 else
                keras.optimizers.legacy)
  return optimizers.SGD(learning_rate, momentum=momentum)


def build_model(config: TrainConfig, dataset, public):
  """The model with masks (public data only), before any DP step, in the
  Keras of `--keras` and the dtype policy of `--mixed_precision`."""
  keras = keras_of(config)
  keras.mixed_precision.set_global_policy(config.mixed_precision or
                                          "float32")
  keras.utils.set_random_seed(config.seed)
  try:
    options = {"width": config.model_width} if config.model_width != 1 else {}
    if config.keras == 3:  # builders default to tf_keras
      options["keras"] = keras
    if config.model_norm is not None:
      options["norm"] = config.model_norm
    model = models_lib.get_model(config.model, dataset.input_shape,
                                 dataset.num_classes, **options)
  except ValueError as e:
    raise _flag_error("model", config.model, e) from e
  except TypeError as e:
    flag = "model_width" if config.model_width != 1 else "model_norm"
    raise _flag_error(flag, getattr(config, flag),
                      f"model {config.model!r} has no such option") from e
  models_lib.check_dp_compatible(model)
  if config.init_checkpoint:
    path = config.init_checkpoint
    if not (os.path.exists(path) or os.path.exists(path + ".index")):
      raise _flag_error("init_checkpoint", path, "no such weights file or "
                        "TF checkpoint (model.save_weights output)")
    try:
      model.load_weights(path)
    except (ValueError, OSError) as e:
      raise _flag_error("init_checkpoint", path,
                        f"cannot load into model {config.model!r}: {e}") from e
  if public is not None and config.public_pretrain_epochs:
    model.compile(_sgd(config, config.learning_rate * 0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data_lib.shuffled_batches(*public, config.batch_size,
                                        seed=config.seed),
              epochs=config.public_pretrain_epochs, verbose=0)
  needs_public = config.prune is not None and config.prune.uses_public_data
  return pruning.prune(model, config.prune,
                       public_data=public if needs_public else None)


def mirrored_strategy(cpu_replicas: int = 0):
  """`MirroredStrategy` over the local GPUs, or `cpu_replicas` logical CPUs.

  Logical CPU devices must be configured before TensorFlow initializes its
  devices: call this first.
  """
  if cpu_replicas > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(cpu_replicas)])
  return tf.distribute.MirroredStrategy()


def learning_rate(config: TrainConfig, steps: int):
  """The learning rate or schedule: constant, or cosine decay to 0 over the
  run, after `lr_warmup_steps` of linear warm-up from lr / (W + 1) (every
  step, which costs privacy, moves the weights)."""
  keras = keras_of(config)
  if config.lr_schedule == "constant" and not config.lr_warmup_steps:
    return config.learning_rate
  lr = config.learning_rate
  warmup = min(config.lr_warmup_steps, max(steps - 1, 0))
  start = lr / (warmup + 1) if warmup else lr
  if config.lr_schedule == "constant":
    return keras.optimizers.schedules.CosineDecay(
        start, decay_steps=1, alpha=1.0, warmup_target=lr,
        warmup_steps=warmup) if warmup else lr
  return keras.optimizers.schedules.CosineDecay(
      start, decay_steps=max(steps - warmup, 1),
      warmup_target=lr if warmup else None, warmup_steps=warmup)


def make_optimizer(config: TrainConfig, sigma: float, steps: int = 1):
  """The masked DP optimizer of `config.optimizer` (sgd: momentum; adam),
  for Keras 2."""
  common = dict(learning_rate=learning_rate(config, steps),
                expected_batch_size=config.batch_size,
                noise_seed=config.noise_seed,
                augmentation_multiplicity=config.augmult)
  if config.optimizer == "adam":
    return MaskedDPKerasAdamOptimizer(config.l2_norm_clip, sigma, **common)
  return MaskedDPKerasSGDOptimizer(config.l2_norm_clip, sigma,
                                   momentum=config.momentum, **common)


def uses_private_model(config: TrainConfig) -> bool:
  """Whether the DP step is the model's train step (`tdp.make_private`):
  always on Keras 3; on Keras 2 for physical batches or float16 (the
  optimizer path cannot chunk a batch it only sees as a loss, nor undo a
  loss scale)."""
  return (config.keras == 3 or config.physical_batch_size is not None or
          config.mixed_precision == "mixed_float16")


def make_private(config: TrainConfig, model, sigma: float, steps: int = 1):
  """`(trained model, optimizer, DP step object)` of the run.

  Keras 2 (by default): the model itself, the masked DP optimizer, and the
  optimizer (which runs the DP step). Otherwise (`uses_private_model`): the
  private model of `tdp.make_private` (the DP step is its train step), a
  plain SGD (momentum) or Adam of the model's Keras, and the private model.
  All take the same mechanism (C, sigma, B, K, noise seed).
  """
  if not uses_private_model(config):
    optimizer = make_optimizer(config, sigma, steps)
    return model, optimizer, optimizer
  keras = keras_of(config)
  private = private_training.make_private(
      model, l2_norm_clip=config.l2_norm_clip, noise_multiplier=sigma,
      expected_batch_size=config.batch_size, noise_seed=config.noise_seed,
      augmentation_multiplicity=config.augmult,
      physical_batch_size=config.physical_batch_size)
  rate = learning_rate(config, steps)
  optimizers = (keras.optimizers if config.keras == 3 else
                keras.optimizers.legacy)
  optimizer = (optimizers.Adam(rate) if config.optimizer == "adam" else
               optimizers.SGD(rate, momentum=config.momentum))
  return private, optimizer, private


def capacity(config: TrainConfig, num_examples: int) -> Optional[int]:
  """The static batch capacity of `--jit_compile` (None without): the
  smallest multiple of the physical batch whose tail P(Binomial(N + 1, q) >
  capacity) is below 1e-12; the truncation is accounted in delta."""
  if not config.jit_compile:
    return None
  return accounting.poisson_capacity(
      num_examples, config.batch_size / num_examples,
      multiple=config.physical_batch_size or 1)


def multi_worker_strategy():
  """`MultiWorkerMirroredStrategy` from the `TF_CONFIG` environment."""
  return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy) -> bool:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  return (resolver.task_type == "chief" or
          (resolver.task_type == "worker" and resolver.task_id == 0))


class _Terminate:
  """SIGTERM -> checkpoint at the next step boundary, then stop."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _run_ledger(config, dataset, sigma, q, store):
  """The run's ledger; refuses (`LedgerMismatch`, before anything is
  written) a rerun whose ledger differs from its earlier segments'. The
  fingerprint salt is the run's first segment's."""
  earlier = store.earlier_ledgers
  salt = earlier[0].fingerprint_salt if earlier else ledger_lib.new_salt()
  ledger = privacy_ledger(config, dataset, sigma, q, salt)
  for segment in earlier:
    ledger_lib.check_resume(segment, ledger, store.workdir)
  return ledger


def _config_changes(workdir, config) -> str:
  """The settings that differ from the run directory's `config.json`."""
  try:
    with open(os.path.join(workdir, CONFIG)) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return ""
  def flat(d):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
      else:
        out[k] = v
    return out
  before, now = flat(saved), flat(config.to_dict())
  changed = [f"{k}: {before.get(k)!r} in the checkpoint, {now.get(k)!r} now"
             for k in sorted(set(before) | set(now))
             if before.get(k) != now.get(k)]
  return (" Changed: " + "; ".join(changed) + ".") if changed else ""


def run(config: TrainConfig, workdir: str, *, verbose: int = 1,
        strategy: Optional[tf.distribute.Strategy] = None,
        files: Optional[dict] = None) -> Optional[dict]:
  """Trains (or resumes) one run in `workdir`; returns the results dict.

  Returns None if the run was stopped by SIGTERM (after checkpointing);
  running it again resumes from the checkpoint, with fresh secret
  randomness: the resumed run matches an uninterrupted one in steps and
  epsilon (not bit for bit). A checkpoint whose privacy ledger differs
  (other privacy flags or private data) is refused (`ledger.LedgerMismatch`);
  so is a directory whose checkpoints or journal cannot be restored without
  losing released steps from epsilon (`ledger.ResumeRefused`, see
  `checkpointing`). A damaged newest checkpoint falls back to the newest
  readable one, and the steps in between count in epsilon.

  With a `strategy` (`MirroredStrategy`, `MultiWorkerMirroredStrategy`) the
  model and optimizer are built in its scope; each step's global Poisson
  batch is split across the replicas (`data.distributed_poisson_batches`)
  and the noise is added once, so epsilon equals the single-replica one.

  `config.json` (and `files`, `{name: text}`, e.g. the resolved flags) are
  written to `workdir` once the resume check passed, so a refused rerun
  leaves the run's files as they were.

  With `validation_fraction`, `fit`'s evaluation (`eval/*` in TensorBoard,
  the divergence check) stays on the test set; the private validation split
  is evaluated beside it under `nonprivate/validation/*`.

  Raises:
    ValueError: a flag is invalid for the data (the message starts with
      `--<flag>`), or `ledger.ResumeRefused` (`LedgerMismatch`).
    callbacks.NonFiniteLossError: the loss or weights became non-finite; the
      last good checkpoint is kept.
    checkpointing.RunDirectoryError: the run directory cannot be written.
  """
  strategy = strategy or tf.distribute.get_strategy()
  start_time = time.time()
  checkpointing.check_writable(workdir)
  store = checkpointing.RunCheckpoints(workdir)  # reads only; may refuse
  if config.noise_seed is not None:
    logging.warning(
        "--noise_seed=%d: DP noise and Poisson sampling are reproducible and "
        "NOT secret; the reported epsilon only holds against an adversary "
        "who does not know the seed. For experiments only.",
        config.noise_seed)

  if config.jit_compile and strategy.num_replicas_in_sync > 1:
    raise _flag_error("jit_compile", True,
                      "pads every Poisson batch to one static shape on one "
                      "device; it is not supported with "
                      f"{strategy.num_replicas_in_sync} replicas yet (drop "
                      "--jit_compile or --distribute)")

  # -- input -----------------------------------------------------------------
  dataset, public = load_data(config, workdir)
  dataset, validation = validation_split(config, dataset)
  n = dataset.num_train
  steps, q, sigma = plan(config, n)
  logging.info("N=%d private examples, q=%.4g, %d steps, sigma=%.4f", n, q,
               steps, sigma)

  # -- model & optimizer ----------------------------------------------------
  with strategy.scope():
    model, optimizer, dp = make_private(
        config, build_model(config, dataset, public), sigma, steps)
    averaging = (callbacks_lib.WeightAveraging(config.ema_decay).build(model)
                 if config.ema_decay else None)
    model.compile(optimizer=optimizer, loss=_loss(config),
                  metrics=["accuracy"], jit_compile=config.jit_compile)
    if config.keras == 3:  # its slots exist before a restore fills them
      model.base_optimizer.build(model.trainable_variables)
    optimizer = model.optimizer  # with a LossScaleOptimizer, the wrapper

  # -- restore ----------------------------------------------------------------
  ledger = _run_ledger(config, dataset, sigma, q, store)
  state = ledger_lib.LedgerState(ledger, dp.iterations)
  parts = dict(model=model, optimizer=optimizer, ledger=state)
  if averaging is not None:
    parts["weight_average"] = averaging.state
  checkpoint = tf.train.Checkpoint(**parts)
  start = store.start(checkpoint, dp.iterations, ledger,
                      mismatch=lambda: _config_changes(workdir, config))
  abandoned_steps = store.abandoned_steps
  for name, text in [(CONFIG, json.dumps(config.to_dict(), indent=2))] + (
      list((files or {}).items())):
    checkpointing.write_atomically(os.path.join(workdir, name), text)
  if start:
    logging.info("Resumed from %s at step %d", store.resume_from, start)

  # -- train ------------------------------------------------------------------
  steps_per_epoch, epochs = fit_epochs(config, steps, q)
  if config.jit_compile:  # one static shape: one XLA compilation
    train = data_lib.poisson_batches(
        dataset.x_train, dataset.y_train, q, steps, seed=config.noise_seed,
        start_step=start, augmult=config.augmult, pad_to=capacity(config, n))
  else:
    train = data_lib.distributed_poisson_batches(
        strategy, dataset.x_train, dataset.y_train, q, steps,
        seed=config.noise_seed, start_step=start, augmult=config.augmult)
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)

  def evaluation(x, y):
    return data_lib.shuffled_batches(x, y, config.eval_batch_size,
                                     seed=None).with_options(options)
  test = evaluation(dataset.x_test, dataset.y_test)
  writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
  with _Terminate() as terminate:
    saver = callbacks_lib.CheckpointEveryEpoch(
        store, lambda: terminate.requested, saved_step=start)
    saver.set_model(model)
    callbacks = [
        saver,  # first: it checks the released state for finiteness
        callbacks_lib.PrivacyCallback(n, config.batch_size, sigma,
                                      delta=config.delta,
                                      accountant=config.accountant,
                                      dataset=train,
                                      prior_steps=abandoned_steps),
        callbacks_lib.StepLimit(steps),
        callbacks_lib.TrainingSummaries(
            writer, config.to_dict(), nonprivate=config.nonprivate_metrics,
            should_write=lambda: saver.failure is None),
    ]
    validating = None
    if validation is not None:
      validating = callbacks_lib.ValidationSummaries(
          writer, evaluation(*validation), averaging,
          should_write=lambda: saver.failure is None)
      callbacks.append(validating)
    if averaging is not None:
      callbacks.insert(1, averaging)  # evaluation sees the averaged weights
    if not config.nonprivate_metrics:
      callbacks.append(callbacks_lib.HideNonPrivateLogs())
    if start < steps:
      model.fit(train, epochs=epochs, steps_per_epoch=steps_per_epoch,
                initial_epoch=min(start // steps_per_epoch, epochs - 1),
                validation_data=test, callbacks=callbacks, verbose=verbose)
    if saver.failure is None and terminate.requested:
      saver.save()
      logging.warning("SIGTERM: checkpointed at step %d; rerun to resume",
                      int(dp.iterations.numpy()))
      return None
  if saver.failure is None:
    saver.save()
  if saver.failure is not None:
    # The steps after the last checkpoint were taken (and their failure
    # released): a rerun from that checkpoint accounts them.
    store.record_abandoned(saver.failure_step - saver.saved_step)
    raise callbacks_lib.NonFiniteLossError(saver.failure)

  # -- evaluate & save ----------------------------------------------------------
  done = int(dp.iterations.numpy())
  last_loss, last_accuracy = model.evaluate(test, verbose=0)
  test_loss, test_accuracy = last_loss, last_accuracy
  if averaging is not None:
    with averaging.swapped():
      test_loss, test_accuracy = model.evaluate(test, verbose=0)
  # With --jit_compile the batches are truncated at the static capacity:
  # the same spec as PrivacyCallback's adds the truncation to delta.
  epsilon = accounting.PrivacySpec(
      n, config.batch_size, sigma, config.delta, config.accountant,
      max_batch_size=capacity(config, n)).epsilon(done + abandoned_steps)
  density = masks_lib.density(model)
  results = {
      "test_accuracy": float(test_accuracy), "test_loss": float(test_loss),
      "test_accuracy_last_iterate": float(last_accuracy),
      "epsilon": float(epsilon), "delta": config.delta,
      "noise_multiplier": sigma, "l2_norm_clip": config.l2_norm_clip,
      "steps": done, "abandoned_steps": abandoned_steps,
      "sampling_probability": q, "num_examples": n,
      "batch_capacity": capacity(config, n),
      "batch_size": config.batch_size, "accountant": config.accountant,
      "private_randomness": config.noise_seed is None,
      "sparsity": 1.0 - density["overall"], "density": density,
      "wall_time_s": time.time() - start_time, "resumed_from_step": start,
      "versions": _versions(), "config": config.to_dict(),
      "replicas": strategy.num_replicas_in_sync,
      "ledger": ledger.public_dict(),
  }
  if validating is not None:
    values = validating.evaluate()
    results.update(
        validation_accuracy=float(values["accuracy"]),
        validation_loss=float(values["loss"]),
        num_validation=len(validation[1]),
        validation_note=("held-out private training examples, for tuning: "
                         "outside the DP guarantee"))
  with writer.as_default():
    callbacks_lib.write_scalar("eval/final_accuracy", test_accuracy, step=done)
  writer.flush()
  checkpointing.write_atomically(os.path.join(workdir, RESULTS),
                                 json.dumps(results, indent=2))
  return results
