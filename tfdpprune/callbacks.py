"""Keras callbacks: privacy accounting (epsilon, budget stop), step limits,
checkpoints and TensorBoard summaries (one writer per run) in `fit`.

The step count always comes from the object that runs the DP step
(`dp_of(model)`: the Keras 2 optimizer, or the Keras 3 private model of
`tdp.make_private`), the steps that really happened; it is a checkpointed
variable, so a resumed run reports the same epsilon as an uninterrupted one.
The callbacks are `tf_keras` callbacks; Keras 3's `fit` takes them as they
are.
"""

import dataclasses
import json
import math
import numbers
from typing import Optional

from absl import logging
from scipy import stats

from tfdpprune import data as data_lib
from tfdpprune.core import accounting
from tfdpprune.core import masks as masks_lib
from tfdpprune.keras2.compat import keras
from tfdpprune.keras2.compat import tf

# What `tf.summary.scalar` writes, without needing the `tensorboard` package
# (TensorFlow 2.21 does not install it): a float32 scalar tagged for the
# TensorBoard scalars plugin.
_SCALAR_METADATA = tf.compat.v1.SummaryMetadata(
    plugin_data=dict(plugin_name="scalars"), data_class="DATA_CLASS_SCALAR")


def write_scalar(tag: str, value: float, step: int) -> None:
  """Writes a TensorBoard scalar to the default summary writer."""
  tf.summary.write(tag, tf.constant(value, tf.float32), step=step,
                   metadata=_SCALAR_METADATA)


def dp_of(model):
  """What runs the DP step of `model`: the model itself for a Keras 3
  private model (`tdp.make_private`), else its (Keras 2) optimizer. It has
  `iterations` (the DP step count) and, for DP, `noise_multiplier`."""
  if hasattr(model, "noise_multiplier") and hasattr(model, "iterations"):
    return model
  optimizer = getattr(model, "optimizer", None)
  if optimizer is None:
    raise RuntimeError("the callback needs a compiled model: it reads the "
                       "step count from model.optimizer.iterations")
  return optimizer


def dp_steps(model) -> int:
  """The DP step count of `model` (`dp_of(model).iterations`)."""
  return int(dp_of(model).iterations.numpy())


class PrivacyCallback(keras.callbacks.Callback):
  """Reports DP-SGD's epsilon and stops training at a privacy budget.

  - At each epoch end, adds `epsilon` (at the optimizer's step count) to the
    logs, so the progress bar and `History` show it, and writes the scalars
    `privacy/epsilon` and `privacy/noise_multiplier` to TensorBoard at
    step = `optimizer.iterations` (also at train begin).
  - With `target_epsilon`, the step budget `max_steps` (the largest step count
    whose epsilon is <= target) is computed once, at construction; after each
    batch, training stops if the next batch would exceed it (an integer
    comparison; the accountant is not called per batch). Training therefore
    ends at exactly `max_steps` steps when the data allow it, or earlier with
    `steps_per_execution` > 1 (a batch of k steps is not split).

  Epsilon assumes Poisson sampling with rate q = batch_size / num_examples
  (see `tfdpprune.accounting`). Pass the training input as `dataset`: a
  Poisson-sampled one from `tdp.poisson_dataset` carries its sampling, which
  is checked against (N, q); anything else (fixed-size shuffled batches from
  `model.fit(x, y, batch_size=...)`, say) draws a warning at train begin,
  because the printed epsilon would not hold for it. A dataset whose
  batches are truncated (`poisson_dataset(max_batch_size=...)`) has the
  truncation's cost counted in delta (`accounting.PrivacySpec.
  max_batch_size`): epsilon holds at `delta` in total, and a cap that would
  spend more than half of `delta` over the dataset's steps is refused.

  Under Poisson sampling the DP step must divide the noised sum by the
  *expected* batch size B: the realized size |B_t| is private (it can be
  read off the spread of the noise in a released update). A masked DP
  optimizer without `expected_batch_size` is given B here, at train begin;
  another DP optimizer that divides by the realized size (TF Privacy's own)
  is refused.

  ```python
  import tfdpprune as tdp
  batches = tdp.poisson_dataset(x, y, batch_size=256, epochs=100)
  cb = tdp.PrivacyCallback(num_examples=60000, batch_size=256,
                           noise_multiplier=1.1, target_epsilon=3.0,
                           log_dir="/tmp/run", dataset=batches)
  model.fit(batches, callbacks=[cb])
  print(cb.epsilon, cb.max_steps)   # <= 3.0, 18338
  ```

  Args:
    num_examples: N, the size of the private training set.
    batch_size: B, the (expected) batch size; q = B / N.
    noise_multiplier: sigma of the DP optimizer. If the optimizer exposes a
      `noise_multiplier` attribute, it must be equal (checked at train begin).
    delta: in (0, 1).
    target_epsilon: optional budget > 0; training stops before exceeding it.
    log_dir: optional TensorBoard directory, or a `tf.summary.SummaryWriter`
      to share with other summaries.
    accountant: "rdp" or "pld" (`tfdpprune.accounting`).
    dataset: the training input, to confirm it is Poisson-sampled with this
      N and q (see above).
    prior_steps: steps of the same mechanism taken and released outside the
      optimizer's count (e.g. abandoned after a divergence), counted in
      epsilon and the budget.

  Attributes:
    spec: the validated `accounting.PrivacySpec`.
    target_epsilon: the budget, or None.
    max_steps: the step budget (an int), or None without `target_epsilon`.
    steps, epsilon: properties, the optimizer's step count and the epsilon
      there (they need the model).

  Raises:
    ValueError: naming the argument, if an argument is out of range; if
      `dataset` samples another N or q, or truncates its batches at a cap
      that spends more than half of delta; at train begin, if the
      optimizer's `noise_multiplier` or `augmentation_multiplicity` differs
      from the callback's / dataset's, or the optimizer divides by the
      realized batch size and cannot be told the expected one.
    RuntimeError: at train begin, if the budget is already spent (Keras runs
      the first batch before it looks at `stop_training`).
  """

  def __init__(self,
               num_examples: int,
               batch_size: int,
               noise_multiplier: float,
               delta: float = 1e-5,
               target_epsilon: Optional[float] = None,
               log_dir=None,
               accountant: str = "rdp",
               dataset=None,
               prior_steps: int = 0):
    super().__init__()
    self.sampling = None if dataset is None else data_lib.poisson_spec(dataset)
    cap = None if self.sampling is None else self.sampling.max_batch_size
    self.spec = accounting.PrivacySpec(num_examples, batch_size,
                                       noise_multiplier, delta, accountant,
                                       max_batch_size=cap)
    if self.sampling is not None and (
        self.sampling.num_examples != self.spec.num_examples or
        not math.isclose(self.sampling.sampling_probability,
                         self.spec.sampling_probability, rel_tol=1e-9)):
      raise ValueError(
          f"PrivacyCallback(num_examples={num_examples}, batch_size="
          f"{batch_size}) accounts q = {self.spec.sampling_probability:.6g} "
          f"over N = {num_examples}, but its dataset samples q = "
          f"{self.sampling.sampling_probability:.6g} over N = "
          f"{self.sampling.num_examples}")
    if cap is not None:
      self._check_truncation(self.sampling.num_steps)
    if (isinstance(prior_steps, bool) or
        not isinstance(prior_steps, numbers.Integral) or prior_steps < 0):
      raise ValueError(f"prior_steps={prior_steps!r} must be an integer >= 0")
    self.prior_steps = int(prior_steps)
    self.target_epsilon = target_epsilon
    self.max_steps = (None if target_epsilon is None else
                      self.spec.max_steps(target_epsilon))
    self.log_dir = log_dir
    self._writer = (log_dir if isinstance(log_dir, tf.summary.SummaryWriter)
                    else None)
    self._k = 1  # steps per execution of the train function, set per fit
    # Batch hooks only read the optimizer's step; logs stay as tensors.
    self._supports_tf_logs = True

  @property
  def steps(self) -> int:
    """The DP step count (`model.optimizer.iterations`, or the Keras 3
    private model's `iterations`)."""
    return dp_steps(self.model)

  @property
  def epsilon(self) -> float:
    """Epsilon at the optimizer's current step count plus `prior_steps`
    (cached per step)."""
    return self.spec.epsilon(self.steps + self.prior_steps)

  def _check_truncation(self, steps):
    spent = self.spec.truncation_delta(steps)
    if spent <= self.spec.delta / 2:
      return
    n, q, cap = (self.spec.num_examples, self.spec.sampling_probability,
                 self.spec.max_batch_size)
    p = accounting.poisson_truncation_probability(n + 1, q, cap)
    # A cap whose truncation would cost at most 1e-3 * delta.
    eps = dataclasses.replace(self.spec, delta=self.spec.delta / 2,
                              max_batch_size=None).epsilon(steps)
    safe = int(stats.binom.isf(1e-3 * self.spec.delta / (
        steps * (1 + math.exp(min(eps, 700)))), n + 1, q)) + 1
    raise ValueError(
        f"the dataset truncates batches at max_batch_size={cap}: with N={n} "
        f"and q={q:.4g} a step is truncated with probability {p:.3g}, which "
        f"over its {steps} steps costs delta_T={spent:.3g} (the bound "
        "(1 + e^eps) * steps * p), more than half of delta="
        f"{self.spec.delta:g}: the printed epsilon would not hold. Use a "
        f"cap of at least {safe} (or none)")

  def _steps_per_execution(self) -> int:
    spe = getattr(self.model, "_steps_per_execution", None)  # Keras 2
    if spe is None:
      spe = getattr(self.model, "steps_per_execution", None)  # Keras 3
    return 1 if spe is None else int(tf.convert_to_tensor(spe).numpy())

  def _check_noise_multiplier(self):
    sigma = getattr(dp_of(self.model), "noise_multiplier", None)
    if (isinstance(sigma, numbers.Real) and
        not math.isclose(sigma, self.spec.noise_multiplier, rel_tol=1e-9)):
      raise ValueError(
          f"PrivacyCallback noise_multiplier={self.spec.noise_multiplier!r} "
          f"differs from the DP step's noise_multiplier={sigma!r}; epsilon "
          "would describe a different mechanism than the one trained")

  def _write(self, epsilon: float):
    if self._writer is None:
      return
    step = self.steps
    with self._writer.as_default():
      write_scalar("privacy/epsilon", epsilon, step)
      write_scalar("privacy/noise_multiplier", self.spec.noise_multiplier,
                   step)

  def _check_augmult(self):
    """The dataset's rows per example must be what the optimizer groups:
    else each augmented copy is clipped alone (sensitivity K * C)."""
    grouped = getattr(dp_of(self.model), "augmentation_multiplicity", 1)
    rows = 1 if self.sampling is None else self.sampling.augmult
    if self.sampling is not None and rows != grouped:
      raise ValueError(
          f"the dataset gives {rows} augmented rows per example but the "
          f"optimizer's augmentation_multiplicity is {grouped}: each example "
          "must be clipped as one (use the same K in tdp.poisson_dataset("
          "augmult=K) and the optimizer)")

  def _check_denominator(self):
    """The optimizer must divide by the expected batch size B, not by the
    realized |B_t|, which is private under Poisson sampling."""
    optimizer = dp_of(self.model)
    if not (hasattr(optimizer, "_dp_sum_query") or (  # TF Privacy's
        hasattr(optimizer, "_noise_multiplier") and
        hasattr(optimizer, "_num_microbatches"))):
      return  # not an optimizer whose denominator is known here
    if hasattr(optimizer, "expected_batch_size"):
      if optimizer.expected_batch_size is None:
        optimizer.expected_batch_size = self.spec.batch_size
        self.model.make_train_function(force=True)
        logging.info("PrivacyCallback: the optimizer divides by the "
                     "expected batch size %d (it had no "
                     "expected_batch_size).", self.spec.batch_size)
      return
    raise ValueError(
        f"{type(optimizer).__name__} divides each noised sum by the realized "
        "batch size, which Poisson sampling makes private (an adversary can "
        "read it off the spread of the noise in one released update), so "
        "the epsilon reported here would not hold. Use "
        "tdp.MaskedDPKerasSGDOptimizer / MaskedDPKerasAdamOptimizer with "
        f"expected_batch_size={self.spec.batch_size}")

  def on_train_begin(self, logs=None):
    self._check_noise_multiplier()
    self._check_denominator()
    self._check_augmult()
    if self.sampling is None:
      logging.warning(
          "PrivacyCallback cannot confirm that training batches are "
          "Poisson-sampled with q = %.4g over N = %d, as the epsilon it "
          "reports assumes (fixed-size shuffled batches, e.g. model.fit(x, "
          "y, batch_size=...), are NOT covered). Train on "
          "tdp.poisson_dataset(x, y, batch_size, epochs) and pass it as "
          "PrivacyCallback(..., dataset=...), or use "
          "tdp.make_private_with_epsilon.",
          self.spec.sampling_probability, self.spec.num_examples)
    self._k = self._steps_per_execution()
    if self.max_steps is not None:
      steps, k = self.steps + self.prior_steps, self._k
      if steps + k > self.max_steps:
        raise RuntimeError(
            f"The privacy budget target_epsilon={self.target_epsilon!r} is "
            f"spent: the optimizer has taken {steps} of max_steps="
            f"{self.max_steps} steps (epsilon={self.epsilon:.4g}), and one "
            f"more execution of {k} step(s) would exceed it.")
    if self.log_dir is not None and self._writer is None:
      self._writer = tf.summary.create_file_writer(self.log_dir)
    self._write(self.epsilon)

  def on_train_batch_end(self, batch, logs=None):
    if (self.max_steps is not None and
        self.steps + self.prior_steps + self._k > self.max_steps):
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    epsilon = self.epsilon
    if logs is not None:
      logs["epsilon"] = epsilon
    self._write(epsilon)

  def on_train_end(self, logs=None):
    if self._writer is not None:
      self._writer.flush()


class StepLimit(keras.callbacks.Callback):
  """Stops training when the optimizer has taken `steps` steps in total."""

  def __init__(self, steps):
    super().__init__()
    self.steps = int(steps)

  def on_train_batch_end(self, batch, logs=None):
    if dp_steps(self.model) >= self.steps:
      self.model.stop_training = True


class NonFiniteLossError(RuntimeError):
  """Training diverged (non-finite weights or test loss); the last good
  checkpoint was kept."""


class CheckpointEveryEpoch(keras.callbacks.Callback):
  """Saves a `tf.train.CheckpointManager` every epoch and on request, and
  never saves a non-finite state.

  `should_stop()` (e.g. a SIGTERM flag) is polled after every step; when it
  is true the callback saves and stops training at that step boundary.

  Divergence is detected from released quantities only — the weights after
  each step (post-processing of the DP iterate) and the evaluation loss
  (`val_loss`: `fit`'s validation data must be the public test set) at epoch
  ends — never from the loss of private training batches or of a private
  validation split, whose finiteness would reveal whether a crafted example
  was sampled or held out. On divergence training stops without saving, so the
  last checkpoint is the last good state; `failure` says what happened,
  `failure_step` when, and `saved_step` is the step of the last save (the
  trainer turns this into `NonFiniteLossError`, a non-zero exit, and
  accounts the abandoned steps).
  """

  def __init__(self, manager, should_stop=None, saved_step: int = 0):
    super().__init__()
    self.manager = manager
    self.should_stop = should_stop or (lambda: False)
    self.failure = None
    self.failure_step = None
    self.saved_step = saved_step
    self._finite = None

  def _step(self) -> int:
    return dp_steps(self.model)

  def _weights_finite(self) -> bool:
    if self._finite is None:
      variables = [v for v in self.model.variables
                   if tf.as_dtype(v.dtype).is_floating]
      self._finite = tf.function(lambda: tf.reduce_all(
          [tf.reduce_all(tf.math.is_finite(v)) for v in variables]))
    return bool(self._finite())

  def _fail(self, what):
    kept = self.manager.latest_checkpoint
    kept = (f"the last good checkpoint ({kept}) was kept" if kept else
            "no checkpoint had been written yet")
    self.failure_step = self._step()
    self.failure = (f"{what} at optimizer step {self.failure_step}: "
                    f"training stopped and {kept}. Lower the learning rate "
                    "or check the model.")
    self.model.stop_training = True

  def save(self) -> bool:
    """Saves if every weight is finite and the step is not saved yet;
    returns whether the state at this step is checkpointed."""
    if self.failure is not None:
      return False
    if self._step() == self.saved_step and self.manager.latest_checkpoint:
      return True
    if not self._weights_finite():
      self._fail("non-finite weights")
      return False
    self.manager.save()
    self.saved_step = self._step()
    return True

  def on_train_begin(self, logs=None):
    self._weights_finite()  # traced here, not in the first step's timing

  def on_train_batch_end(self, batch, logs=None):
    if self.failure is not None:
      return
    if not self._weights_finite():
      self._fail("non-finite weights")
    elif self.should_stop():
      self.save()
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    loss = (logs or {}).get("val_loss")
    if self.failure is None and loss is not None and not math.isfinite(
        float(loss)):
      self._fail(f"non-finite test loss ({float(loss)})")
    self.save()


class WeightAveraging(keras.callbacks.Callback):
  """An exponential moving average (EMA) of the weights, used to evaluate.

  After every step, `shadow = d * shadow + (1 - d) * weights` for the
  trainable variables, with `d = min(decay, (1 + t) / (10 + t))` at the t-th
  update (a warm-up, as in De et al. 2022); evaluation (`model.evaluate`,
  `fit`'s validation, `swapped()`) runs on the averaged weights. The average
  is post-processing of the DP iterates: no privacy cost. `state` holds the
  shadow variables and the update count, for checkpoints (so a resumed run
  continues the same average).

  Build it (`build(model)`) before restoring a checkpoint that holds `state`.
  """

  def __init__(self, decay: float = 0.999):
    super().__init__()
    if not 0.0 < decay < 1.0:
      raise ValueError(f"decay={decay!r} must be in (0, 1)")
    self.decay = float(decay)
    self.state = None
    self._update = self._swap = None

  def build(self, model):
    """Creates the shadow variables (copies of the trainable weights)."""
    self.set_model(model)
    variables = list(model.trainable_variables)
    with tf.init_scope():
      state = tf.Module(name="weight_average")
      state.shadow = [tf.Variable(v, trainable=False,
                                  name=v.name.split(":")[0].replace("/", "_")
                                  + "_ema") for v in variables]
      state.count = tf.Variable(0, dtype=tf.int64, trainable=False,
                                name="ema_count")
    self.state = state

    @tf.function
    def update():
      t = tf.cast(state.count, tf.float32)
      d = tf.minimum(self.decay, (1.0 + t) / (10.0 + t))
      for shadow, var in zip(state.shadow, variables):
        shadow.assign(tf.cast(d, var.dtype) * shadow +
                      tf.cast(1.0 - d, var.dtype) * var)
      state.count.assign_add(1)

    @tf.function
    def swap():
      for shadow, var in zip(state.shadow, variables):
        value = tf.identity(var)
        var.assign(shadow)
        shadow.assign(value)

    self._update, self._swap = update, swap
    return self

  def swapped(self):
    """Context: the model holds the averaged weights inside the block."""
    callback = self

    class _Swapped:

      def __enter__(self):
        callback._swap()  # pylint: disable=protected-access

      def __exit__(self, *exc):
        callback._swap()  # pylint: disable=protected-access
    return _Swapped()

  def on_train_begin(self, logs=None):
    if self.state is None:
      self.build(self.model)

  def on_train_batch_end(self, batch, logs=None):
    self._update()

  def on_test_begin(self, logs=None):
    if self.state is not None:
      self._swap()

  def on_test_end(self, logs=None):
    if self.state is not None:
      self._swap()


class HideNonPrivateLogs(keras.callbacks.Callback):
  """Removes statistics of private training batches from Keras logs.

  Keras reports the training loss and metrics of the private batches in the
  progress bar and `History`; they are computed from private data outside
  the DP mechanism, so a released log must not contain them. Put this
  callback after those that need them: it keeps `epsilon`, evaluation
  metrics (`val_*`) and the labelled validation metrics the user asked for
  (`nonprivate_validation_*`, `ValidationSummaries`).
  """

  def _hide(self, logs):
    if logs:
      for key in [k for k in logs if not k.startswith(
          ("val_", ValidationSummaries.LOG_PREFIX)) and k != "epsilon"]:
        del logs[key]

  def on_train_batch_end(self, batch, logs=None):
    self._hide(logs)

  def on_epoch_end(self, epoch, logs=None):
    self._hide(logs)


class ValidationSummaries(keras.callbacks.Callback):
  """Evaluates a held-out *private* validation split at every epoch end.

  Its metrics are statistics of private examples, outside the DP guarantee,
  so they go under their own labelled names: TensorBoard tags
  `nonprivate/validation/<metric>` and log keys
  `nonprivate_validation_<metric>` (shown in the progress bar). They never
  take the test set's `eval/*` tags or `fit`'s `val_*` keys, and nothing
  (divergence checks, early stopping) should read them.

  Args:
    writer: a `tf.summary` writer.
    data: the validation input (`(x, y)` batches).
    averaging: an optional `WeightAveraging`, whose averaged weights are
      evaluated (as `fit`'s validation would).
    should_write: as in `TrainingSummaries`.
  """

  LOG_PREFIX = "nonprivate_validation_"

  def __init__(self, writer, data, averaging=None, should_write=None):
    super().__init__()
    self.writer = writer
    self.data = data
    self.averaging = averaging
    self.should_write = should_write or (lambda: True)

  def evaluate(self) -> dict:
    """`{metric: value}` on the validation data (averaged weights if any)."""
    if self.averaging is None:
      return self.model.evaluate(self.data, verbose=0, return_dict=True)
    with self.averaging.swapped():
      return self.model.evaluate(self.data, verbose=0, return_dict=True)

  def on_epoch_end(self, epoch, logs=None):
    if not self.should_write():
      return
    values = self.evaluate()
    step = dp_steps(self.model)
    with self.writer.as_default():
      for name, value in values.items():
        write_scalar(f"nonprivate/validation/{name}", value, step=step)
    if logs is not None:
      logs.update({self.LOG_PREFIX + k: v for k, v in values.items()})


class SparsitySummaries(keras.callbacks.Callback):
  """Writes `sparsity/<layer>` (fraction updated) and `sparsity/overall`.

  Args:
    writer: a `tf.summary` writer or a log directory.
  """

  def __init__(self, writer):
    super().__init__()
    if isinstance(writer, str):
      writer = tf.summary.create_file_writer(writer)
    self.writer = writer

  def on_epoch_end(self, epoch, logs=None):
    write_sparsity(self.writer, self.model, dp_steps(self.model))


def write_sparsity(writer, model, step):
  with writer.as_default():
    for name, value in masks_lib.density(model).items():
      write_scalar(f"sparsity/{name}", value, step=step)


class TrainingSummaries(keras.callbacks.Callback):
  """One writer for a run's TensorBoard scalars (chief only).

  Tags: `eval/loss`, `eval/accuracy`, `privacy/epsilon`,
  `privacy/noise_multiplier`, `sparsity/...`, and the config as text at step
  0. With `nonprivate=True` (opt-in) also `nonprivate/train_loss`,
  `nonprivate/train_accuracy` (private batches) and `nonprivate/clip_fraction`
  (raw per-example gradients): outside the DP guarantee. Nothing is written
  at an epoch end where `should_write()` is false (e.g. after divergence).
  """

  def __init__(self, writer, config: dict, nonprivate: bool = False,
               should_write=None):
    super().__init__()
    self.writer = writer
    self.config = config
    self.nonprivate = nonprivate
    self.should_write = should_write or (lambda: True)

  def on_train_begin(self, logs=None):
    step = dp_steps(self.model)
    with self.writer.as_default():
      if step == 0:
        tf.summary.text("config", "```\n" + json.dumps(self.config, indent=2)
                        + "\n```", step=0)
    write_sparsity(self.writer, self.model, step)

  def on_epoch_end(self, epoch, logs=None):
    if not self.should_write():
      return
    logs = logs or {}
    opt = dp_of(self.model)
    step = dp_steps(self.model)
    tags = [("val_loss", "eval/loss"), ("val_accuracy", "eval/accuracy"),
            ("epsilon", "privacy/epsilon")]
    if self.nonprivate:
      tags += [("loss", "nonprivate/train_loss"),
               ("accuracy", "nonprivate/train_accuracy")]
    with self.writer.as_default():
      for key, tag in tags:
        if key in logs:
          write_scalar(tag, logs[key], step=step)
      if hasattr(opt, "noise_multiplier"):
        write_scalar("privacy/noise_multiplier", opt.noise_multiplier,
                     step=step)
      if self.nonprivate and hasattr(opt, "clip_fraction"):
        write_scalar("nonprivate/clip_fraction",
                     float(opt.clip_fraction.numpy()), step=step)
    write_sparsity(self.writer, self.model, step)
    self.writer.flush()
