"""launch/multiworker starts N local workers that finish one run."""

import json
import os
import subprocess
import sys

from tfdpprune import accounting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_local_workers_finish_a_run(tmp_path):
  workdir = str(tmp_path / "mw")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("TF_CONFIG", None)
  proc = subprocess.run(
      [sys.executable, "-m", "launch.multiworker", "--num_workers=2",
       f"--workdir={workdir}", "--", "--steps=4", "--noise_multiplier=1.0",
       "--verbose=0"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["steps"] == 4
  assert results["replicas"] == 2 and "privacy_warning" not in results
  # One global Poisson batch and one noise draw per step: the epsilon of the
  # single-replica run with the same flags.
  assert results["epsilon"] == accounting.compute_epsilon(
      results["num_examples"], 128, 1.0, steps=4)
  assert results["private_randomness"] is True
  for i in range(2):  # both workers really ran in the cluster
    with open(os.path.join(workdir, f"worker_{i}.log")) as f:
      assert "test accuracy" in f.read()
  assert os.path.isdir(os.path.join(workdir, "workers", "worker_1"))
