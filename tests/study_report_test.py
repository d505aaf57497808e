"""launch/study_report: tables (mean +- sample std over seeds) and figures
from a study directory of fake sweep runs (no training)."""

import json
import os
import subprocess
import sys

import pytest

from launch import study_report
from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(out, grid, seed, test, *, target=3.0, val=None, last=None,
         sparsity=0.0):
  run = sweep.expand_grid(grid, [seed])[0]
  workdir = os.path.join(out, run.name)
  sweep.write_meta(run, workdir, sweep.command(run, "b.cfg", [], workdir))
  results = dict(test_accuracy=test, epsilon=target, delta=1e-5,
                 noise_multiplier=1.0, steps=10, sparsity=sparsity,
                 wall_time_s=120.0, test_accuracy_last_iterate=last,
                 config=dict(dataset="fashion_mnist", seed=seed,
                             target_epsilon=target))
  if val is not None:
    results["validation_accuracy"] = val
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f)


@pytest.fixture(name="study")
def _study(tmp_path):
  root = tmp_path / "study"
  for seed, acc in [(1, 0.80), (2, 0.82), (3, 0.84)]:  # mean 82, stdev 2
    _run(root / "final/dpsgd/eps3", "target_epsilon=3", seed, acc,
         last=acc - 0.01)
    _run(root / "final/best/eps3", "target_epsilon=3", seed, acc + 0.03)
  _run(root / "final/dpsgd/eps_high", "target_epsilon=8", 1, 0.88, target=8)
  screen = root / "screen_eps1"
  _run(screen / "plain", "lr_schedule=constant", 0, 0.8, target=1, val=0.81)
  _run(screen / "plain", "lr_schedule=cosine", 0, 0.9, target=1, val=0.95)
  for sp, val in [(0.5, 0.82), (0.9, 0.79)]:
    _run(screen / "select_random", f"sparsity={sp}", 0, 0.8, target=1,
         val=val, sparsity=sp)
  _run(screen / "group", "model_norm=group", 0, 0.8, target=1, val=0.7)
  os.makedirs(root / "final/empty")
  return str(root)


def test_mean_and_sample_std():
  assert study_report.mean_std([0.80, 0.82, 0.84]) == pytest.approx(
      (0.82, 0.02))
  assert study_report.mean_std([0.5]) == (0.5, 0.0)


def test_difference_matches_a_hand_computed_welch_interval():
  # a - b = 0.03; both sample stds 0.02, n = 3: se = 0.02 * sqrt(2/3),
  # dof = 4, t(0.975, 4) = 2.7764.
  d, lo, hi, p = study_report.difference([0.83, 0.85, 0.87],
                                         [0.80, 0.82, 0.84])
  half = 2.7764451 * 0.02 * (2 / 3) ** 0.5
  assert d == pytest.approx(0.03)
  assert (lo, hi) == pytest.approx((0.03 - half, 0.03 + half), abs=1e-6)
  assert 0.05 < p < 0.2  # t = 1.84 on 4 dof
  with pytest.raises(ValueError, match="2 seeds"):
    study_report.difference([0.8], [0.7, 0.9])


def test_report_tables_and_figures(study, tmp_path):
  figures = str(tmp_path / "figures")
  text = study_report.report(study, figures)
  found = [os.path.relpath(d, study) for d in study_report.sweep_dirs(study)]
  assert found == ["final/best/eps3", "final/dpsgd/eps3",
                   "final/dpsgd/eps_high", "screen_eps1/group",
                   "screen_eps1/plain", "screen_eps1/select_random"]
  # Held-out seeds: mean +- sample std, in percent; last iterate shown.
  assert ("| target_epsilon=3 | 1,2,3 | 82.00 ± 2.00 | 81.00 ± 2.00 | "
          "3.00 ± 0.00 |") in text
  assert "| target_epsilon=3 | 1,2,3 | 85.00 ± 2.00 |" in text
  assert "| lr_schedule=cosine | 0 | 95.00 | 90.00 |" in text
  assert ("| best | 3 | 85.00 ± 2.00 (n=3) | 82.00 ± 2.00 (n=3) | +3.00 |"
          in text)
  with open(os.path.join(study, "report.md")) as f:
    assert f.read() == text

  lines = study_report.final_lines(study_report.collect(study))
  assert list(lines) == ["best", "dpsgd"]
  points = study_report._line_points(  # pylint: disable=protected-access
      lines["dpsgd"], "test_accuracy")
  assert [(p[0], p[3]) for p in points] == [(3.0, 3), (8.0, 1)]
  assert points[0][1] == pytest.approx(0.82)

  screens = study_report.screen_lines(study_report.collect(study))
  assert list(screens) == [1.0]
  assert sorted(screens[1.0]) == ["group", "plain", "select_random"]
  for name in ("privacy_utility", "sparsity"):
    with open(os.path.join(figures, name + ".png"), "rb") as f:
      assert f.read(8) == PNG_MAGIC
    with open(os.path.join(figures, name + ".svg")) as f:
      assert "<svg" in f.read(2000)


def test_cli_refuses_a_missing_directory(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.study_report",
       f"--study_dir={tmp_path / 'nope'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "--study_dir=" in proc.stderr and "not a directory" in proc.stderr


def test_study_script_dry_run_lists_every_run(tmp_path):
  # The long runs are benchmarks, not tests: check that every stage's sweep
  # is valid (flagfiles exist, grids parse) and counts the runs it plans.
  env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable)
  proc = subprocess.run(
      ["bash", os.path.join(ROOT, "launch/study.sh"), str(tmp_path / "s"),
       "tune,screen,scatter,final"], env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  commands = [l for l in proc.stdout.splitlines() if "tfdpprune.train" in l]
  # tune 2*3*2*2 + 4; screen per eps 2+5+2+2+2+1+1 (+1 augmult at eps 3,
  # +3 selection schedule and scope, +3 public data, +1 x4-wide at eps 1);
  # scatter 5+5+6; final 3+3+1+2+3+3 (CNN) + 3+1+3+2 (ScatterNet).
  assert len(commands) == 28 + 2 * 15 + 1 + 3 + 3 + 1 + 16 + 15 + 9
  assert sum("--prune_method=magnitude --sparsity=0.8 --learning_rate=4" in c
             for c in commands) == 3
  assert sum("--workdir=" + str(tmp_path / "s" / "final") in c
             for c in commands) == 24
  assert sum("--features" not in c and "scatternet_linear.cfg" in c
             for c in commands) == 16 + 9
  assert not os.path.exists(tmp_path / "s" / "tune")
