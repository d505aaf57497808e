r"""Report of the Fashion-MNIST study (issue 10): tables and plots.

Reads the sweeps that `launch/study.sh` writes under one study directory and
writes, next to them, `report.md` (one table per sweep, mean +- std over
seeds) and two figures (PNG and SVG):

  privacy_utility   test accuracy vs epsilon, one line per directory under
                    `final/` (e.g. `final/dpsgd`, `final/best`), mean +- std
                    over seeds, with the published anchors drawn as points;
  sparsity          validation accuracy vs fraction of parameters updated per
                    step, one line per `screen_eps<E>/<mode>_<method>[_lr]`
                    sweep (`_lr`: twice the plain learning rate),
                    the dense run (`screen_eps<E>/plain`, constant schedule)
                    as a dashed line.

Layout read (every leaf is a `launch.sweep --out` directory):

  <study>/screen_eps<E>/<name>/   tuning seed, validation split
  <study>/final/<line>/<name>/    held-out seeds, test set

  python -m launch.study_report --study_dir=runs/study [--figures_dir=docs]
"""

import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags

from launch import sweep

FLAGS = flags.FLAGS
flags.DEFINE_string("study_dir", None, "Directory written by launch/study.sh.")
flags.DEFINE_string("figures_dir", None, "Where the figures go (default: the "
                    "study directory).")

# Published Fashion-MNIST results, (label, epsilon, test accuracy); delta 1e-5.
ANCHORS = (
    ("Tramèr & Boneh 2021, end-to-end tanh CNN", 3.0, 0.860),
    ("Tramèr & Boneh 2021, ScatterNet + linear", 3.0, 0.897),
    ("Papernot et al. 2021, tempered sigmoid (ε < 3)", 3.0, 0.861),
)
# Legend names of the final lines (directories under `final/`); others show
# their directory name.
LINE_LABELS = {
    "dpsgd": "tanh CNN, DP-SGD (dpsgd_eps*)",
    "scatternet": "ScatterNet + linear (best_eps*)",
    "select_random_80": "tanh CNN, select random 80 %, 2× lr",
    "select_magnitude_80": "tanh CNN, select magnitude 80 %, 2× lr",
}
# Result keys shown in the tables: (key, header, format).
COLUMNS = (
    ("validation_accuracy", "validation acc.", "pct"),
    ("test_accuracy", "test acc.", "pct"),
    ("test_accuracy_last_iterate", "test acc. (last iterate)", "pct"),
    ("epsilon", "ε", "f2"),
    ("noise_multiplier", "σ", "f3"),
    ("sparsity", "fraction frozen/unselected", "f3"),
    ("wall_time_s", "wall time (min)", "min"),
)


def _study_fields(results: dict) -> dict:
  """The fields the report adds to `sweep.collect_results` rows."""
  return {"target_epsilon": results["config"].get("target_epsilon"),
          "test_accuracy_last_iterate": results.get(
              "test_accuracy_last_iterate"),
          "validation_accuracy": results.get("validation_accuracy")}


def _sweeps(study_dir: str) -> Dict[str, List[dict]]:
  """{sweep directory: its rows} for every directory under `study_dir`
  holding finished sweep runs, sorted; each results.json is read once."""
  found: Dict[str, List[dict]] = {}
  for root, dirs, _ in os.walk(study_dir, followlinks=True):
    dirs.sort()
    if os.path.exists(os.path.join(root, sweep.META)):
      dirs[:] = []  # a run, not a sweep
      continue
    rows = sweep.collect_results(root, extra=_study_fields)
    if rows:
      found[root] = rows
      dirs[:] = []  # runs hold no sweeps
  return found


def sweep_dirs(study_dir: str) -> List[str]:
  """Every directory under `study_dir` holding finished sweep runs, sorted."""
  return list(_sweeps(study_dir))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  mean = statistics.fmean(values)
  return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _format(kind: str, values: Sequence[float]) -> str:
  values = [v for v in values if isinstance(v, (int, float))]
  if not values:
    return "–"
  if kind == "min":
    values = [v / 60 for v in values]
  mean, std = mean_std(values)
  if kind == "pct":
    text, spread = f"{100 * mean:.2f}", f"{100 * std:.2f}"
  else:
    digits = {"f2": 2, "f3": 3, "min": 1}[kind]
    text, spread = f"{mean:.{digits}f}", f"{std:.{digits}f}"
  return f"{text} ± {spread}" if len(values) > 1 else text


def groups(rows: Sequence[dict]) -> Dict[str, List[dict]]:
  """Rows grouped by their grid values (everything but the seed)."""
  out: Dict[str, List[dict]] = {}
  for r in rows:
    key = ", ".join(f"{k[5:]}={v}" for k, v in sorted(r.items())
                    if k.startswith("flag:")) or "(base flagfile)"
    out.setdefault(key, []).append(r)
  return out


def table(rows: Sequence[dict]) -> str:
  """A markdown table, one line per grid point, mean +- std over seeds."""
  shown = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
  head = ["setting", "seeds"] + [c[1] for c in shown]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for key, members in groups(rows).items():
    seeds = ",".join(str(m["seed"]) for m in sorted(members,
                                                      key=lambda m: m["seed"]))
    cells = [key, seeds] + [_format(kind, [m.get(name) for m in members])
                            for name, _, kind in shown]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def difference(a: Sequence[float], b: Sequence[float],
               confidence: float = 0.95) -> Tuple[float, float, float, float]:
  """mean(a) - mean(b), its Welch confidence interval (lo, hi) and the
  two-sided Welch t-test p-value; needs two values on each side."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if min(len(a), len(b)) < 2:
    raise ValueError(f"need >= 2 seeds per side, got {len(a)} and {len(b)}")
  test = stats.ttest_ind(a, b, equal_var=False)
  interval = test.confidence_interval(confidence)
  return (statistics.fmean(a) - statistics.fmean(b), float(interval.low),
          float(interval.high), float(test.pvalue))


def _by_eps(rows: Sequence[dict], key: str) -> Dict[float, List[float]]:
  """{target epsilon: [row[key], ...]} over rows that have both."""
  out: Dict[float, List[float]] = {}
  for r in rows:
    value, eps = r.get(key), r.get("target_epsilon")
    if isinstance(value, (int, float)) and eps is not None:
      out.setdefault(float(eps), []).append(float(value))
  return out


def comparisons(lines: Dict[str, List[dict]], baseline: str = "dpsgd") -> str:
  """Markdown: every other line's test accuracy minus `baseline`'s at each
  target epsilon where both have >= 2 seeds (Welch 95 % interval, p)."""
  if baseline not in lines:
    return ""
  b = _by_eps(lines[baseline], "test_accuracy")
  out = [f"| line | ε | line's accuracy | {baseline} | difference (points) "
         "| 95 % CI (Welch) | p (Welch t) |", "|---|---|---|---|---|---|---|"]
  for line, rows in lines.items():
    if line == baseline:
      continue
    a = _by_eps(rows, "test_accuracy")
    for eps in sorted(set(a) & set(b)):
      if min(len(a[eps]), len(b[eps])) < 2:
        continue
      d, lo, hi, p = difference(a[eps], b[eps])
      out.append(f"| {line} | {eps:g} | {_format('pct', a[eps])} "
                 f"(n={len(a[eps])}) | {_format('pct', b[eps])} "
                 f"(n={len(b[eps])}) | {100 * d:+.2f} | "
                 f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {p:.3f} |")
  return "\n".join(out) if len(out) > 2 else ""


def _line_points(rows: Sequence[dict], key: str
                 ) -> List[Tuple[float, float, float, int]]:
  """[(target epsilon, mean, std, n)] of `key` grouped by target epsilon."""
  return [(eps, *mean_std(v), len(v))
          for eps, v in sorted(_by_eps(rows, key).items())]


def collect(study_dir: str) -> Dict[str, List[dict]]:
  """{sweep path relative to `study_dir`: its rows (with targets)}."""
  return {os.path.relpath(d, study_dir): rows
          for d, rows in _sweeps(study_dir).items()}


def final_lines(sweeps: Dict[str, List[dict]]) -> Dict[str, List[dict]]:
  """{line name: rows} for `final/<line>/...` sweeps of `collect`."""
  out: Dict[str, List[dict]] = {}
  for path, rows in sorted(sweeps.items()):
    parts = path.split(os.sep)
    if len(parts) > 2 and parts[0] == "final":
      out.setdefault(parts[1], []).extend(rows)
  return out


def _figure():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _log_ticks(axis, ticks: Sequence[float]) -> None:
  """Log-scaled `axis` labelled at `ticks` only (plain numbers)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  axis.set_major_locator(ticker.FixedLocator(list(ticks)))
  axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
  axis.set_minor_formatter(ticker.NullFormatter())


def _save(plt, fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path + ".png", dpi=120)
  fig.savefig(path + ".svg")
  plt.close(fig)


def _span(counts: Sequence[int]) -> str:
  lo, hi = min(counts), max(counts)
  return str(lo) if lo == hi else f"{lo}–{hi}"


def plot_privacy_utility(lines: Dict[str, List[dict]], path: str) -> None:
  """Test accuracy vs epsilon per line (mean +- std) and the anchors."""
  plt = _figure()
  fig, ax = plt.subplots(figsize=(8, 5.2))
  n = len(lines)
  for i, (name, rows) in enumerate(lines.items()):
    points = _line_points(rows, "test_accuracy")
    if not points:
      continue
    eps, acc, std, counts = zip(*points)
    dodge = 1.0 + 0.02 * (i - (n - 1) / 2)
    ax.errorbar([e * dodge for e in eps], acc, yerr=std, marker="o",
                capsize=3, color=f"C{i}",
                label=f"{LINE_LABELS.get(name, name)} "
                f"(n = {_span(counts)} seeds)")
  for j, (label, eps, acc) in enumerate(ANCHORS):
    ax.scatter([eps], [acc], marker="*^s"[j % 3], s=90, color="black",
               zorder=5, facecolors="none" if j == 2 else None,
               label=f"{label}: {100 * acc:.1f} %")
  ax.set_xscale("log")
  _log_ticks(ax.xaxis, (0.5, 1, 2, 3, 4, 8))
  ax.set_xlabel("ε (δ = 1e-5)")
  ax.set_ylabel("test accuracy")
  ax.set_title("Fashion-MNIST: accuracy vs ε (mean ± std over "
               "held-out seeds)", fontsize="medium")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize="small", loc="lower right")
  _save(plt, fig, path)


def screen_lines(sweeps: Dict[str, List[dict]]
                 ) -> Dict[float, Dict[str, List[dict]]]:
  """{epsilon: {sweep name: rows}} for `screen_eps<E>/<name>` sweeps of
  `collect`."""
  out: Dict[float, Dict[str, List[dict]]] = {}
  for path, rows in sorted(sweeps.items()):
    parts = path.split(os.sep)
    if len(parts) == 2 and parts[0].startswith("screen_eps"):
      eps = float(parts[0][len("screen_eps"):])
      out.setdefault(eps, {})[parts[1]] = rows
  return out


def _label(name: str) -> str:
  """`select_random_lr` -> `select random (2x learning rate)`."""
  if name.endswith("_lr"):
    return name[:-3].replace("_", " ") + " (2× learning rate)"
  return name.replace("_", " ")


def plot_sparsity(screens: Dict[float, Dict[str, List[dict]]],
                  path: str) -> None:
  """Validation accuracy vs fraction updated, per epsilon and method."""
  plt = _figure()
  fig, axes = plt.subplots(1, max(1, len(screens)), figsize=(11, 4.6),
                           squeeze=False)
  for ax, (eps, sweeps) in zip(axes[0], sorted(screens.items())):
    i = 0
    for name, rows in sorted(sweeps.items()):
      if name == "plain":
        dense = [r for r in rows if r.get("flag:lr_schedule") in (None,
                                                                  "constant")]
        if dense:
          ax.axhline(mean_std([r["validation_accuracy"] for r in dense])[0],
                     color="black", linestyle="--", label="all parameters")
        continue
      if not name.startswith(("select_", "freeze_")):
        continue
      by_fraction: Dict[float, List[float]] = {}
      for r in rows:
        if r.get("validation_accuracy") is None:
          continue
        updated = round(1.0 - float(r["sparsity"]), 3)
        by_fraction.setdefault(updated, []).append(r["validation_accuracy"])
      if not by_fraction:
        continue
      xs = sorted(by_fraction)
      stats = [mean_std(by_fraction[x]) for x in xs]
      ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats],
                  marker="o", capsize=3, color=f"C{i}",
                  label=_label(name))
      i += 1
    ax.set_xscale("log")
    _log_ticks(ax.xaxis, (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1))
    ax.set_xlabel("fraction of parameters updated per step")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"ε = {eps:g}", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
  fig.suptitle("Fashion-MNIST, tanh CNN: pruning sparsity (tuning seed, "
               "validation split)", fontsize="medium")
  _save(plt, fig, path)


def report(study_dir: str, figures_dir: Optional[str] = None) -> str:
  """Writes report.md and the figures; returns the markdown."""
  figures_dir = figures_dir or study_dir
  os.makedirs(figures_dir, exist_ok=True)
  parts = ["# Study report", "",
           "Generated by `python -m launch.study_report` from the runs of "
           "`launch/study.sh`: one table per sweep, mean ± sample std over "
           "seeds (one value: one seed). Validation accuracy is on the "
           "split carved from the training set (tuning and screening); "
           "test accuracy is reported for every run but choices were made "
           "on validation only.", ""]
  sweeps = collect(study_dir)
  for path, rows in sweeps.items():
    parts += [f"## {path}", "", table(rows), ""]
  lines = final_lines(sweeps)
  compared = comparisons(lines)
  if compared:
    parts += ["## Each final line vs dpsgd (held-out seeds, test accuracy)",
              "", compared,
              ""]
  if lines:
    plot_privacy_utility(lines, os.path.join(figures_dir, "privacy_utility"))
  screens = screen_lines(sweeps)
  if screens:
    plot_sparsity(screens, os.path.join(figures_dir, "sparsity"))
  text = "\n".join(parts)
  with open(os.path.join(study_dir, "report.md"), "w") as f:
    f.write(text)
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.study_dir or not os.path.isdir(FLAGS.study_dir):
    raise app.UsageError(f"--study_dir={FLAGS.study_dir!r}: not a directory")
  report(FLAGS.study_dir, FLAGS.figures_dir)
  print(os.path.join(FLAGS.study_dir, "report.md"))


if __name__ == "__main__":
  app.run(main)
