"""`python -m tfdpprune.train`: results, flag validation, resume."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

from absl import flags
import numpy as np
import pytest

from tfdpprune import accounting
from tfdpprune import data
from tfdpprune import experiment
from tfdpprune import flagfile
from tfdpprune import models
from tfdpprune import train
from tfdpprune._compat import keras
from tfdpprune._compat import tf
from tfdpprune.config import PruneConfig
from tfdpprune.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def _cli(*args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "tfdpprune.train", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_cli_on_digits_writes_results_json(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _cli("--steps=6", "--verbose=0", "--prune_mode=select",
              "--sparsity=0.5", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = _results(workdir)
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert math.isfinite(results["epsilon"]) and results["epsilon"] > 0
  assert results["steps"] == 6 and results["delta"] == 1e-5
  assert results["sparsity"] > 0.3
  assert {"noise_multiplier", "wall_time_s", "versions"} <= set(results)
  n = results["num_examples"]
  assert results["epsilon"] == pytest.approx(accounting.compute_epsilon(
      n, 128, results["noise_multiplier"], steps=6))
  assert os.path.exists(os.path.join(workdir, "flags.txt"))
  assert "epsilon" in proc.stdout and "test accuracy" in proc.stdout
  tags = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  assert {"eval/loss", "eval/accuracy", "privacy/epsilon",
          "privacy/noise_multiplier", "sparsity/overall", "config"} <= tags
  # Statistics of private batches are opt-in (--nonprivate_metrics).
  assert not [t for t in tags if t.startswith(("train/", "nonprivate/",
                                               "diagnostics"))], tags
  assert results["private_randomness"] is True


@pytest.mark.parametrize("args,updated", [
    (["--prune_mode=freeze", "--prune_method=dirichlet", "--sparsity=0.5",
      "--dirichlet_epochs=2", "--public_batch_size=32"], (0.55, 0.6)),
    (["--prune_mode=select", "--prune_method=public_gradient",
      "--sparsity=0.9", "--every_k_steps=2"], (0.1, 0.12)),
])
def test_cli_public_mask_methods_on_digits(tmp_path, args, updated):
  workdir = str(tmp_path / "run")
  proc = _cli("--steps=4", "--verbose=0", "--public_fraction=0.1", *args,
              f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = _results(workdir)
  assert results["steps"] == 4
  assert results["num_examples"] == 1294  # 1437 - 143 public: not in N
  # mlp: dense1 (64*256 + 256), logits (2570): dirichlet freezes half
  # of dense1's kernel (0.574 updated), select 10% of both kernels (0.112).
  assert updated[0] < 1 - results["sparsity"] < updated[1]
  prune = results["config"]["prune"]
  assert prune["method"] == args[1].split("=")[1]
  if prune["method"] == "dirichlet":
    assert prune["granularity"] == "neuron"
    assert (prune["dirichlet_epochs"], prune["public_batch_size"]) == (2, 32)


@pytest.fixture
def parsed_flags():
  def parse(*args):
    FLAGS.unparse_flags()
    FLAGS(flagfile.expand(["train", *args]))
    train._check_ignored_flags(train.command_line_flags(["train", *args]))  # pylint: disable=protected-access
    return train.config_from_flags()
  yield parse
  FLAGS.unparse_flags()


@pytest.mark.parametrize("args,names", [
    (["--prune_mode=freeze", "--sparsity=1.0"], ["--sparsity", "[0, 1)"]),
    (["--noise_multiplier=-1"], ["--noise_multiplier", ">= 0"]),
    (["--noise_multiplier=1", "--target_epsilon=2"],
     ["--target_epsilon", "--noise_multiplier"]),
    (["--target_epsilon=-1"], ["--target_epsilon", "(0, 1e6)"]),
    (["--delta=1.5"], ["--delta", "(0, 1)"]),
    (["--l2_norm_clip=0"], ["--l2_norm_clip", "> 0"]),
    (["--prune_mode=select", "--every_k_steps=0"], ["--every_k_steps", ">= 1"]),
    (["--public_fraction=1.0"], ["--public_fraction", "[0, 1)"]),
    (["--epochs=2", "--steps=3"], ["--epochs", "--steps"]),
    (["--prune_mode=select", "--prune_method=dirichlet",
      "--public_fraction=0.1"], ["--prune_method", "mode='freeze'"]),
    (["--prune_mode=freeze", "--prune_method=dirichlet", "--granularity=weight",
      "--public_fraction=0.1"], ["--granularity", "'neuron'"]),
    (["--prune_mode=freeze", "--prune_method=dirichlet"],
     ["--prune_method", "--public_fraction"]),
    (["--prune_mode=freeze", "--prune_method=dirichlet", "--dirichlet_prior=0",
      "--public_fraction=0.1"], ["--dirichlet_prior", "> 0"]),
    (["--prune_mode=select", "--public_batch_size=8"],
     ["--public_batch_size", "only used"]),
])
def test_invalid_flags_name_the_flag_and_range(parsed_flags, args, names):
  with pytest.raises(ValueError) as e:
    parsed_flags(*args)
  for name in names:
    assert name in str(e.value)


@pytest.mark.parametrize("path", sorted(glob.glob(
    os.path.join(ROOT, "flags", "*", "*.cfg"))))
def test_every_flagfile_gives_a_valid_config(parsed_flags, monkeypatch,
                                             tmp_path, path):
  monkeypatch.chdir(tmp_path)  # nested flagfiles resolve from anywhere
  config = parsed_flags(f"--flagfile={path}")
  assert config.batch_size >= 1 and config.dataset
  with open(path) as f:
    header = f.read()
  for part in ("# Purpose:", "# Command:", "# Expected:", "# Runtime:"):
    assert part in header


@pytest.mark.parametrize("field,value,names", [
    ("delta", 0.01, ["--delta", "1/N"]),           # digits: N = 1437
    ("dataset", "nope", ["--dataset", "digits", "fashion_mnist"]),
    ("model", "nope", ["--model", "mlp", "tutorial_cnn"]),
    ("batch_size", 10_000, ["--batch_size", "N = 1437"]),
])
def test_data_dependent_errors_name_the_flag(tmp_path, field, value, names):
  config = TrainConfig(steps=2, **{field: value})
  with pytest.raises(ValueError) as e:
    experiment.run(config, str(tmp_path), verbose=0)
  for name in names:
    assert name in str(e.value)


def test_cli_reports_bad_flag_as_usage_error(tmp_path):
  proc = _cli("--prune_mode=freeze", "--sparsity=1.0",
              f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "--sparsity" in proc.stderr and "[0, 1)" in proc.stderr


def test_batchnorm_model_is_refused_with_why():
  from tfdpprune import models  # pylint: disable=g-import-not-at-top
  from tfdpprune._compat import keras  # pylint: disable=g-import-not-at-top
  model = keras.Sequential([keras.Input((8,)),
                            keras.layers.BatchNormalization(),
                            keras.layers.Dense(2)])
  with pytest.raises(ValueError, match="BatchNorm"):
    models.check_dp_compatible(model)


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
  args = ["--epochs=12", "--verbose=0", "--prune_mode=select",
          "--sparsity=0.5", "--every_k_steps=3"]
  full = str(tmp_path / "full")
  assert _cli(*args, f"--workdir={full}").returncode == 0
  resumed = str(tmp_path / "resumed")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen(
      [sys.executable, "-m", "tfdpprune.train", *args,
       f"--workdir={resumed}"], cwd=ROOT, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(resumed, "checkpoints", "checkpoint")
  deadline = time.time() + 120
  while not os.path.exists(ckpt) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # mid-run: checkpoints at a step boundary
  assert proc.wait(timeout=120) == 143
  assert not os.path.exists(os.path.join(resumed, "results.json"))
  assert _cli(*args, f"--workdir={resumed}").returncode == 0
  a, b = _results(full), _results(resumed)
  assert b["resumed_from_step"] > 0
  assert a["steps"] == b["steps"]
  assert a["epsilon"] == b["epsilon"]
  assert a["noise_multiplier"] == b["noise_multiplier"]


def test_rerunning_a_finished_run_keeps_its_results(tmp_path):
  workdir = str(tmp_path / "run")
  assert _cli("--steps=4", "--verbose=0",
              f"--workdir={workdir}").returncode == 0
  first = _results(workdir)
  assert _cli("--steps=4", "--verbose=0",
              f"--workdir={workdir}").returncode == 0
  second = _results(workdir)
  assert second["steps"] == first["steps"] == 4
  assert second["resumed_from_step"] == 4
  assert second["test_accuracy"] == first["test_accuracy"]


def test_init_checkpoint_starts_from_given_weights(tmp_path):
  from tfdpprune import data  # pylint: disable=g-import-not-at-top
  from tfdpprune import models  # pylint: disable=g-import-not-at-top
  dataset = data.load_dataset("digits")
  pretrained = models.get_model("mlp", dataset.input_shape, 10)
  for v in pretrained.trainable_variables:
    v.assign(tf.fill(v.shape, 0.25))
  path = str(tmp_path / "pre.weights.h5")
  pretrained.save_weights(path)
  config = TrainConfig(steps=1, init_checkpoint=path)
  model = experiment.build_model(config, dataset, None)
  for v in model.trainable_variables:
    assert bool(tf.reduce_all(v == 0.25))
  with pytest.raises(ValueError, match="--init_checkpoint"):
    experiment.build_model(TrainConfig(steps=1, init_checkpoint=str(
        tmp_path / "missing.h5")), dataset, None)


# -- privacy by default ---------------------------------------------------------


def _weights(workdir):
  """The model variables of a run's latest checkpoint, by name."""
  reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
  return {k: reader.get_tensor(k).tobytes()
          for k in reader.get_variable_to_shape_map()
          if k.startswith("model/") and "mask" not in k}


def _tags(workdir):
  tags = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_default_runs_differ_and_noise_seed_runs_are_identical(tmp_path):
  def run(name, **kw):
    workdir = str(tmp_path / name)
    experiment.run(TrainConfig(steps=5, **kw), workdir, verbose=0)
    return _weights(workdir)
  assert run("a") != run("b")            # secret noise and sampling
  seeded = run("c", noise_seed=7)
  assert seeded == run("d", noise_seed=7)
  assert seeded != run("e", noise_seed=8)
  assert _results(str(tmp_path / "c"))["private_randomness"] is False
  assert _results(str(tmp_path / "a"))["private_randomness"] is True


@pytest.mark.parametrize("version", [2, 3])
def test_run_directory_holds_no_noise_or_sampling_key(tmp_path, drawn_keys,
                                                      key_files_holding,
                                                      version):
  drawn = drawn_keys
  workdir = str(tmp_path / "run")
  config = TrainConfig(steps=8, keras=version,
                       prune=PruneConfig(mode="select", sparsity=0.5))
  experiment.run(config, workdir, verbose=0)
  assert len(drawn) == 2  # noise and sampling, from OS entropy
  assert key_files_holding(workdir, drawn) == []
  assert not any(str(k) in train.default_workdir(config)
                 for key in drawn for k in key)
  # A resume draws fresh keys and writes none of them either.
  experiment.run(TrainConfig(steps=16, prune=config.prune, keras=version,
                             noise_multiplier=_results(workdir)[
                                 "noise_multiplier"]),
                 str(tmp_path / "other"), verbose=0)
  assert len(drawn) == 4 and len(set(drawn)) == 4
  assert key_files_holding(str(tmp_path), drawn) == []


def test_nonprivate_metrics_are_opt_in(tmp_path):
  workdir = str(tmp_path / "run")
  experiment.run(TrainConfig(steps=12, nonprivate_metrics=True), workdir,
                 verbose=0)
  assert {"nonprivate/train_loss", "nonprivate/train_accuracy",
          "nonprivate/clip_fraction", "eval/accuracy",
          "privacy/epsilon"} <= _tags(workdir)


def test_resume_with_changed_privacy_flags_or_data_is_refused(tmp_path):
  from tfdpprune import ledger  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  experiment.run(TrainConfig(steps=3, noise_multiplier=1.0), workdir,
                 verbose=0)
  with open(os.path.join(workdir, "config.json")) as f:
    config_before = f.read()
  with pytest.raises(ledger.LedgerMismatch) as e:
    experiment.run(TrainConfig(steps=3, noise_multiplier=2.0), workdir,
                   verbose=0)
  assert "--noise_multiplier: 1.0 in the checkpoint, 2.0 now" in str(e.value)
  with pytest.raises(ledger.LedgerMismatch) as e:
    experiment.run(TrainConfig(steps=6, noise_multiplier=1.0, batch_size=64),
                   workdir, verbose=0)
  assert "--steps: 3 in the checkpoint, 6 now" in str(e.value)
  assert "--batch_size: 128 in the checkpoint, 64 now" in str(e.value)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == config_before  # a refused rerun changes nothing
  # Same flags: resumes (finished run, nothing to do).
  assert experiment.run(TrainConfig(steps=3, noise_multiplier=1.0), workdir,
                        verbose=0)["steps"] == 3

  # Same flags, other private data behind the same path.
  rng = np.random.default_rng(0)
  path = str(tmp_path / "d.npz")

  def write(x):
    np.savez(path, x_train=x, y_train=np.arange(300) % 3, x_test=x[:30],
             y_test=np.arange(30) % 3)
  x = rng.random((300, 4, 4, 1)).astype(np.float32)
  write(x)
  config = TrainConfig(dataset=path, steps=3, noise_multiplier=1.0,
                       batch_size=30, delta=1e-3)
  run_dir = str(tmp_path / "npz_run")
  experiment.run(config, run_dir, verbose=0)
  x[17, 1, 1, 0] += 0.5  # one example differs
  write(x)
  with pytest.raises(ledger.LedgerMismatch, match="private training data "
                     "differ"):
    experiment.run(config, run_dir, verbose=0)


def test_cli_refuses_changed_epochs_with_both_values(tmp_path):
  workdir = str(tmp_path / "run")
  assert _cli("--epochs=1", "--verbose=0",
              f"--workdir={workdir}").returncode == 0
  proc = _cli("--epochs=2", "--verbose=0", f"--workdir={workdir}")
  assert proc.returncode == 2
  assert "--epochs: 1.0 in the checkpoint, 2.0 now" in proc.stderr
  assert "noise multiplier sigma" in proc.stderr


def test_public_data_equal_to_private_is_refused():
  with pytest.raises(ValueError) as e:
    experiment.load_data(TrainConfig(public_dataset="digits",
                                     public_pretrain_epochs=20))
  message = str(e.value)
  assert message.startswith("--public_dataset='digits'")
  assert "1437 of its 1437 examples also appear in the private" in message
  # The same images under another normalization are caught too.
  with pytest.raises(ValueError, match="also appear in the private"):
    experiment.load_data(TrainConfig(
        dataset="fashion_mnist",
        public_dataset=os.path.join("/usr/share/datasets", "fashion-mnist"),
        public_pretrain_epochs=1)) if os.path.isdir(
            "/usr/share/datasets/fashion-mnist") else (_ for _ in ()).throw(
                ValueError("also appear in the private (no data here)"))


def _nan_after_15_steps(input_shape, num_classes):
  """The MLP, whose output turns NaN after 15 training calls."""

  class NanLater(keras.layers.Layer):

    def build(self, input_shape):
      self.calls = self.add_weight("calls", [], initializer="zeros",
                                   trainable=False)

    def call(self, inputs, training=None):
      if training:
        self.calls.assign_add(1.0)
      return inputs * tf.where(self.calls > 15.0, np.nan, 1.0)

  base = models.get_model("mlp", input_shape, num_classes)
  return keras.Model(base.inputs, NanLater()(base.outputs[0]))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  from tfdpprune import callbacks  # pylint: disable=g-import-not-at-top
  get_model = models.get_model
  monkeypatch.setattr(models, "get_model", lambda name, *a, **k: (
      _nan_after_15_steps(*a, **k) if name == "nan_after_15_steps" else
      get_model(name, *a, **k)))
  workdir = str(tmp_path / "run")
  # digits: 11 steps per epoch; the epoch-1 checkpoint (step 11) is good.
  # From step 16 every loss is NaN: the private examples get coefficient 0
  # (the weights stay finite), and the test loss at the end of epoch 2
  # (step 22) is NaN: the run stops there. The private training loss is not
  # what decides (its finiteness would reveal a crafted example).
  with pytest.raises(callbacks.NonFiniteLossError, match="step 22") as e:
    experiment.run(TrainConfig(steps=40, model="nan_after_15_steps",
                               noise_multiplier=1.0), workdir, verbose=0)
  assert "non-finite test loss" in str(e.value)
  assert "last good checkpoint" in str(e.value)
  reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
  assert reader.get_tensor(
      "ledger/steps/.ATTRIBUTES/VARIABLE_VALUE") == 11
  for k in reader.get_variable_to_shape_map():
    value = reader.get_tensor(k)
    if k.startswith("model/") and value.dtype.kind == "f":
      assert np.all(np.isfinite(value)), k
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  # Nothing of the abandoned steps 12..22 went to TensorBoard.
  steps = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      if any(v.tag.startswith(("eval/", "privacy/"))
             for v in event.summary.value):
        steps.add(event.step)
  assert max(steps) == 11
  # A rerun (here with a healthy model of the same weights) resumes at step
  # 11 and accounts the 11 abandoned steps in its epsilon.
  results = experiment.run(TrainConfig(steps=40, noise_multiplier=1.0),
                           workdir, verbose=0)
  assert results["resumed_from_step"] == 11 and results["steps"] == 40
  assert results["abandoned_steps"] == 11
  assert results["epsilon"] == pytest.approx(accounting.compute_epsilon(
      results["num_examples"], 128, 1.0, steps=51))


def test_cli_exits_non_zero_on_divergence(tmp_path):
  proc = _cli("--steps=30", "--learning_rate=1e30", "--verbose=0",
              f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 1
  assert "non-finite" in proc.stderr and "Error:" in proc.stderr


def test_results_hold_no_data_fingerprint_and_runs_are_unlinkable(tmp_path):
  from tfdpprune import ledger  # pylint: disable=g-import-not-at-top
  prints = []
  for name in ("a", "b"):
    workdir = str(tmp_path / name)
    experiment.run(TrainConfig(steps=2, noise_multiplier=1.0), workdir,
                   verbose=0)
    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
    saved = ledger.Ledger.from_json(reader.get_tensor(
        "ledger/params/.ATTRIBUTES/VARIABLE_VALUE").decode())
    prints.append(saved.data_fingerprint)
    with open(os.path.join(workdir, "results.json")) as f:
      text = f.read()
    assert saved.data_fingerprint not in text
    assert "fingerprint" not in json.loads(text)["ledger"]
  assert prints[0] != prints[1]  # same data, per-run salts


def test_validation_split_is_carved_from_the_private_training_set(tmp_path):
  workdir = str(tmp_path / "run")
  results = experiment.run(TrainConfig(steps=3, validation_fraction=0.1),
                           workdir, verbose=0)
  assert results["num_examples"] + results["num_validation"] == 1437
  assert results["num_validation"] == 143
  assert 0 <= results["validation_accuracy"] <= 1
  assert "outside the DP guarantee" in results["validation_note"]
  assert "validation_accuracy" not in experiment.run(
      TrainConfig(steps=3), str(tmp_path / "plain"), verbose=0)


@pytest.mark.parametrize("epochs,q,expected_epochs", [
    (20.0, 256 / 60000, 20), (2.0, 128 / 1437, 2), (2.5, 0.1, 3),
    (1.0, 0.3, 1)])
def test_progress_shows_the_requested_number_of_epochs(epochs, q,
                                                       expected_epochs):
  config = TrainConfig(epochs=epochs)
  steps = int(math.ceil(epochs / q))
  per_epoch, shown = experiment.fit_epochs(config, steps, q)
  assert shown == expected_epochs
  assert per_epoch * shown >= steps > per_epoch * (shown - 1)


def test_nested_flagfiles_resolve_from_the_including_file(tmp_path):
  from tfdpprune import flagfile  # pylint: disable=g-import-not-at-top
  sub = tmp_path / "flags" / "set"
  sub.mkdir(parents=True)
  (tmp_path / "flags" / "base.cfg").write_text("# base\n--epochs=3\n")
  (sub / "base.cfg").write_text("--flagfile=../base.cfg\n--batch_size=64\n")
  (sub / "run.cfg").write_text("// comment\n--flagfile=base.cfg\n--seed=5\n")
  # Repository-root-relative nesting (the existing flagfiles) works too.
  (sub / "legacy.cfg").write_text("--flagfile=flags/base.cfg\n")
  assert flagfile.expand(["train", f"--flagfile={sub / 'run.cfg'}",
                          "--seed=6"]) == [
                              "train", "--epochs=3", "--batch_size=64",
                              "--seed=5", "--seed=6"]
  assert flagfile.expand([f"--flagfile={sub / 'legacy.cfg'}"]) == [
      "--epochs=3"]
  with pytest.raises(FileNotFoundError, match="nope.cfg"):
    flagfile.expand(["--flagfile=nope.cfg"])


def test_cli_runs_a_flagfile_from_another_directory(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "-m", "tfdpprune.train",
       f"--flagfile={ROOT}/flags/fashion_mnist/full_dpsgd.cfg",
       "--dataset=digits", "--model=mlp", "--epochs=0.1", "--verbose=1",
       f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  # Quiet by default: no TensorFlow start-up or checkpoint INFO lines.
  for noise in ("cuInit", "oneDNN", "Sharding callback"):
    assert noise not in proc.stderr + proc.stdout, noise


@pytest.mark.parametrize("args,names", [
    (["--sparsity=0.9"], ["--sparsity=0.9", "--prune_mode"]),
    (["--prune_method=magnitude", "--every_k_steps=3"],
     ["--prune_method", "--every_k_steps"]),
    (["--optimizer=adam", "--momentum=0.5"], ["--momentum=0.5", "adam"]),
    (["--cpu_replicas=2"], ["--cpu_replicas=2", "mirrored"]),
])
def test_cli_refuses_flags_the_mode_ignores(tmp_path, args, names):
  proc = _cli(*args, "--steps=2", f"--workdir={tmp_path / 'run'}")
  assert proc.returncode != 0
  for name in names:
    assert name in proc.stderr, proc.stderr[-1500:]


def test_learning_rate_schedules():
  assert experiment.learning_rate(TrainConfig(learning_rate=0.5), 100) == 0.5
  cosine = experiment.learning_rate(
      TrainConfig(learning_rate=0.5, lr_schedule="cosine",
                  lr_warmup_steps=10), 110)
  assert float(cosine(0)) == pytest.approx(0.5 / 11, rel=1e-5)  # > 0
  assert float(cosine(10)) == pytest.approx(0.5, rel=1e-5)
  assert float(cosine(60)) == pytest.approx(0.25, rel=1e-4)
  assert float(cosine(110)) == pytest.approx(0.0, abs=1e-6)
  warm = experiment.learning_rate(
      TrainConfig(learning_rate=0.5, lr_warmup_steps=4), 100)
  assert float(warm(0)) == pytest.approx(0.1, rel=1e-5)
  assert float(warm(4)) == pytest.approx(0.5, rel=1e-5)
  assert float(warm(50)) == pytest.approx(0.5, rel=1e-5)


def test_weight_averaging_in_the_trainer_reports_both_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  config = TrainConfig(steps=30, ema_decay=0.9, noise_multiplier=1.0)
  first = experiment.run(config, workdir, verbose=0)
  assert {"test_accuracy", "test_accuracy_last_iterate"} <= set(first)
  reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
  assert any(k.startswith("weight_average/") and "count" in k and
             reader.get_tensor(k) == 30
             for k in reader.get_variable_to_shape_map())
  again = experiment.run(config, workdir, verbose=0)  # restored average
  assert again["test_accuracy"] == first["test_accuracy"]


def test_model_width_multiplies_channels():
  base = models.get_model("tempered_sigmoid_cnn", (28, 28, 1), 10)
  wide = models.get_model("tempered_sigmoid_cnn", (28, 28, 1), 10, width=2)
  assert wide.get_layer("conv1").filters == 2 * base.get_layer("conv1").filters
  assert wide.count_params() > 3 * base.count_params()
  with pytest.raises(ValueError, match="--model_width"):
    experiment.build_model(TrainConfig(model="mlp", model_width=2, steps=1),
                           data.load_dataset("digits"), None)


def test_flagfile_defaults_do_not_count_as_ignored_flags(parsed_flags):
  # base.cfg sets --momentum=0.9 (the default): Adam runs with the files.
  config = parsed_flags(
      f"--flagfile={ROOT}/flags/fashion_mnist/full_dpsgd.cfg",
      "--optimizer=adam")
  assert config.optimizer == "adam"
  with pytest.raises(Exception, match="momentum"):
    parsed_flags("--optimizer=adam", "--momentum=0.5")


def _scalars(workdir, tag):
  out = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = float(tf.make_ndarray(v.tensor))
  return out


def test_eval_tags_are_the_test_set_with_a_validation_split(tmp_path):
  # N = 1437 - 143 validation = 1294: 10 steps per epoch, one epoch.
  workdir = str(tmp_path / "run")
  results = experiment.run(TrainConfig(steps=10, validation_fraction=0.1,
                                       noise_multiplier=1.0), workdir,
                           verbose=0)
  test = _scalars(workdir, "eval/accuracy")
  validation = _scalars(workdir, "nonprivate/validation/accuracy")
  assert set(test) == set(validation) == {10}
  assert test[10] == pytest.approx(results["test_accuracy"], abs=1e-6)
  assert validation[10] == pytest.approx(results["validation_accuracy"],
                                         abs=1e-6)
  assert _scalars(workdir, "eval/loss")[10] == pytest.approx(
      results["test_loss"], rel=1e-5)


def _npz_data(path, n_train=40, n_test=20, y_train=None):
  rng = np.random.default_rng(0)
  y = np.arange(n_train) % 4 if y_train is None else y_train
  np.savez(path, x_train=rng.random((len(y), 4, 4)),
           y_train=y, x_test=rng.random((n_test, 4, 4)),
           y_test=np.arange(n_test) % 4)
  return path


def _clear_error(proc, *needles):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, proc.stderr[-3000:]


def test_bad_inputs_are_clear_errors_not_tracebacks(tmp_path):
  common = ("--steps=2", "--verbose=0", "--batch_size=4", "--delta=1e-3")
  empty_train = _npz_data(str(tmp_path / "a.npz"), y_train=np.zeros(
      [0], np.int64))
  _clear_error(_cli(f"--dataset={empty_train}", *common,
                    f"--workdir={tmp_path / 'a'}"),
               "--dataset", "0 training")
  empty_test = _npz_data(str(tmp_path / "b.npz"), n_test=0)
  _clear_error(_cli(f"--dataset={empty_test}", "--num_classes=4", *common,
                    f"--workdir={tmp_path / 'b'}"),
               "--dataset", "0 test")
  huge = _npz_data(str(tmp_path / "c.npz"),
                   y_train=np.array([0.0, 1.0, 3e9, 2.0] * 10))
  _clear_error(_cli(f"--dataset={huge}", *common,
                    f"--workdir={tmp_path / 'c'}"), "3000000000")
  outside = _npz_data(str(tmp_path / "d.npz"), y_train=np.arange(40) % 5)
  _clear_error(_cli(f"--dataset={outside}", *common,
                    f"--workdir={tmp_path / 'd'}"),
               "label 4", "--num_classes")
  assert _cli(f"--dataset={outside}", "--num_classes=5", *common,
              f"--workdir={tmp_path / 'd5'}").returncode == 0


def test_keras3_path_has_keras2_epsilon_and_resumes(tmp_path):
  common = dict(steps=22, noise_multiplier=1.0,
                prune=PruneConfig(mode="select", sparsity=0.5))
  k2 = experiment.run(TrainConfig(**common), str(tmp_path / "k2"), verbose=0)
  workdir = str(tmp_path / "k3")
  k3 = experiment.run(TrainConfig(keras=3, **common), workdir, verbose=0)
  assert k3["epsilon"] == k2["epsilon"] and k3["steps"] == 22
  assert k3["config"]["keras"] == 3 and "keras" in k3["versions"]
  assert k3["density"]["overall"] == pytest.approx(k2["density"]["overall"])
  again = experiment.run(TrainConfig(keras=3, **common), workdir, verbose=0)
  assert again["resumed_from_step"] == 22
  assert again["test_accuracy"] == k3["test_accuracy"]
  # Another Keras on resume: a clear refusal, nothing trained over.
  from tfdpprune import ledger  # pylint: disable=g-import-not-at-top
  with pytest.raises(ledger.ResumeRefused, match="keras"):
    experiment.run(TrainConfig(keras=2, **common), workdir, verbose=0)


def test_cli_keras3_trains_and_reports(tmp_path):
  proc = _cli("--keras=3", "--steps=6", "--verbose=0",
              f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "test accuracy" in proc.stdout
  assert _results(str(tmp_path / "run"))["config"]["keras"] == 3
