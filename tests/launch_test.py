"""launch/sweep: grid expansion, the launcher, results, a 2-run digits sweep."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- grid ---------------------------------------------------------------------


def test_expand_grid_is_a_cartesian_product_with_unique_names():
  runs = sweep.expand_grid("sparsity=0.5,0.9;prune_mode=freeze,select",
                           [0, 1, 2])
  assert len(runs) == 2 * 2 * 3
  assert len({r.name for r in runs}) == len(runs)
  # Flag names sorted, values and seeds in the given order.
  assert runs[0].name == "prune_mode=freeze,sparsity=0.5,seed=0"
  assert runs[0].flags() == ["--prune_mode=freeze", "--sparsity=0.5",
                             "--seed=0"]
  assert runs[-1].name == "prune_mode=select,sparsity=0.9,seed=2"


def test_grid_order_does_not_change_the_workdir_names():
  a = sweep.expand_grid("sparsity=0.5,0.9;prune_mode=freeze", [0])
  b = sweep.expand_grid("prune_mode=freeze ; --sparsity=0.5,0.9;", [0])
  assert [r.name for r in a] == [r.name for r in b]


def test_empty_grid_runs_each_seed_once():
  assert [r.name for r in sweep.expand_grid("", [3, 4])] == ["seed=3",
                                                            "seed=4"]


@pytest.mark.parametrize("spec", [
    "sparsity",             # no '='
    "=1",                   # no flag name
    "a b=1",                # not a flag name
    "a=1;a=2",              # flag twice
    "a=1,,2",               # empty value
    "a=1,1",                # repeated value
    "seed=1,2",             # --seeds does that
    "workdir=x",            # set by the sweep
])
def test_bad_grid_is_refused_naming_the_flag(spec):
  with pytest.raises(ValueError, match="^--grid: "):
    sweep.expand_grid(spec, [0])


@pytest.mark.parametrize("seeds", [["x"], [], ["1", "1"]])
def test_bad_seeds_are_refused(seeds):
  with pytest.raises(ValueError, match="^--seeds"):
    sweep.parse_seeds(seeds)


def test_names_are_sanitized_bounded_and_kept_unique():
  run = sweep.expand_grid("dataset=/data/my set.npz", [0])[0]
  assert run.name == "dataset=_data_my_set.npz,seed=0"
  with pytest.raises(ValueError, match="share the workdir name"):
    sweep.expand_grid("dataset=a/b,a_b", [0])
  long = sweep.expand_grid(f"prune_layers={'x' * 300},{'x' * 299}y", [0])
  assert all(len(r.name) <= 200 for r in long)
  assert long[0].name != long[1].name


def test_command_order_lets_grid_override_extra_and_base():
  run = sweep.expand_grid("sparsity=0.9", [1])[0]
  cmd = sweep.command(run, "base.cfg", ["--steps=20", "--sparsity=0.5"],
                      "out/w", python="py")
  assert cmd == ["py", "-m", "tfdpprune.train", "--flagfile=base.cfg",
                 "--steps=20", "--sparsity=0.5", "--sparsity=0.9", "--seed=1",
                 "--workdir=out/w", "--verbose=0"]


def test_rerun_with_other_flags_is_refused(tmp_path):
  run = sweep.expand_grid("sparsity=0.9", [0])[0]
  workdir = str(tmp_path / run.name)
  argv = sweep.command(run, "base.cfg", [], workdir)
  sweep.check_recorded(workdir, argv)  # nothing recorded yet
  sweep.write_meta(run, workdir, argv)
  sweep.check_recorded(workdir, argv)
  with pytest.raises(ValueError, match="different flags"):
    sweep.check_recorded(workdir, sweep.command(run, "base.cfg",
                                                ["--steps=9"], workdir))


# -- launcher -----------------------------------------------------------------

# A stand-in trainer: like tfdpprune.train, exits 143 on SIGTERM.
_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    if sys.argv[2] == "ignore":
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
      signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print("started", flush=True)
    open(os.path.join(sys.argv[1], "started"), "w").close()
    if sys.argv[2] == "fail":
      sys.exit("ValueError: boom")
    time.sleep(60)
""")


def _jobs(tmp_path, modes):
  return [sweep.Job(f"job{i}", (sys.executable, "-c", _CHILD,
                                str(tmp_path / f"job{i}"), mode),
                    str(tmp_path / f"job{i}"))
          for i, mode in enumerate(modes)]


def _start(launcher, jobs, on_done=None):
  result = {}
  thread = threading.Thread(
      target=lambda: result.update(launcher.run(jobs, on_done)), daemon=True)
  thread.start()
  return thread, result


def _wait_started(jobs, count, timeout=30):
  deadline = time.time() + timeout
  while time.time() < deadline:
    started = [j for j in jobs
               if os.path.exists(os.path.join(j.workdir, "started"))]
    if len(started) >= count:
      return started
    time.sleep(0.05)
  raise AssertionError(f"fewer than {count} jobs started in {timeout} s")


def test_launcher_limits_parallelism_and_forwards_sigterm(tmp_path):
  jobs = _jobs(tmp_path, ["sleep"] * 3)
  launcher = sweep.Launcher(max_parallel=2)
  thread, codes = _start(launcher, jobs)
  started = _wait_started(jobs, 2)
  time.sleep(0.3)
  assert len(started) == 2  # the third waits for a free slot
  launcher.stop()
  thread.join(timeout=30)
  assert not thread.is_alive()
  assert sorted(codes.values(), key=str) == [143, 143, None]
  for job in started:
    assert sweep.describe(codes[job.name], job.workdir).startswith(
        "preempted")
    with open(os.path.join(job.workdir, "log.txt")) as f:
      log = f.read()
    assert "launch.sweep:" in log and "started" in log


def test_second_stop_kills_and_failures_are_described(tmp_path):
  jobs = _jobs(tmp_path, ["ignore", "fail"])
  launcher = sweep.Launcher(max_parallel=2)
  failed = threading.Event()
  thread, codes = _start(launcher, jobs,
                         on_done=lambda job, code: failed.set())
  _wait_started(jobs, 2)
  assert failed.wait(timeout=60)  # job1 has exited on its own (loaded CPUs)
  launcher.stop()
  launcher.stop()  # SIGTERM is ignored by job0: the second stop kills it
  thread.join(timeout=30)
  assert codes == {"job0": -9, "job1": 1}
  assert sweep.describe(-9, jobs[0].workdir).startswith(
      "failed (killed by signal 9)")
  assert sweep.describe(1, jobs[1].workdir) == (
      "failed (exit code 1): ValueError: boom")
  assert sweep.describe(None, jobs[1].workdir) == "not started"


def test_max_parallel_below_one_is_refused():
  with pytest.raises(ValueError, match="--max_parallel=0"):
    sweep.Launcher(0)


# -- results ------------------------------------------------------------------


def _fake_run(out, grid, seed, results):
  run = sweep.expand_grid(grid, [seed])[0]
  workdir = os.path.join(out, run.name)
  sweep.write_meta(run, workdir, sweep.command(run, "b.cfg", [], workdir))
  if results is not None:
    config = dict(dataset="fashion_mnist", model="tempered_sigmoid_cnn",
                  delta=1e-5, batch_size=2048, seed=seed, prune=None,
                  noise_multiplier=results.get("noise_multiplier"))
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(dict(results, delta=1e-5, steps=10, sparsity=0.9,
                     wall_time_s=1.0, config=config), f)


def test_collect_write_csv_and_plot_without_subprocesses(tmp_path):
  out = str(tmp_path)
  for seed, acc in [(0, 0.5), (1, 0.7)]:  # mean 0.6, std 0.1
    _fake_run(out, "noise_multiplier=1;prune_mode=freeze", seed,
              {"test_accuracy": acc, "epsilon": 2.0, "noise_multiplier": 1})
    _fake_run(out, "noise_multiplier=2;prune_mode=freeze", seed,
              {"test_accuracy": acc - 0.2, "epsilon": 0.8,
               "noise_multiplier": 2})
  _fake_run(out, "noise_multiplier=0;prune_mode=none", 0,
            {"test_accuracy": 0.9, "epsilon": math.inf, "noise_multiplier": 0})
  _fake_run(out, "noise_multiplier=3;prune_mode=none", 0, None)  # unfinished
  os.makedirs(os.path.join(out, "not_a_run"))

  rows = sweep.collect_results(out)
  assert len(rows) == 5
  assert rows[0]["flag:noise_multiplier"] == "0"
  assert rows[0]["method"] == "prune_mode=none"
  assert rows[0]["seed"] == 0
  lines = sweep.curves(rows)
  assert list(lines) == ["prune_mode=freeze", "prune_mode=none"]
  (eps0, _, acc0, std0, n0), (eps1, _, acc1, std1, n1) = lines[
      "prune_mode=freeze"]
  assert (eps0, n0, eps1, n1) == (0.8, 2, 2.0, 2)
  assert acc0 == pytest.approx(0.4) and std0 == pytest.approx(0.1)
  assert acc1 == pytest.approx(0.6) and std1 == pytest.approx(0.1)
  assert lines["prune_mode=none"] == [(math.inf, 0.0, 0.9, 0.0, 1)]

  sweep.write_csv(rows, os.path.join(out, "results.csv"))
  with open(os.path.join(out, "results.csv")) as f:
    reader = csv.DictReader(f)
    table = list(reader)
  assert reader.fieldnames == [
      "flag:noise_multiplier", "flag:prune_mode", "seed", "test_accuracy",
      "epsilon", "delta", "noise_multiplier", "steps", "sparsity",
      "wall_time_s", "method", "workdir"]
  assert len(table) == 5 and table[0]["epsilon"] == "inf"

  settings = sweep.fixed_settings(rows)
  assert settings == {"dataset": "fashion_mnist", "delta": 1e-5,
                      "model": "tempered_sigmoid_cnn", "batch_size": 2048}
  subtitle = sweep._subtitle(settings)  # pylint: disable=protected-access
  assert subtitle.startswith("fashion_mnist · tempered_sigmoid_cnn · δ = 1e-05")
  assert "batch_size=2048" in subtitle
  sweep.plot(rows, os.path.join(out, "privacy_utility.png"))
  sweep.plot([], os.path.join(out, "empty.png"))
  for name in ("privacy_utility", "empty"):
    with open(os.path.join(out, name + ".png"), "rb") as f:
      assert f.read(8) == PNG_MAGIC
    with open(os.path.join(out, name + ".svg")) as f:
      assert "<svg" in f.read(2000)


# -- end to end ---------------------------------------------------------------


def _sweep(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "launch.sweep", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_sweep_on_digits_writes_csv_and_plot_and_resumes(tmp_path):
  base = tmp_path / "base.cfg"
  base.write_text("--steps=3\n--batch_size=32\n--noise_multiplier=1.0\n")
  out = tmp_path / "sweep"
  args = [f"--base_flagfile={base}", f"--out={out}", "--seeds=0",
          "--max_parallel=2", "--extra_flags=--prune_mode=freeze"]

  dry = _sweep(*args, "--grid=sparsity=0.5,0.9", "--dry_run")
  assert dry.returncode == 0, dry.stderr[-3000:]
  commands = dry.stdout.strip().splitlines()
  assert len(commands) == 2 and not out.exists()
  assert "--prune_mode=freeze --sparsity=0.5 --seed=0" in commands[0]

  proc = _sweep(*args, "--grid=sparsity=0.5,0.9")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["flag:sparsity"] for r in rows] == ["0.5", "0.9"]
  for row in rows:
    assert 0 <= float(row["test_accuracy"]) <= 1
    assert 0 < float(row["epsilon"]) < math.inf
    assert float(row["noise_multiplier"]) == 1.0
    assert int(row["steps"]) == 3 and row["seed"] == "0"
    assert row["method"] == f"sparsity={row['flag:sparsity']}"
    assert os.path.getsize(os.path.join(row["workdir"], "log.txt")) > 0
  png = (out / "privacy_utility.png").read_bytes()
  assert png[:8] == PNG_MAGIC and len(png) > 1000
  mtimes = {r["workdir"]: os.path.getmtime(
      os.path.join(r["workdir"], "results.json")) for r in rows}

  # The same command again: nothing to run.
  again = _sweep(*args, "--grid=sparsity=0.5,0.9")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "2 already finished (skipped), 0 to run" in again.stdout

  # A grown grid: the finished runs are skipped; the new one fails, is
  # reported with the trainer's error, and is left to the next invocation.
  grown = _sweep(*args, "--grid=sparsity=0.5,0.9,1.5")
  assert grown.returncode == 1, grown.stderr[-3000:]
  assert "2 already finished (skipped), 1 to run" in grown.stdout
  assert "sparsity=1.5,seed=0: failed (exit code 1): --sparsity:" in (
      grown.stdout)
  with open(out / "results.csv") as f:
    assert len(list(csv.DictReader(f))) == 2
  for workdir, mtime in mtimes.items():
    assert os.path.getmtime(os.path.join(workdir, "results.json")) == mtime
  retry = _sweep(*args, "--grid=sparsity=0.5,0.9,1.5", "--dry_run")
  assert [line.startswith("# finished: ")
          for line in retry.stdout.strip().splitlines()] == [True, True, False]

  # Other extra flags for the same workdirs: refused, nothing run.
  changed = _sweep(*args[:-1], "--extra_flags=--prune_mode=select",
                   "--grid=sparsity=0.5,0.9")
  assert changed.returncode == 1
  assert "different flags" in changed.stderr


# -- benchmark_speed: argument handling (no timing) ---------------------------


_BENCHMARK_FLAGS_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from absl import app, flags
    from launch import benchmark_speed as bs
    out = {}
    for argv in json.loads(input()):
      flags.FLAGS.unparse_flags()
      flags.FLAGS(["benchmark_speed"] + argv)
      try:
        out[" ".join(argv)] = bs.check_flags()
      except app.UsageError as e:
        out[" ".join(argv)] = "refused: " + str(e)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["benchmark_speed", "--physical_batch_size=256"])
    x, y, w = bs.padded_batch(np.ones((3, 2), np.float32),
                              np.arange(1, 4, dtype=np.int32), 8)
    out["padded"] = [list(x.shape), y.tolist(), w.tolist(),
                     float(x[3:].sum())]
    out["capacity"] = [bs.capacity(8192), bs.capacity(256, multiple=1)]
    print(json.dumps(out))
    """)


def test_benchmark_speed_modes_flags_and_padding():
  cases = {
      "": "default",
      "--models=all": "models",
      "--models=all --keras=3 --physical_batch_size=256 --jit_compile "
      "--mixed_precision=mixed_bfloat16": "models",
      "--memory_sweep=256,512 --physical_batch_size=256": "sweep",
      "--xla_compare --models=tutorial_cnn": "xla",
      "--jit_compile": "refused: --physical_batch_size, --jit_compile",
      "--mixed_precision=mixed_float16": "refused: --physical_batch_size",
      "--xla_compare --jit_compile": "refused: --xla_compare times",
      "--xla_compare --memory_sweep=256": "refused: one mode at a time",
      "--memory_sweep=256,x": "refused: --memory_sweep=",
      "--models=all --physical_batch_size=64": "refused: "
                                               "--physical_batch_size applies",
      "--xla_compare --physical_batch_size=0": "refused: "
                                               "--physical_batch_size=0",
      "--sweep_batch=256": "refused: --sweep_batch needs",
  }
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-c", _BENCHMARK_FLAGS_SCRIPT], cwd=ROOT, env=env,
      input=json.dumps([c.split() for c in cases]) + "\n",
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for argv, expected in cases.items():
    assert out[argv].startswith(expected), (argv, out[argv])
  assert out["padded"] == [[8, 2], [1, 2, 3, 0, 0, 0, 0, 0],
                           [1, 1, 1, 0, 0, 0, 0, 0], 0.0]
  big, small = out["capacity"]
  assert big % 256 == 0 and 8192 < big <= 8192 + 1024
  assert 256 < small < 512
