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
import pytest

from tfdpprune import accounting
from tfdpprune import experiment
from tfdpprune import train
from tfdpprune._compat import tf
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
  assert {"train/loss", "train/accuracy", "eval/loss", "eval/accuracy",
          "privacy/epsilon", "privacy/noise_multiplier", "sparsity/overall",
          "diagnostics_nonprivate/clip_fraction", "config"} <= tags


@pytest.fixture
def parsed_flags():
  def parse(*args):
    FLAGS.unparse_flags()
    FLAGS(["train", *args])
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
])
def test_invalid_flags_name_the_flag_and_range(parsed_flags, args, names):
  with pytest.raises(ValueError) as e:
    parsed_flags(*args)
  for name in names:
    assert name in str(e.value)


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
