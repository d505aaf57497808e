"""Multi-replica DP: one global Poisson batch per step, noise added once.

Each case runs `tests/multireplica_helper.py` in fresh processes (logical
CPU devices must be configured before TensorFlow starts): two logical CPU
devices under MirroredStrategy, and two local workers under
MultiWorkerMirroredStrategy.
"""

import json
import os
import subprocess
import sys

import numpy as np
from scipy import stats

from launch import cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "multireplica_helper.py")


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
  env.pop("TF_CONFIG", None)
  env.update(extra)
  return env


def _check_step(results):
  assert results["replicas"] == 2
  # 20,000 noise coordinates: the std estimate is within ~0.5% (1 s.e.) of
  # sigma*C. The band accepts sigma*C and rejects sqrt(2)*sigma*C (every
  # replica adding its own noise) and sigma*C/sqrt(2).
  assert 0.95 < results["noise_ratio"] < 1.05, results["noise_ratio"]
  # A noiseless global step equals the single-replica step on that batch.
  assert results["max_abs_diff"] < 1e-5, results["max_abs_diff"]


def test_mirrored_two_replicas_noise_once_and_step_equals_single(tmp_path):
  out = str(tmp_path / "mirrored.json")
  proc = subprocess.run([sys.executable, HELPER, "mirrored", out], cwd=ROOT,
                        env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    results = json.load(f)
  _check_step(results)
  assert 0.95 < results["fit_noise_ratio"] < 1.05  # through model.fit too
  # A Keras 3 private model under the same strategy: noise once, the masked
  # Adam step equals one replica's, both replicas' copies agree.
  assert 0.95 < results["keras3_noise_ratio"] < 1.05
  assert results["keras3_max_abs_diff"] < 1e-5
  assert results["keras3_replica_copies_diff"] == 0.0
  assert results["keras3_frozen_kept"]
  # Physical batches per replica (chunks of 3 of each replica's 4 examples):
  # still one noise draw and the unsplit single-replica step.
  assert results["keras3_physical_max_abs_diff"] < 1e-5
  assert results["keras3_physical_copies_diff"] == 0.0
  # The global batch is a Poisson sample split across replicas: example i
  # is only ever on replica i mod 2, and joins each step with q = 0.3.
  counts = np.array(results["poisson_counts"])  # [replica, example], 300 steps
  for i in range(counts.shape[1]):
    assert counts[1 - i % 2, i] == 0
  total = counts.sum(axis=0)
  assert stats.binomtest(int(total.sum()), 300 * 60, 0.3).pvalue > 1e-3
  assert stats.chisquare(total).pvalue > 1e-4  # same rate for every example


def test_two_local_workers_noise_once_and_step_equals_single(tmp_path):
  out = str(tmp_path / "workers.json")
  procs = []
  for tf_config in cluster.tf_configs(cluster.free_ports(2)):
    procs.append(subprocess.Popen(
        [sys.executable, HELPER, "worker", out], cwd=ROOT,
        env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  with open(out) as f:
    _check_step(json.load(f))


def test_trainer_with_two_mirrored_replicas_reports_single_replica_epsilon(
    tmp_path):
  from tfdpprune import accounting  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  proc = subprocess.run(
      [sys.executable, "-m", "tfdpprune.train", "--distribute=mirrored",
       "--cpu_replicas=2", "--steps=6", "--noise_multiplier=1.0",
       "--prune_mode=select", "--sparsity=0.5", "--verbose=0",
       f"--workdir={workdir}"], cwd=ROOT, env=_env(), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["replicas"] == 2 and results["steps"] == 6
  assert "privacy_warning" not in results
  assert results["epsilon"] == accounting.compute_epsilon(
      results["num_examples"], 128, 1.0, steps=6)
