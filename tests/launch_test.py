"""launch/sweep: grid expansion, a 2-point digits sweep, CSV and plot."""

import csv
import os
import subprocess
import sys

import pytest

from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_expand_grid_is_a_cartesian_product_with_unique_names():
  runs = sweep.expand_grid("sparsity=0.5,0.9;prune_mode=freeze,select",
                           [0, 1, 2])
  assert len(runs) == 2 * 2 * 3
  assert len({r.name for r in runs}) == len(runs)
  assert runs[0].flags() == ["--prune_mode=freeze", "--sparsity=0.5",
                             "--seed=0"]


@pytest.mark.parametrize("spec", ["sparsity", "=1", "a=1;a=2", "a=1,,2",
                                  "seed=1,2"])
def test_bad_grid_is_refused(spec):
  with pytest.raises(ValueError, match="--grid"):
    sweep.expand_grid(spec, [0])


def test_method_label_drops_privacy_flags_and_seed():
  assert sweep.method_of({"target_epsilon": "3", "prune_mode": "freeze",
                          "seed": "1"}) == "prune_mode=freeze"
  assert sweep.method_of({"noise_multiplier": "1"}) == "DP-SGD"


def test_sweep_on_digits_writes_csv_and_plot_and_skips_finished(tmp_path):
  base = tmp_path / "base.cfg"
  base.write_text("--steps=3\n--batch_size=32\n--noise_multiplier=1.0\n"
                  "--prune_mode=freeze\n")
  out = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "launch.sweep", f"--base_flagfile={base}",
         "--grid=sparsity=0.5,0.9", "--seeds=0", f"--out={out}",
         "--max_parallel=2"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2
  assert sorted(r["flag:sparsity"] for r in rows) == ["0.5", "0.9"]
  for row in rows:
    assert 0 <= float(row["test_accuracy"]) <= 1
    assert 0 < float(row["epsilon"]) < float("inf")
  png = (out / "privacy_utility.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
  finished = {r["workdir"]: os.path.getmtime(
      os.path.join(r["workdir"], "results.json")) for r in rows}
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "2 already finished (skipped), 0 to run" in again.stdout
  for workdir, mtime in finished.items():
    assert os.path.getmtime(os.path.join(workdir, "results.json")) == mtime
