r"""Sweep `tfdpprune.train` over a grid: runs, CSV, privacy-utility plot.

  python -m launch.sweep --base_flagfile=flags/fashion_mnist/base.cfg \
      --grid='target_epsilon=1,3,8;prune_mode=none,freeze;sparsity=0.9' \
      --seeds=0,1 --out=runs/sweep_fmnist --max_parallel=1

* `--grid`: `flag=v1,v2,...` groups separated by `;`; the runs are the
  cartesian product of the groups times `--seeds`.
* One workdir per run under `--out`, named from its grid values and seed
  (`prune_mode=freeze,sparsity=0.9,target_epsilon=3,seed=1`). Each run is
  `python -m tfdpprune.train --flagfile=<base> <extra> <grid flags>
  --seed=<s> --workdir=<dir> --verbose=0`, logging to `<dir>/log.txt`.
* At most `--max_parallel` runs at once; a tqdm bar counts finished runs.
* Resumable: runs with a `results.json` are skipped; interrupted or failed
  runs are started again (and resume from their checkpoints) by rerunning
  the same command. SIGINT / SIGTERM are forwarded to the running children,
  which checkpoint and exit.
* Finally every `results.json` under `--out` goes into `<out>/results.csv`
  (grid values in `flag:<name>` columns, then the measured metrics),
  and `<out>/privacy_utility.png` plots test accuracy against epsilon, one
  line per method (the grid point without the privacy flags and the seed),
  mean over seeds with standard-deviation error bars.
* `--dry_run` prints the commands.
"""

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from concurrent import futures
from typing import Dict, List, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_string("base_flagfile", None, "Flagfile every run starts from.")
flags.DEFINE_string("grid", "", "flag=v1,v2;flag2=w1,w2 (cartesian product).")
flags.DEFINE_list("seeds", ["0"], "Seeds; each grid point runs once per seed.")
flags.DEFINE_string("out", None, "Directory of the sweep's runs and outputs.")
flags.DEFINE_integer("max_parallel", 1, "Runs at once (>= 1).")
flags.DEFINE_string("extra_flags", "", "More trainer flags for every run.")
flags.DEFINE_bool("dry_run", False, "Print the commands and exit.")
FLAGS = flags.FLAGS

# Flags that set the privacy level: they vary along a method's curve.
PRIVACY_FLAGS = ("target_epsilon", "noise_multiplier", "delta", "epochs",
                 "steps")
CSV_FIELDS = ("test_accuracy", "epsilon", "delta", "noise_multiplier", "steps",
              "sparsity", "wall_time_s")


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the sweep: grid values (flag -> value) and a seed."""
  values: Tuple[Tuple[str, str], ...]
  seed: int

  @property
  def name(self) -> str:
    parts = [f"{k}={v}" for k, v in self.values] + [f"seed={self.seed}"]
    return re.sub(r"[^A-Za-z0-9=,._-]", "_", ",".join(parts))

  def flags(self) -> List[str]:
    return [f"--{k}={v}" for k, v in self.values] + [f"--seed={self.seed}"]


def parse_grid(spec: str) -> List[Tuple[str, List[str]]]:
  """`"a=1,2;b=x"` -> `[("a", ["1", "2"]), ("b", ["x"])]`."""
  groups = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.+)", part)
    if not match:
      raise ValueError(f"--grid: bad group {part!r}; expected flag=v1,v2,...")
    name, values = match.group(1), [v.strip() for v in match.group(2)
                                    .split(",")]
    if name == "seed":
      raise ValueError("--grid: use --seeds for seeds")
    if any(not v for v in values):
      raise ValueError(f"--grid: empty value in {part!r}")
    if name in dict(groups):
      raise ValueError(f"--grid: flag {name!r} appears twice")
    groups.append((name, values))
  return groups


def expand_grid(spec: str, seeds: Sequence[int]) -> List[Run]:
  """Every grid point (sorted flag names) times every seed."""
  groups = sorted(parse_grid(spec))
  if not seeds:
    raise ValueError("--seeds: give at least one seed")
  names = [n for n, _ in groups]
  runs = [Run(tuple(zip(names, combo)), int(seed))
          for combo in itertools.product(*[v for _, v in groups])
          for seed in seeds]
  if len({r.name for r in runs}) != len(runs):
    raise ValueError("--grid: two runs would share a workdir name")
  return runs


def command(run: Run, base_flagfile: str, extra: Sequence[str],
            workdir: str) -> List[str]:
  return [sys.executable, "-m", "tfdpprune.train",
          f"--flagfile={base_flagfile}", *extra, *run.flags(),
          f"--workdir={workdir}", "--verbose=0"]


def method_of(values: Dict[str, str]) -> str:
  """A method's label: its grid values without privacy flags and seed."""
  kept = [f"{k}={v}" for k, v in sorted(values.items())
          if k not in PRIVACY_FLAGS and k != "seed"]
  return ", ".join(kept) or "DP-SGD"


def collect_results(out: str) -> List[dict]:
  """One row per finished run under `out` (grid values, seed, metrics)."""
  rows = []
  for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
    workdir = os.path.join(out, name)
    path = os.path.join(workdir, "results.json")
    meta = os.path.join(workdir, "sweep.json")
    if not (os.path.exists(path) and os.path.exists(meta)):
      continue
    with open(path) as f:
      results = json.load(f)
    with open(meta) as f:
      values = json.load(f)
    row = {f"flag:{k}": v for k, v in values.items()}
    row.update({k: results.get(k) for k in CSV_FIELDS})
    row["method"] = method_of(values)
    row["workdir"] = workdir
    rows.append(row)
  return rows


def write_csv(rows: Sequence[dict], path: str) -> None:
  keys = []
  for row in rows:
    keys += [k for k in row if k not in keys]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)


def plot(rows: Sequence[dict], path: str) -> None:
  """Accuracy vs epsilon, one line per method, mean +- std over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.5))
  methods = sorted({r["method"] for r in rows})
  for method in methods:
    points: Dict[float, List[float]] = {}
    for r in rows:
      if r["method"] == method and math.isfinite(r["epsilon"]):
        points.setdefault(round(r["epsilon"], 3), []).append(
            r["test_accuracy"])
    eps = sorted(points)
    mean = [float(np.mean(points[e])) for e in eps]
    std = [float(np.std(points[e])) for e in eps]
    ax.errorbar(eps, mean, yerr=std, marker="o", capsize=3, label=method)
  ax.set_xlabel("epsilon (delta as configured)")
  ax.set_ylabel("test accuracy")
  ax.set_title("Privacy-utility trade-off")
  ax.grid(alpha=0.3)
  if methods:
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


class _Children:
  """Running child processes, to forward SIGINT / SIGTERM to."""

  def __init__(self):
    self.lock = threading.Lock()
    self.procs = set()
    self.stopping = False

  def stop(self, signum, frame):
    del signum, frame
    with self.lock:
      self.stopping = True
      for p in self.procs:
        if p.poll() is None:
          p.send_signal(signal.SIGTERM)


def _execute(run, cmd, workdir, children) -> int:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump({**dict(run.values), "seed": run.seed}, f)
  with children.lock:
    if children.stopping:
      return -1
    log = open(os.path.join(workdir, "log.txt"), "a")  # pylint: disable=consider-using-with
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    children.procs.add(proc)
  code = proc.wait()
  log.close()
  with children.lock:
    children.procs.discard(proc)
  return code


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.base_flagfile or not os.path.exists(FLAGS.base_flagfile):
    raise app.UsageError(f"--base_flagfile={FLAGS.base_flagfile!r}: no such "
                         "file")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  if FLAGS.max_parallel < 1:
    raise app.UsageError(f"--max_parallel={FLAGS.max_parallel} must be >= 1")
  try:
    runs = expand_grid(FLAGS.grid, [int(s) for s in FLAGS.seeds])
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  extra = shlex.split(FLAGS.extra_flags)
  os.makedirs(FLAGS.out, exist_ok=True)
  jobs = [(r, os.path.join(FLAGS.out, r.name)) for r in runs]
  if FLAGS.dry_run:
    for r, workdir in jobs:
      print(shlex.join(command(r, FLAGS.base_flagfile, extra, workdir)))
    return
  todo = [(r, w) for r, w in jobs
          if not os.path.exists(os.path.join(w, "results.json"))]
  logging.info("%d runs: %d finished (skipped), %d to run", len(jobs),
               len(jobs) - len(todo), len(todo))
  print(f"{len(jobs)} runs: {len(jobs) - len(todo)} already finished "
        f"(skipped), {len(todo)} to run")

  children = _Children()
  signal.signal(signal.SIGTERM, children.stop)
  signal.signal(signal.SIGINT, children.stop)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  failed = []
  with futures.ThreadPoolExecutor(FLAGS.max_parallel) as pool:
    pending = {pool.submit(_execute, r, command(r, FLAGS.base_flagfile, extra,
                                                w), w, children): (r, w)
               for r, w in todo}
    for done in tqdm(futures.as_completed(pending), total=len(pending),
                     desc="runs", unit="run"):
      r, w = pending[done]
      code = done.result()
      if code != 0:
        failed.append((r.name, code))
        logging.warning("run %s exited with %d (see %s/log.txt)", r.name,
                        code, w)

  rows = collect_results(FLAGS.out)
  write_csv(rows, os.path.join(FLAGS.out, "results.csv"))
  plot(rows, os.path.join(FLAGS.out, "privacy_utility.png"))
  print(f"{len(rows)} results -> {FLAGS.out}/results.csv, "
        f"{FLAGS.out}/privacy_utility.png")
  if failed:
    print(f"{len(failed)} runs did not finish (rerun to resume): {failed}")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
