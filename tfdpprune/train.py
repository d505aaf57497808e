r"""`python -m tfdpprune.train`: DP-SGD with pruning from the command line.

Intentionally short: flags are defined here and turned into a validated
`TrainConfig` once; the loop lives in `experiment.py`.

  python -m tfdpprune.train                     # digits, about a minute
  python -m tfdpprune.train --flagfile=flags/fashion_mnist/freeze_random_90.cfg

Rerunning the same command (same --workdir) resumes from the last checkpoint.
"""

import hashlib
import json
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
from tfdpprune import _compat
from tfdpprune import callbacks
from tfdpprune import checkpointing
from tfdpprune import experiment
from tfdpprune import flagfile
from tfdpprune import ledger
from tfdpprune.config import PruneConfig
from tfdpprune.config import TrainConfig
# pylint: enable=g-import-not-at-top,wrong-import-position

_D = TrainConfig()

# -- run ------------------------------------------------------------------------
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, "
                    "results.json). Default: runs/<dataset>-<model>-<hash of "
                    "the flags>, so the same command resumes the same run.")
flags.DEFINE_integer("seed", _D.seed, "Seed of PUBLIC randomness only: "
                     "initialization, random mask scores, the public/private "
                     "split, public pre-training. DP noise and Poisson "
                     "sampling are always secret unless --noise_seed is set.")
flags.DEFINE_integer("noise_seed", None, "Experiments only: makes DP noise "
                     "and Poisson sampling reproducible from this seed, and "
                     "therefore NOT secret (results.json records "
                     "private_randomness: false). Default: secret keys from "
                     "OS entropy at every start and resume.")
flags.DEFINE_bool("nonprivate_metrics", _D.nonprivate_metrics, "Opt in to "
                  "statistics of private training batches (loss, accuracy, "
                  "clip fraction) in the progress bar and under TensorBoard's "
                  "nonprivate/ tags. They are NOT covered by the DP "
                  "guarantee: do not release them.")
flags.DEFINE_integer("verbose", 1, "0 silent, 1 progress bar, 2 one line per "
                     "epoch, 3 also TensorFlow's own logs (set "
                     "TFDPPRUNE_TF_LOGS=1 to see its start-up messages too).")
flags.DEFINE_enum("distribute", "auto",
                  ["auto", "none", "mirrored", "multi_worker"],
                  "mirrored: tf.distribute.MirroredStrategy over the local "
                  "GPUs (or --cpu_replicas logical CPU devices); "
                  "multi_worker: tf.distribute.MultiWorkerMirroredStrategy "
                  "from TF_CONFIG (see launch/multiworker.py); auto: "
                  "multi_worker if TF_CONFIG is set.")
flags.DEFINE_integer("cpu_replicas", 0, "With --distribute=mirrored: split "
                     "the CPU into this many logical devices, one replica "
                     "each (multi-replica DP without GPUs, e.g. for tests); "
                     "0 = the strategy's default devices.")
# -- data -----------------------------------------------------------------------
flags.DEFINE_string("dataset", _D.dataset, "digits | mnist | fashion_mnist | "
                    "emnist | cifar10 | cifar100 | svhn_cropped | an IDX "
                    "directory | an .npz file.")
flags.DEFINE_string("data_dir", None, "Directory of the data set's files.")
flags.DEFINE_integer("num_classes", None, "Number of classes (the model's "
                     "outputs). Default: the data set's metadata (named data "
                     "sets, an .npz file's num_classes array), else the "
                     "largest test label + 1; never the private training "
                     "labels. A training label outside [0, num_classes) is "
                     "refused.")
flags.DEFINE_string("public_dataset", None, "Public data set (never in N).")
flags.DEFINE_float("public_fraction", _D.public_fraction, "Held-out public "
                   "fraction of the training split, in [0, 1).")
flags.DEFINE_float("validation_fraction", _D.validation_fraction, "Tuning "
                   "only: hold out this fraction of the private training set "
                   "as a validation set, evaluated at every epoch end beside "
                   "the test set, under TensorBoard's nonprivate/validation/ "
                   "tags (its metrics are outside the DP guarantee); in "
                   "[0, 1).")
flags.DEFINE_integer("public_pretrain_epochs", _D.public_pretrain_epochs,
                     "Non-private pre-training epochs on the public data.")
# -- model ----------------------------------------------------------------------
flags.DEFINE_string("model", _D.model, "Model name from tfdpprune.models.")
flags.DEFINE_enum("keras", str(_D.keras), ["2", "3"], "2: tf_keras with the "
                  "masked DP optimizer (a TF Privacy subclass); 3: Keras 3 "
                  "(TensorFlow backend) with the DP step in the model "
                  "(tdp.make_private) and a Keras 3 optimizer. The same "
                  "mechanism, so the same epsilon.")
flags.DEFINE_integer("model_width", _D.model_width, "Channel / unit "
                     "multiplier of the model (tempered_sigmoid_cnn), e.g. 2 "
                     "or 4 for the study's wider networks.")
flags.DEFINE_enum("model_norm", None, ["group"], "group: GroupNormalization "
                  "after every convolution (tempered_sigmoid_cnn), or on the "
                  "inputs (linear, mlp).")
flags.DEFINE_enum("features", None, ["scattering"], "Fixed, public features "
                  "computed once from every image before training: "
                  "scattering = ScatterNet (J=2, L=8: 81 channels per image "
                  "channel at 1/4 resolution; Tramer & Boneh 2021). The model "
                  "then takes features (e.g. --model=linear "
                  "--model_norm=group).")
flags.DEFINE_string("init_checkpoint", None, "Pre-trained weights to start "
                    "from (model.load_weights path).")
# -- privacy & optimization ------------------------------------------------------
flags.DEFINE_float("target_epsilon", None, "Target epsilon: the noise "
                   "multiplier is calibrated. Default "
                   f"{TrainConfig.DEFAULT_TARGET_EPSILON} "
                   "unless --noise_multiplier is given.")
flags.DEFINE_float("noise_multiplier", None, "Noise multiplier sigma >= 0 "
                   "(epsilon is reported). Exclusive with --target_epsilon.")
flags.DEFINE_float("delta", _D.delta, "Delta, in (0, 1/N).")
flags.DEFINE_float("l2_norm_clip", _D.l2_norm_clip, "Per-example clip C > 0.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Expected batch size "
                     "(Poisson sampling, q = batch_size / N).")
flags.DEFINE_float("epochs", None, "Epochs (default "
                   f"{TrainConfig.DEFAULT_EPOCHS}); exclusive "
                   "with --steps.")
flags.DEFINE_integer("steps", None, "Optimizer steps; exclusive with --epochs.")
flags.DEFINE_integer("physical_batch_size", None, "Scale: process each "
                     "logical (Poisson) batch in chunks of at most this many "
                     "examples inside its one step (clipped sums accumulated "
                     "in float32, noise once, divided by --batch_size): the "
                     "same mechanism and epsilon, memory bounded by this "
                     "size. Default: the whole batch at once.")
flags.DEFINE_bool("jit_compile", False, "Compile the DP step with XLA. "
                  "Batches are padded to one static capacity (a tail "
                  "probability below 1e-12 of the Poisson batch size, a "
                  "multiple of --physical_batch_size; the truncation is "
                  "added to delta), so one compilation serves every step.")
flags.DEFINE_enum("mixed_precision", None, ["mixed_bfloat16", "mixed_float16"],
                  "Keras dtype policy. Norms, clip coefficients, sums and "
                  "noise stay float32; float16 uses a fixed public loss "
                  "scale, undone before the norms.")
flags.DEFINE_enum("optimizer", _D.optimizer, ["sgd", "adam"], "The masked "
                  "DP optimizer: sgd (MaskedDPKerasSGDOptimizer, with "
                  "--momentum) or adam (MaskedDPKerasAdamOptimizer).")
flags.DEFINE_integer("augmult", _D.augmult, "Augmentation multiplicity K "
                     "(De et al. 2022): each sampled example trains as K "
                     "randomly cropped and flipped copies whose mean gradient "
                     "is clipped as one; 1 = no augmentation.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Learning rate.")
flags.DEFINE_enum("lr_schedule", _D.lr_schedule, ["constant", "cosine"],
                  "constant, or cosine decay to 0 over the run.")
flags.DEFINE_integer("lr_warmup_steps", _D.lr_warmup_steps, "Steps of linear "
                     "learning-rate warm-up from 0.")
flags.DEFINE_float("ema_decay", _D.ema_decay, "0 (off), or the decay in (0, "
                   "1) of an exponential moving average of the weights used "
                   "for evaluation (post-processing: no privacy cost); "
                   "results.json then also reports the last iterate.")
flags.DEFINE_float("momentum", _D.momentum, "SGD momentum in [0, 1) "
                   "(--optimizer=sgd only).")
flags.DEFINE_enum("accountant", _D.accountant, ["rdp", "pld"], "Accountant.")
# -- pruning (1:1 onto tdp.PruneConfig) ------------------------------------------
_P = PruneConfig()
flags.DEFINE_enum("prune_mode", "none", ["none", "freeze", "select"],
                  "PruneConfig.mode; none trains every coordinate.")
flags.DEFINE_string("prune_method", _P.method, "PruneConfig.method: random | "
                    "magnitude | public_gradient | public_saliency | "
                    "dirichlet (public methods need --public_fraction or "
                    "--public_dataset).")
flags.DEFINE_float("sparsity", _P.sparsity, "PruneConfig.sparsity, [0, 1).")
flags.DEFINE_string("prune_scope", _P.scope, "PruneConfig.scope.")
flags.DEFINE_string("granularity", None, "PruneConfig.granularity (default: "
                    "neuron for --prune_method=dirichlet, else weight).")
flags.DEFINE_string("pruned", None, "PruneConfig.pruned (freeze): zero|keep.")
flags.DEFINE_integer("every_k_steps", None, "PruneConfig.every_k_steps.")
flags.DEFINE_list("sparsity_schedule", None, "PruneConfig.sparsity_schedule "
                  "as step:sparsity pairs, e.g. 0:0.5,100:0.9.")
flags.DEFINE_string("prune_layers", None, "PruneConfig.layers (regex).")
flags.DEFINE_string("prune_weights", _P.weights, "PruneConfig.weights.")
flags.DEFINE_integer("prune_seed", None, "PruneConfig.seed (default --seed).")
flags.DEFINE_integer("public_batch_size", None, "PruneConfig.public_batch_size"
                     ": public examples per Dirichlet step or select re-draw "
                     f"(default {PruneConfig.DEFAULT_PUBLIC_BATCH_SIZE}).")
flags.DEFINE_integer("dirichlet_epochs", None, "PruneConfig.dirichlet_epochs "
                     "(default "
                     f"{PruneConfig.DEFAULT_DIRICHLET_EPOCHS}).")
flags.DEFINE_float("dirichlet_learning_rate", None,
                   "PruneConfig.dirichlet_learning_rate (default "
                   f"{PruneConfig.DEFAULT_DIRICHLET_LEARNING_RATE}).")
flags.DEFINE_float("dirichlet_prior", None, "PruneConfig.dirichlet_prior "
                   f"(default {PruneConfig.DEFAULT_DIRICHLET_PRIOR}).")

FLAGS = flags.FLAGS

# PruneConfig field -> flag, to name the flag in validation errors.
_PRUNE_FLAGS = {"mode": "prune_mode", "method": "prune_method",
                "sparsity": "sparsity", "scope": "prune_scope",
                "granularity": "granularity", "pruned": "pruned",
                "every_k_steps": "every_k_steps",
                "sparsity_schedule": "sparsity_schedule",
                "layers": "prune_layers", "weights": "prune_weights",
                "seed": "prune_seed", "public_batch_size": "public_batch_size",
                "dirichlet_epochs": "dirichlet_epochs",
                "dirichlet_learning_rate": "dirichlet_learning_rate",
                "dirichlet_prior": "dirichlet_prior"}


def _prune_config():
  if FLAGS.prune_mode == "none":
    return None
  schedule = None
  if FLAGS.sparsity_schedule:
    try:
      schedule = tuple((int(s), float(v)) for s, v in
                       (p.split(":") for p in FLAGS.sparsity_schedule))
    except ValueError as e:
      raise ValueError(f"--sparsity_schedule={FLAGS.sparsity_schedule!r}: "
                       "expected step:sparsity pairs") from e
  try:
    return PruneConfig(
        mode=FLAGS.prune_mode, method=FLAGS.prune_method,
        sparsity=FLAGS.sparsity, scope=FLAGS.prune_scope,
        granularity=FLAGS.granularity, pruned=FLAGS.pruned,
        every_k_steps=FLAGS.every_k_steps, sparsity_schedule=schedule,
        layers=FLAGS.prune_layers, weights=FLAGS.prune_weights,
        seed=FLAGS.seed if FLAGS.prune_seed is None else FLAGS.prune_seed,
        public_batch_size=FLAGS.public_batch_size,
        dirichlet_epochs=FLAGS.dirichlet_epochs,
        dirichlet_learning_rate=FLAGS.dirichlet_learning_rate,
        dirichlet_prior=FLAGS.dirichlet_prior)
  except ValueError as e:
    message = str(e)
    for field, flag in _PRUNE_FLAGS.items():
      if message.startswith(f"PruneConfig.{field}="):
        message = f"--{flag}: {message}"
        break
    raise ValueError(message) from e


def config_from_flags() -> TrainConfig:
  """The validated `TrainConfig` of the parsed flags."""
  target, sigma = FLAGS.target_epsilon, FLAGS.noise_multiplier
  epochs, steps = FLAGS.epochs, FLAGS.steps
  return TrainConfig(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
      num_classes=FLAGS.num_classes, model=FLAGS.model,
      keras=int(FLAGS.keras),
      model_width=FLAGS.model_width, model_norm=FLAGS.model_norm,
      features=FLAGS.features,
      public_dataset=FLAGS.public_dataset,
      public_fraction=FLAGS.public_fraction,
      validation_fraction=FLAGS.validation_fraction,
      public_pretrain_epochs=FLAGS.public_pretrain_epochs,
      batch_size=FLAGS.batch_size, epochs=epochs, steps=steps,
      optimizer=FLAGS.optimizer, augmult=FLAGS.augmult,
      learning_rate=FLAGS.learning_rate, lr_schedule=FLAGS.lr_schedule,
      lr_warmup_steps=FLAGS.lr_warmup_steps, ema_decay=FLAGS.ema_decay,
      momentum=FLAGS.momentum,
      l2_norm_clip=FLAGS.l2_norm_clip, noise_multiplier=sigma,
      target_epsilon=target, delta=FLAGS.delta, accountant=FLAGS.accountant,
      prune=_prune_config(), init_checkpoint=FLAGS.init_checkpoint,
      seed=FLAGS.seed, noise_seed=FLAGS.noise_seed,
      nonprivate_metrics=FLAGS.nonprivate_metrics,
      physical_batch_size=FLAGS.physical_batch_size,
      jit_compile=FLAGS.jit_compile, mixed_precision=FLAGS.mixed_precision)


def default_workdir(config: TrainConfig) -> str:
  digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True)
                        .encode()).hexdigest()[:8]
  name = os.path.basename(str(config.dataset).rstrip("/")).replace(".", "_")
  return os.path.join("runs", f"{name}-{config.model}-{digest}")


# Flags written on the command line itself (not only in a flagfile).
_COMMAND_LINE = set()


def command_line_flags(argv):
  """Names of the flags `argv` sets directly (`--name=v`, `--name`,
  `--noname`), before flagfiles are expanded."""
  names = set()
  for arg in argv[1:]:
    if arg.startswith("-") and arg != "--":
      name = arg.lstrip("-").split("=", 1)[0]
      names.add(name[2:] if name.startswith("no") and name[2:] in FLAGS
                and name not in FLAGS else name)
  return names


def _check_ignored_flags(command_line=None):
  """Refuses flags the chosen mode would ignore: any written on the command
  line, and any set to a non-default value in a flagfile (a default value
  from a shared base flagfile is harmless)."""
  command_line = _COMMAND_LINE if command_line is None else command_line
  given = [name for name in FLAGS if FLAGS[name].present and (
      name in command_line or FLAGS[name].value != FLAGS[name].default)]
  ignored = {}
  if FLAGS.prune_mode == "none":
    for name in list(_PRUNE_FLAGS.values()) + ["granularity"]:
      if name != "prune_mode" and name in given:
        ignored[name] = "has no effect without --prune_mode=freeze|select"
  if FLAGS.optimizer == "adam" and "momentum" in given:
    ignored["momentum"] = "is an SGD flag; --optimizer=adam ignores it"
  if FLAGS.cpu_replicas and FLAGS.distribute != "mirrored":
    ignored["cpu_replicas"] = "needs --distribute=mirrored"
  if ignored:
    raise app.UsageError("; ".join(
        f"--{name}={FLAGS[name].value!r} {why}"
        for name, why in sorted(ignored.items())))


class _NoTensorFlowInfo(std_logging.Filter):
  """Drops INFO (and finer) records logged from TensorFlow's own modules."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/tensorflow/", "/tf_keras/"))


def _quiet_tensorflow():
  """TensorFlow's Python INFO logs (checkpoint sharding, ...) only with
  --verbose=3; ours stay."""
  if FLAGS.verbose < 3:
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    logging.get_absl_handler().addFilter(_NoTensorFlowInfo())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_ignored_flags()
  _quiet_tensorflow()
  strategy = None
  if FLAGS.cpu_replicas < 0:
    raise app.UsageError(f"--cpu_replicas={FLAGS.cpu_replicas} must be >= 0")
  if FLAGS.distribute == "mirrored":
    strategy = experiment.mirrored_strategy(FLAGS.cpu_replicas)
  elif FLAGS.distribute == "multi_worker" or (
      FLAGS.distribute == "auto" and os.environ.get("TF_CONFIG")):
    # Created first: collective ops must be set up before other TF work.
    strategy = experiment.multi_worker_strategy()
  try:
    config = config_from_flags()
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  workdir = FLAGS.workdir or default_workdir(config)
  if strategy is not None and not experiment.is_chief(strategy):
    # Non-chief workers keep their checkpoints and summaries apart.
    workdir = os.path.join(workdir, "workers",
                           f"worker_{strategy.cluster_resolver.task_id}")
  try:
    results = experiment.run(config, workdir, verbose=FLAGS.verbose,
                             strategy=strategy,
                             files={"flags.txt": FLAGS.flags_into_string()})
  except ledger.ResumeRefused as e:  # the workdir is left as it was
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(2)
  except (callbacks.NonFiniteLossError, checkpointing.RunDirectoryError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
  except ValueError as e:
    if str(e).startswith("--"):
      raise app.UsageError(str(e)) from e
    raise
  if results is None:
    sys.exit(143)  # preempted (SIGTERM) after checkpointing; rerun resumes
  logging.info("results: %s", os.path.join(workdir, experiment.RESULTS))
  if not results["private_randomness"]:
    print("WARNING: --noise_seed was set: noise and sampling were NOT "
          "secret; epsilon assumes the seed is unknown.", file=sys.stderr)
  print(f"test accuracy {results['test_accuracy']:.4f} | epsilon "
        f"{results['epsilon']:.3f} (delta {results['delta']:g}, "
        f"{results['accountant']}) | noise multiplier "
        f"{results['noise_multiplier']:.4f} | steps {results['steps']} | "
        f"updated fraction {1 - results['sparsity']:.3f} | workdir {workdir}")


def parse_flags(argv):
  """absl's parser, after expanding flagfiles (nested paths resolve from the
  including file: `tfdpprune.flagfile`)."""
  _COMMAND_LINE.clear()
  _COMMAND_LINE.update(command_line_flags(argv))
  try:
    argv = flagfile.expand(argv)
  except (OSError, ValueError) as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
    sys.exit(1)
  # Device probing once, quietly (a GPU-less machine's CUDA error), before
  # absl's after-init hooks list the devices; logical devices stay
  # configurable.
  with _compat.quiet_native_stderr():
    _compat.tf.config.list_physical_devices()
  return app.parse_flags_with_usage(argv)


def console_main():
  """The `tfdpprune-train` console script."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  console_main()
