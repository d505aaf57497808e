r"""Sweep `tfdpprune.train` over a grid of flags and seeds; CSV and plot.

  python -m launch.sweep --base_flagfile=flags/fashion_mnist/base.cfg \
      --grid='target_epsilon=1,3,8;prune_mode=freeze,select;sparsity=0.9' \
      --seeds=0,1 --out=runs/sweep_fmnist --max_parallel=1 \
      --extra_flags='--epochs=5 --prune_method=random'

Flags:
  --base_flagfile  flagfile every run starts from (required).
  --grid           `flag=v1,v2,...` groups separated by `;`. The runs are the
                   cartesian product of the groups times --seeds. Values may
                   not contain `,` or `;`; `seed`, `workdir`, `verbose` and
                   `flagfile` are set by the sweep and refused here.
  --seeds          comma-separated integer seeds (default 0).
  --out            directory of the sweep: one workdir per run, results.csv,
                   privacy_utility.png (required).
  --max_parallel   runs at once (default 1: one TensorFlow run already uses
                   every core).
  --extra_flags    more trainer flags for every run, shell-quoted, e.g.
                   '--steps=20 --prune_mode=freeze'.
  --dry_run        print the commands (finished runs as comments) and exit.

Each run gets a workdir `<out>/<name>`, named by its grid values (flag names
sorted, so the same grid written in another order resumes the same runs) and
seed, e.g. `prune_mode=select,sparsity=0.9,target_epsilon=3,seed=1`, and runs

  <python> -m tfdpprune.train --flagfile=<base> <extra flags> <grid flags> \
      --seed=<s> --workdir=<workdir> --verbose=0

with stdout and stderr appended to `<workdir>/log.txt`. Later flags override
earlier ones, so grid values beat the extra flags, which beat the base file.

Resuming: a run whose `results.json` exists is skipped. A run that is
preempted (exit 143, checkpointed), fails or is interrupted is reported and
started again by rerunning the same command; the trainer resumes it from its
checkpoint. The command of each run is recorded in `<workdir>/sweep.json`,
and a rerun whose command for that workdir differs (other base file path,
extra flags, ...) is refused rather than mixing two configurations in one run
(the contents of the base file are not compared).

Signals: children run in their own sessions, so a terminal's Ctrl-C reaches
only the sweep, which forwards SIGTERM to the running children (they
checkpoint at the next step and exit 143) and starts no new run; a second
Ctrl-C / SIGTERM sends SIGKILL. Exit status: 0 when every run has finished,
1 when some failed or were preempted, 128 + signal number when interrupted.

Outputs, rewritten at the end of every invocation from every run under --out
that has a `results.json`:
  results.csv           one row per run: `flag:<name>` columns with the grid
                        values, seed, test_accuracy, epsilon, delta,
                        noise_multiplier, steps, sparsity (measured),
                        wall_time_s, method, workdir.
  privacy_utility.png   test accuracy against epsilon, one line per method
                        (the grid point without the PRIVACY_FLAGS and the
                        seed), mean over seeds with standard-deviation error
                        bars (methods dodged so bars do not overlap; the title
                        names data set, model, delta and the shared flags),
                        also as privacy_utility.svg; runs with epsilon = inf (no noise) are drawn as
                        horizontal lines.

The pieces (`expand_grid`, `command`, `Launcher`, `collect_results`,
`write_csv`, `plot`) read no flags and are tested in tests/launch_test.py.
"""

import csv
import dataclasses
import datetime
import hashlib
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags

flags.DEFINE_string("base_flagfile", None, "Flagfile every run starts from.")
flags.DEFINE_string("grid", "", "flag=v1,v2;flag2=w1,w2 (cartesian product).")
flags.DEFINE_list("seeds", ["0"], "Seeds; every grid point runs once per seed.")
flags.DEFINE_string("out", None, "Directory of the sweep's runs and outputs.")
flags.DEFINE_integer("max_parallel", 1, "Runs at once (>= 1).")
flags.DEFINE_string("extra_flags", "", "More trainer flags for every run "
                    "(shell-quoted).")
flags.DEFINE_bool("dry_run", False, "Print the commands and exit.")
FLAGS = flags.FLAGS

RESULTS = "results.json"  # tfdpprune.experiment.RESULTS (not imported: no TF)
META = "sweep.json"
LOG = "log.txt"
PREEMPTED = 143  # the trainer's exit code after checkpointing on SIGTERM
# Flags that move a method along its privacy-utility curve.
PRIVACY_FLAGS = ("target_epsilon", "noise_multiplier", "delta", "epochs",
                 "steps")
# Set by the sweep for every run; a grid cannot vary them.
_RESERVED = {"seed": "use --seeds", "workdir": "set by the sweep",
             "verbose": "set by the sweep", "flagfile": "use --base_flagfile"}
METRICS = ("test_accuracy", "epsilon", "delta", "noise_multiplier", "steps",
           "sparsity", "wall_time_s")
_MAX_NAME = 200


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the sweep: grid values (sorted by flag name) and a seed."""
  values: Tuple[Tuple[str, str], ...]
  seed: int

  @property
  def name(self) -> str:
    """Readable, filesystem-safe, deterministic workdir name."""
    parts = [f"{k}={v}" for k, v in self.values] + [f"seed={self.seed}"]
    name = re.sub(r"[^A-Za-z0-9=,.+_-]", "_", ",".join(parts))
    if len(name) > _MAX_NAME:  # stays unique through the digest
      digest = hashlib.sha1(name.encode()).hexdigest()[:10]
      name = f"{name[:_MAX_NAME - 11]}~{digest}"
    return name

  def flags(self) -> List[str]:
    return [f"--{k}={v}" for k, v in self.values] + [f"--seed={self.seed}"]


def parse_grid(spec: str) -> List[Tuple[str, List[str]]]:
  """`"a=1,2;b=x"` -> `[("a", ["1", "2"]), ("b", ["x"])]`, in given order."""
  groups: List[Tuple[str, List[str]]] = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    match = re.fullmatch(r"(?:--)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)", part)
    if not match:
      raise ValueError(f"--grid: bad group {part!r}; expected "
                       "flag=v1,v2,... with groups separated by ';'")
    name = match.group(1)
    values = [v.strip() for v in match.group(2).split(",")]
    if name in _RESERVED:
      raise ValueError(f"--grid: {name!r} cannot be swept ({_RESERVED[name]})")
    if any(not v for v in values):
      raise ValueError(f"--grid: empty value in {part!r}")
    if len(set(values)) != len(values):
      raise ValueError(f"--grid: repeated value in {part!r}")
    if name in dict(groups):
      raise ValueError(f"--grid: flag {name!r} appears twice")
    groups.append((name, values))
  return groups


def parse_seeds(seeds: Sequence[str]) -> List[int]:
  try:
    out = [int(s) for s in seeds]
  except ValueError as e:
    raise ValueError(f"--seeds={','.join(seeds)!r}: expected integers "
                     "separated by commas") from e
  if not out:
    raise ValueError("--seeds: give at least one seed")
  if len(set(out)) != len(out):
    raise ValueError(f"--seeds={','.join(seeds)!r}: repeated seed")
  return out


def expand_grid(spec: str, seeds: Sequence[int]) -> List[Run]:
  """The runs of a grid: every point (flag names sorted) times every seed.

  >>> [r.name for r in expand_grid("sparsity=0.5,0.9;prune_mode=freeze", [0])]
  ['prune_mode=freeze,sparsity=0.5,seed=0', 'prune_mode=freeze,sparsity=0.9,seed=0']

  Raises ValueError (starting with the flag's name) on a malformed grid.
  """
  groups = sorted(parse_grid(spec))
  if not seeds:
    raise ValueError("--seeds: give at least one seed")
  names = [n for n, _ in groups]
  runs = [Run(tuple(zip(names, combo)), int(seed))
          for combo in itertools.product(*[v for _, v in groups])
          for seed in seeds]
  seen: Dict[str, Run] = {}
  for run in runs:
    if run.name in seen:
      raise ValueError(f"--grid: {seen[run.name].values} and {run.values} "
                       f"share the workdir name {run.name!r}")
    seen[run.name] = run
  return runs


def command(run: Run, base_flagfile: str, extra: Sequence[str],
            workdir: str, python: str = sys.executable) -> List[str]:
  """The trainer's argv for `run`."""
  return [python, "-m", "tfdpprune.train", f"--flagfile={base_flagfile}",
          *extra, *run.flags(), f"--workdir={workdir}", "--verbose=0"]


def is_finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, RESULTS))


def check_recorded(workdir: str, argv: Sequence[str]) -> None:
  """Refuses to continue a run in `workdir` that was started differently."""
  path = os.path.join(workdir, META)
  if not os.path.exists(path):
    return
  with open(path) as f:
    recorded = json.load(f).get("args")
  if recorded is not None and list(recorded) != list(argv[1:]):
    raise ValueError(
        f"{workdir} was run with different flags:\n  recorded: "
        f"{shlex.join(recorded)}\n  now:      {shlex.join(argv[1:])}\n"
        "Use another --out, or delete that directory to start it afresh.")


def write_meta(run: Run, workdir: str, argv: Sequence[str]) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, META), "w") as f:
    json.dump({"grid": dict(run.values), "seed": run.seed,
               "args": list(argv[1:])}, f, indent=2)


# -- running ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
  name: str
  argv: Tuple[str, ...]
  workdir: str


class Launcher:
  """Runs jobs as subprocesses, at most `max_parallel` at once.

  `run` blocks and returns {job name: exit code, or None if not started}.
  `stop` (a signal handler, or callable from any thread) sends SIGTERM to the
  running children and starts no further job; a second `stop` sends SIGKILL.
  """

  def __init__(self, max_parallel: int):
    if max_parallel < 1:
      raise ValueError(f"--max_parallel={max_parallel}: must be >= 1")
    self.max_parallel = max_parallel
    self.signum: Optional[int] = None
    self._lock = threading.RLock()  # stop() may interrupt the main thread
    self._procs: set = set()

  @property
  def stopping(self) -> bool:
    return self.signum is not None

  def stop(self, signum: int = signal.SIGTERM, frame=None) -> None:
    del frame
    with self._lock:
      forward = signal.SIGKILL if self.stopping else signal.SIGTERM
      self.signum = self.signum or signum
      for proc in self._procs:
        if proc.poll() is None:
          proc.send_signal(forward)

  def _run_one(self, job: Job) -> Optional[int]:
    os.makedirs(job.workdir, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(os.path.join(job.workdir, LOG), "a") as log:
      with self._lock:
        if self.stopping:
          return None
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"# {stamp} launch.sweep: {shlex.join(job.argv)}\n")
        log.flush()
        # Own session: a terminal's Ctrl-C goes to the sweep only, which
        # forwards SIGTERM so the trainer can checkpoint.
        proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        self._procs.add(proc)
      try:
        return proc.wait()
      finally:
        with self._lock:
          self._procs.discard(proc)

  def run(self, jobs: Sequence[Job],
          on_done: Optional[Callable[[Job, Optional[int]], None]] = None
          ) -> Dict[str, Optional[int]]:
    codes: Dict[str, Optional[int]] = {}
    with futures.ThreadPoolExecutor(self.max_parallel) as pool:
      pending = {pool.submit(self._run_one, job): job for job in jobs}
      for done in futures.as_completed(pending):
        job = pending[done]
        codes[job.name] = done.result()
        if on_done is not None:
          on_done(job, codes[job.name])
    return codes


def describe(code: Optional[int], workdir: str) -> str:
  """A one-line status of a run that ended with exit `code`."""
  if code is None:
    return "not started"
  if code == 0 and is_finished(workdir):
    return "finished"
  if code == PREEMPTED:
    return "preempted (checkpointed; rerun the sweep to resume)"
  reason = (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
  if code == 0:
    reason = f"no {RESULTS}"
  return f"failed ({reason}): {_last_line(os.path.join(workdir, LOG))}"


def _last_line(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      lines = [l.strip() for l in f.readlines()[-20:] if l.strip()]
  except OSError:
    return ""
  lines = [l for l in lines if not l.startswith("Pass --help")]
  return lines[-1][:300] if lines else ""


# -- results ----------------------------------------------------------------


def method_of(values: Dict[str, str]) -> str:
  """A method's label: its grid values without privacy flags and seed."""
  kept = [f"{k}={v}" for k, v in sorted(values.items())
          if k not in PRIVACY_FLAGS and k != "seed"]
  return ", ".join(kept) or "DP-SGD"


def collect_results(out: str,
                    extra: Optional[Callable[[dict], dict]] = None
                    ) -> List[dict]:
  """One row per finished sweep run under `out`, sorted by workdir.

  A row holds `flag:<name>` (grid values, as strings), `seed`, the METRICS
  from results.json, `method` and `workdir`; `extra(results)` adds more
  fields from the same results.json.
  """
  rows = []
  for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
    workdir = os.path.join(out, name)
    if not (is_finished(workdir) and
            os.path.exists(os.path.join(workdir, META))):
      continue
    with open(os.path.join(workdir, RESULTS)) as f:
      results = json.load(f)
    with open(os.path.join(workdir, META)) as f:
      meta = json.load(f)
    grid = {k: str(v) for k, v in meta["grid"].items()}
    row = {f"flag:{k}": v for k, v in sorted(grid.items())}
    row["seed"] = int(meta["seed"])
    row.update({k: results.get(k) for k in METRICS})
    row["method"] = method_of(grid)
    row["workdir"] = workdir
    if extra is not None:
      row.update(extra(results))
    rows.append(row)
  return rows


def write_csv(rows: Sequence[dict], path: str) -> None:
  """Writes `rows` (from collect_results) with grid columns first."""
  grid = sorted({k for r in rows for k in r if k.startswith("flag:")})
  rest = ["seed", *METRICS, "method", "workdir"]
  extra = [k for r in rows for k in r if k not in grid and k not in rest]
  fields = grid + rest + list(dict.fromkeys(extra))
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def curves(rows: Sequence[dict]) -> Dict[str, List[Tuple[float, float, float,
                                                         float, int]]]:
  """{method: [(eps mean, eps std, acc mean, acc std, #seeds)]}, by epsilon.

  Runs of one method that share their privacy-flag values are one point
  (they differ only in the seed); epsilon = inf stays inf.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  groups: Dict[str, Dict[tuple, List[dict]]] = {}
  for r in rows:
    if not _finite(r.get("test_accuracy")) or r.get("epsilon") is None:
      continue
    key = tuple(sorted((k, v) for k, v in r.items()
                       if k.startswith("flag:") and k[5:] in PRIVACY_FLAGS))
    groups.setdefault(r["method"], {}).setdefault(key, []).append(r)
  out = {}
  for method, points in sorted(groups.items()):
    line = []
    for members in points.values():
      eps = np.array([float(m["epsilon"]) for m in members])
      acc = np.array([float(m["test_accuracy"]) for m in members])
      inf = bool(np.isinf(eps).any())
      line.append((math.inf if inf else float(eps.mean()),
                   0.0 if inf else float(eps.std()),
                   float(acc.mean()), float(acc.std()), len(members)))
    out[method] = sorted(line)
  return out


def fixed_settings(rows: Sequence[dict]) -> Dict[str, object]:
  """The trainer settings every run shares (from each run's results.json
  config), without the seed, the grid flags and the workdir."""
  configs = []
  for r in rows:
    try:
      with open(os.path.join(r["workdir"], RESULTS)) as f:
        configs.append(json.load(f).get("config") or {})
    except (OSError, KeyError, ValueError):
      continue
  if not configs:
    return {}
  grid = {k[5:] for r in rows for k in r if k.startswith("flag:")}
  out = {}
  for key, value in configs[0].items():
    if key in grid or key in ("seed", "prune") or isinstance(value, dict):
      continue
    if all(c.get(key) == value for c in configs):
      out[key] = value
  return out


def _subtitle(settings: Dict[str, object]) -> str:
  """`dataset · model · δ`, then the other fixed flags that are set."""
  head = [str(settings.get(k)) for k in ("dataset", "model")
          if settings.get(k) is not None]
  if settings.get("delta") is not None:
    head.append(f"δ = {settings['delta']:g}")
  rest = [f"{k}={v}" for k, v in sorted(settings.items())
          if k not in ("dataset", "model", "delta") and v not in (None, False)
          and not k.startswith(("data_dir", "init_checkpoint"))]
  lines, line = [" · ".join(head)], []
  for item in rest:
    if len(" ".join(line + [item])) > 95:
      lines.append(" ".join(line))
      line = []
    line.append(item)
  if line:
    lines.append(" ".join(line))
  return "\n".join(l for l in lines if l)


def plot(rows: Sequence[dict], path: str) -> None:
  """Accuracy vs epsilon, one line per method, mean +- std over seeds.

  The title names the data set, model, delta and the flags every run shares;
  methods are dodged along epsilon so their error bars do not overlap. Saved
  as `path` (PNG) and the same name with `.svg`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5.2))
  lines = curves(rows)
  n = len(lines)
  log_x = False
  for i, (method, line) in enumerate(lines.items()):
    color = f"C{i % 10}"
    finite = [p for p in line if math.isfinite(p[0])]
    if finite:
      eps, eps_std, acc, acc_std, _ = zip(*finite)
      log_x |= min(eps) > 0 and max(eps) / min(eps) >= 8
      dodge = 1.0 + 0.025 * (i - (n - 1) / 2)  # multiplicative: log or not
      ax.errorbar([e * dodge for e in eps], acc, yerr=acc_std,
                  xerr=eps_std if any(eps_std) else None, marker="o",
                  capsize=3, color=color, label=method)
    for _, _, acc, _, _ in (p for p in line if not math.isfinite(p[0])):
      ax.axhline(acc, color=color, linestyle="--",
                 label=f"{method} (ε = ∞)")
  if log_x:
    ax.set_xscale("log")
  seeds = sorted({r["seed"] for r in rows})
  ax.set_xlabel("ε")
  ax.set_ylabel("test accuracy")
  settings = fixed_settings(rows)
  ax.set_title(f"Privacy-utility trade-off ({len(rows)} runs, mean ± std "
               f"over {len(seeds)} seed(s))\n{_subtitle(settings)}",
               fontsize="medium")
  ax.grid(alpha=0.3)
  if lines:
    ax.legend(fontsize="small")
  else:
    ax.text(0.5, 0.5, "no finished runs", ha="center", va="center",
            transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  fig.savefig(os.path.splitext(path)[0] + ".svg")
  plt.close(fig)


# -- entry point --------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.base_flagfile or not os.path.isfile(FLAGS.base_flagfile):
    raise app.UsageError(f"--base_flagfile={FLAGS.base_flagfile!r}: no such "
                         "file")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  try:
    runs = expand_grid(FLAGS.grid, parse_seeds(FLAGS.seeds))
    launcher = Launcher(FLAGS.max_parallel)
    extra = shlex.split(FLAGS.extra_flags)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  jobs = []
  for run in runs:
    workdir = os.path.join(FLAGS.out, run.name)
    jobs.append((run, Job(run.name, tuple(command(
        run, FLAGS.base_flagfile, extra, workdir)), workdir)))

  if FLAGS.dry_run:
    for _, job in jobs:
      prefix = "# finished: " if is_finished(job.workdir) else ""
      print(prefix + shlex.join(job.argv))
    return
  try:
    for _, job in jobs:
      check_recorded(job.workdir, job.argv)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  todo = [(run, job) for run, job in jobs if not is_finished(job.workdir)]
  skipped = len(jobs) - len(todo)
  print(f"{len(jobs)} runs: {skipped} already finished (skipped), "
        f"{len(todo)} to run, at most {launcher.max_parallel} at once",
        flush=True)
  for run, job in todo:
    write_meta(run, job.workdir, job.argv)

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGTERM, launcher.stop)
  signal.signal(signal.SIGINT, launcher.stop)
  unfinished = []
  with tqdm(total=len(jobs), initial=skipped, desc="sweep", unit="run",
            dynamic_ncols=True) as bar:
    def on_done(job, code):
      status = describe(code, job.workdir)
      if status != "finished":
        unfinished.append(job.name)
      if code is None:  # never started (interrupted): not progress
        return
      if status != "finished":
        bar.write(f"{job.name}: {status} [{job.workdir}/{LOG}]")
      bar.update(1)
      bar.set_postfix(unfinished=len(unfinished), refresh=False)
    launcher.run([job for _, job in todo], on_done)

  rows = collect_results(FLAGS.out)
  write_csv(rows, os.path.join(FLAGS.out, "results.csv"))
  plot(rows, os.path.join(FLAGS.out, "privacy_utility.png"))
  print(f"{len(rows)} results -> {os.path.join(FLAGS.out, 'results.csv')}, "
        f"{os.path.join(FLAGS.out, 'privacy_utility.png')}")
  if launcher.stopping:
    print(f"interrupted by signal {launcher.signum}: {len(unfinished)} runs "
          "unfinished; rerun the same command to resume")
    sys.exit(128 + launcher.signum)
  if unfinished:
    print(f"{len(unfinished)} runs unfinished; rerun the same command to "
          f"retry or resume: {', '.join(unfinished)}")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
