"""Heterogeneous hospitals: clustered and personalised FL vs FedAvg, judged per client.

Runs every method on four federations, for several seeds, and writes the table and plots of
``docs/heterogeneity.md``:
  * RetinaMNIST and BreastMNIST over clinics in 4 planted clusters (label mix + acquisition shift:
    ``configs/retinamnist_clustered.py``, ``configs/breastmnist_clustered.py``),
  * Fed-Heart-Disease, 4 natural hospitals (``configs/heart_disease_personalized.py``),
  * Synthetic(1, 1) with 4 planted clusters (``configs/synthetic_clustered.py``).
Every client is scored with its own model (its cluster's, its personal one, or the global one for
FedAvg) on its own test split: pooled accuracy, mean and worst-10% client accuracy, ARI.

  nice -n 19 python experiments/heterogeneity.py                 # full grid, ~15-20 min on 2 cores
  python experiments/heterogeneity.py --datasets=synthetic --methods=fedavg,ifca --seeds=0
  python experiments/heterogeneity.py --report_only               # docs tables/plots from the JSON only

Raw outputs (one summary JSON per run) go to ``results/heterogeneity/``; finished runs are skipped
on a rerun, so an interrupted grid resumes. The full grid also writes the small committed
``docs/results/heterogeneity.json`` (every run's metrics, per seed), from which the tables and the
findings of docs/heterogeneity.md and the README summary are generated (``experiments/report.py``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import grid, report  # noqa: E402

RESULTS = os.path.join(ROOT, "docs", "results", "heterogeneity.json")
DATASETS = {
    "retinamnist": "retinamnist_clustered.py",
    "breastmnist": "breastmnist_clustered.py",
    "heart_disease": "heart_disease_personalized.py",
    "synthetic": "synthetic_clustered.py",
}
CLUSTERED = ("multicenter", "ifca", "cfl")
PERSONALIZED = ("fedper", "lg_fedavg", "apfl", "ditto", "interpolation", "finetune")
REFERENCES = ("fedavg", "local_only")
METHODS = REFERENCES + CLUSTERED + PERSONALIZED
METRICS = ("accuracy", "mean_client_accuracy", "worst10_client_accuracy", "ari")


def load_config(dataset: str, method: str, seed: int):
  return grid.load_config(DATASETS[dataset], method, seed)


def run_one(task) -> dict:
  """Runs one (dataset, method, seed); returns and writes its final metrics (cached across reruns)."""
  dataset, method, seed, out_dir = task
  row, cached = grid.run_cell(DATASETS[dataset], dataset, method, seed, out_dir,
                              lambda final: {k: v for k, v in final.items() if isinstance(v, (int, float, list))})
  if not cached:
    print(f"{dataset:>14} {method:>13} seed {seed}: acc={row['accuracy']:.3f} "
          f"mean_client={row['mean_client_accuracy']:.3f} worst10={row['worst10_client_accuracy']:.3f}"
          + (f" ari={row['ari']:.2f}" if "ari" in row else "") + f" ({row['wall_s']:.1f}s)", flush=True)
  return row


def collect(rows: list[dict]) -> dict:
  """Returns {(dataset, method): {metric: (mean, sd, n)}} over seeds, with paired gains over FedAvg.

  ``gain_mean`` / ``gain_worst10``: per seed, the method's mean (worst-10%) client accuracy minus
  FedAvg's on the same data split and initialisation, then mean and sd over seeds.
  """
  import numpy as np
  by_key = {(r["dataset"], r["method"], r["seed"]): r for r in rows}
  out = {}
  for key in sorted({(r["dataset"], r["method"]) for r in rows}):
    rs = [r for r in rows if (r["dataset"], r["method"]) == key]
    out[key] = {}
    stats = {m: [r[m] for r in rs if m in r] for m in METRICS}
    for gain, metric in (("gain_mean", "mean_client_accuracy"), ("gain_worst10", "worst10_client_accuracy")):
      ref = [by_key.get((key[0], "fedavg", r["seed"])) for r in rs]
      stats[gain] = [r[metric] - f[metric] for r, f in zip(rs, ref) if f is not None]
    for m, vals in stats.items():
      if vals:
        out[key][m] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals))
  return out


def _fmt(stat) -> str:
  return "-" if stat is None else f"{100 * stat[0]:.1f} ± {100 * stat[1]:.1f}"


def _gain(stat) -> str:
  return "-" if stat is None else f"{100 * stat[0]:+.1f} ± {100 * stat[1]:.1f}"


def markdown_tables(stats: dict, datasets, methods) -> str:
  lines = []
  for ds in datasets:
    rows = [m for m in methods if (ds, m) in stats]
    if not rows:
      continue
    seeds = max(stats[(ds, m)]["accuracy"][2] for m in rows)
    lines += [f"### {ds} ({seeds} seeds; %, mean ± sd over seeds; gains paired by seed)", "",
              "| method | kind | mean client acc | gain vs FedAvg | worst-10% client acc | gain vs FedAvg "
              "| pooled acc | ARI |",
              "|---|---|---|---|---|---|---|---|"]
    best_mean = max(stats[(ds, m)]["mean_client_accuracy"][0] for m in rows)
    best_worst = max(stats[(ds, m)]["worst10_client_accuracy"][0] for m in rows)
    for m in rows:
      s = stats[(ds, m)]
      kind = "reference" if m in REFERENCES else ("clustered" if m in CLUSTERED else "personalised")
      mean = _fmt(s["mean_client_accuracy"])
      worst = _fmt(s["worst10_client_accuracy"])
      mean = f"**{mean}**" if s["mean_client_accuracy"][0] == best_mean else mean
      worst = f"**{worst}**" if s["worst10_client_accuracy"][0] == best_worst else worst
      ari = "-" if "ari" not in s else f"{s['ari'][0]:.2f} ± {s['ari'][1]:.2f}"
      gm = "-" if m == "fedavg" else _gain(s.get("gain_mean"))
      gw = "-" if m == "fedavg" else _gain(s.get("gain_worst10"))
      lines.append(f"| {m} | {kind} | {mean} | {gm} | {worst} | {gw} | {_fmt(s['accuracy'])} | {ari} |")
    lines.append("")
  return "\n".join(lines)


def plot(stats: dict, datasets, methods, path: str) -> None:
  """Saves bars of each method's gain over FedAvg (paired by seed): mean and worst-10% client accuracy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch
  import numpy as np
  fig, axes = plt.subplots(1, len(datasets), figsize=(4.0 * len(datasets), 3.6))
  axes = np.atleast_1d(axes)
  colors = {m: ("tab:gray" if m in REFERENCES else "tab:blue" if m in CLUSTERED else "tab:orange") for m in methods}
  for ax, ds in zip(axes, datasets):
    ms = [m for m in methods if (ds, m) in stats and m != "fedavg" and "gain_mean" in stats[(ds, m)]]
    x = np.arange(len(ms))
    for offset, metric, hatch, alpha in ((-0.2, "gain_mean", None, 1.0), (0.2, "gain_worst10", "//", 0.5)):
      mu = [100 * stats[(ds, m)][metric][0] for m in ms]
      sd = [100 * stats[(ds, m)][metric][1] for m in ms]
      ax.bar(x + offset, mu, 0.4, yerr=sd, color=[colors[m] for m in ms], hatch=hatch, edgecolor="black",
             linewidth=0.4, capsize=2, alpha=alpha)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(ms, rotation=60, ha="right", fontsize=7)
    fed = stats.get((ds, "fedavg"), {})
    ref = (f"FedAvg {100 * fed['mean_client_accuracy'][0]:.1f} / {100 * fed['worst10_client_accuracy'][0]:.1f}"
           if fed else "")
    ax.set_title(f"{ds}\n{ref}", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("gain over FedAvg (accuracy points)")
  axes[-1].legend(handles=[Patch(facecolor="white", edgecolor="black", label="mean client acc"),
                           Patch(facecolor="white", edgecolor="black", hatch="//", label="worst-10% client acc"),
                           Patch(color="tab:blue", label="clustered"), Patch(color="tab:orange", label="personalised"),
                           Patch(color="tab:gray", label="local only")], fontsize=6, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_shifts(path: str, seed: int = 0) -> None:
  """Saves the same RetinaMNIST and BreastMNIST images under each cluster's acquisition shift."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from fedjax_health.data import medmnist, shifts
  specs = shifts.default_cluster_shifts(4)
  names = ["reference", "low contrast, bright", "blur + noise", "inverted"]
  fig, axes = plt.subplots(2, 4, figsize=(6.4, 3.4))
  for row, subset in enumerate(("retinamnist", "breastmnist")):
    x = medmnist.load_arrays(subset)["test"][0][:1]
    for k, spec in enumerate(specs):
      img = shifts.apply_shift(x, spec, np.random.default_rng(seed))[0]
      axes[row, k].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
      axes[row, k].set_xticks([])
      axes[row, k].set_yticks([])
      if row == 0:
        axes[row, k].set_title(f"cluster {k}: {names[k]}", fontsize=7)
    axes[row, 0].set_ylabel(subset, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The committed result file and the generated sections (json only: cheap to import).

LABELS = {"retinamnist": "RetinaMNIST, 4 planted clusters", "breastmnist": "BreastMNIST, 4 planted clusters",
          "heart_disease": "Fed-Heart-Disease, 4 natural hospitals", "synthetic": "Synthetic(1, 1), 4 planted clusters"}
SECTIONS = ("heterogeneity_tables", "heterogeneity_findings", "heterogeneity_summary", "heterogeneity_runtime")


def _missing_summary(missing: list[str]) -> str:
  """'dataset/method/seedk' ids -> 'dataset: method (seeds 1, 2), ...; ...'."""
  by: dict = {}
  for cell in missing:
    d, m, seed = cell.split("/")
    by.setdefault(d, {}).setdefault(m, []).append(seed[4:])
  return "; ".join(f"{d}: " + ", ".join(f"{m} (seeds {', '.join(s)})" for m, s in ms.items()) for d, ms in by.items())


def write_results(rows: list[dict], meta: dict, path: str = RESULTS) -> None:
  """Writes every run's scalar metrics (per seed) with ``meta`` to the small committed JSON."""
  keep = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows]
  keep.sort(key=lambda r: (list(DATASETS).index(r["dataset"]), list(METHODS).index(r["method"]), r["seed"]))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report.rounded(dict(meta, rows=keep), 5), f, indent=0)
    f.write("\n")


def _load(path: str = RESULTS) -> tuple[dict, dict]:
  with open(path) as f:
    doc = json.load(f)
  return doc, collect(doc["rows"])


def _datasets(stats) -> list[str]:
  return [d for d in DATASETS if any((d, m) in stats for m in METHODS)]


def render_tables() -> str:
  doc, stats = _load()
  return markdown_tables(stats, _datasets(stats), METHODS).rstrip("\n")


def _pts(stat) -> str:
  return f"{100 * stat[0]:+.1f} ± {100 * stat[1]:.1f}"


def _best(stats, ds, metric):
  ms = [m for m in METHODS if (ds, m) in stats and metric in stats[(ds, m)]]
  return max(ms, key=lambda m: stats[(ds, m)][metric][0])


def findings(doc: dict, stats: dict) -> str:
  """One bullet per dataset; every figure and comparison computed from the per-seed rows."""
  out = []
  for ds in _datasets(stats):
    fed = stats.get((ds, "fedavg"))
    if fed is None:
      continue
    others = [m for m in CLUSTERED + PERSONALIZED if (ds, m) in stats and "gain_mean" in stats[(ds, m)]]
    both = [m for m in others if stats[(ds, m)]["gain_mean"][0] > 0 and stats[(ds, m)]["gain_worst10"][0] > 0]
    # "clear": the paired mean gain exceeds its sd over seeds
    clear = [m for m in others if stats[(ds, m)]["gain_mean"][0] > stats[(ds, m)]["gain_mean"][1]]
    bm, bw = _best(stats, ds, "mean_client_accuracy"), _best(stats, ds, "worst10_client_accuracy")
    n = fed["accuracy"][2]
    text = (f"**{LABELS[ds]}** ({n} seeds): {len(both)} of {len(others)} clustered / personalised methods beat "
            f"FedAvg on both mean and worst-10% client accuracy (paired gain > 0)"
            + (f": {', '.join(both)}" if both and len(both) < len(others) else "") + ". "
            + (f"Best mean: FedAvg itself ({100 * fed['mean_client_accuracy'][0]:.1f} %); " if bm == "fedavg" else
               f"Best mean: {bm} {100 * stats[(ds, bm)]['mean_client_accuracy'][0]:.1f} % vs FedAvg "
               f"{100 * fed['mean_client_accuracy'][0]:.1f} % ({_pts(stats[(ds, bm)]['gain_mean'])} points, paired); ")
            + (f"best worst-10%: FedAvg itself ({100 * fed['worst10_client_accuracy'][0]:.1f} %). " if bw == "fedavg" else
               f"best worst-10%: {bw} {100 * stats[(ds, bw)]['worst10_client_accuracy'][0]:.1f} % vs "
               f"{100 * fed['worst10_client_accuracy'][0]:.1f} % ({_pts(stats[(ds, bw)]['gain_worst10'])}). ")
            + f"Mean gains larger than their seed sd: {', '.join(clear) or 'none'}.")
    if (ds, "local_only") in stats:
      text += f" Local-only training: {_pts(stats[(ds, 'local_only')]['gain_mean'])} points on the mean."
    aris = [(m, stats[(ds, m)]["ari"]) for m in CLUSTERED if (ds, m) in stats and "ari" in stats[(ds, m)]]
    if aris:
      exact = {m: sum(1 for r in doc["rows"] if r["dataset"] == ds and r["method"] == m and r.get("ari", 0) >= 0.999)
               for m, _ in aris}
      text += (" Cluster recovery (ARI, mean over seeds; seeds with exact recovery): " +
               ", ".join(f"{m} {a[0]:.2f} ({exact[m]} of {a[2]})" for m, a in aris) + ".")
    worst_drop = min(others, key=lambda m: stats[(ds, m)]["gain_worst10"][0]) if others else None
    if worst_drop and stats[(ds, worst_drop)]["gain_worst10"][0] < 0:
      text += (f" Largest loss on the worst-10% clients: {worst_drop} "
               f"({_pts(stats[(ds, worst_drop)]['gain_worst10'])}).")
    out.append("* " + text)
  return "\n".join(out)


def render_findings() -> str:
  return findings(*_load())


def render_summary() -> str:
  doc, stats = _load()
  lines = ["| split | FedAvg mean / worst-10% | best mean | best worst-10% | cluster recovery (ARI) |",
           "|---|---|---|---|---|"]
  for ds in _datasets(stats):
    fed = stats.get((ds, "fedavg"))
    if fed is None:
      continue
    bm, bw = _best(stats, ds, "mean_client_accuracy"), _best(stats, ds, "worst10_client_accuracy")
    cell = lambda m, metric, gain: (f"{m} {100 * stats[(ds, m)][metric][0]:.1f}" +
                                    (f" ({_pts(stats[(ds, m)][gain])})" if m != "fedavg" else ""))
    aris = sorted(((stats[(ds, m)]["ari"][0], m) for m in CLUSTERED if (ds, m) in stats and "ari" in stats[(ds, m)]),
                  reverse=True)
    lines.append(f"| {LABELS[ds]} | {100 * fed['mean_client_accuracy'][0]:.1f} / "
                 f"{100 * fed['worst10_client_accuracy'][0]:.1f} | {cell(bm, 'mean_client_accuracy', 'gain_mean')} | "
                 f"{cell(bw, 'worst10_client_accuracy', 'gain_worst10')} | "
                 + (", ".join(f"{m} {a:.2f}" for a, m in aris) or "-") + " |")
  n = max(v["accuracy"][2] for v in stats.values())
  lines += ["", f"Per-client test accuracy (%), mean over up to {n} seeds; gains paired by seed, ± sd "
            f"(`{doc['command']}`, {doc['date']}, {doc['machine']})." + (f" {doc['note']}" if doc.get("note") else "")]
  return "\n".join(lines)


def render_runtime() -> str:
  doc, _ = _load()
  run_s = sum(r.get("wall_s", 0.0) for r in doc["rows"])
  wall = (f"took {doc['grid_wall_s']:.0f} s wall in its last invocation (finished runs are cached and reused; "
          if doc.get("grid_wall_s") else "took (")
  return (f"The committed grid ({len(doc['rows'])} runs, `{doc['command']}`) {wall}{run_s:.0f} s of run time, "
          f"{doc['workers']} worker process(es)) on {doc['machine']}, shared with other jobs; written "
          f"{doc['date']} (commit {doc['commit']}); raw per-run JSON in `results/heterogeneity/`."
          + (f" {doc['note']}" if doc.get("note") else ""))


report.register("heterogeneity_tables", render_tables, sources=(RESULTS,))
report.register("heterogeneity_findings", render_findings, sources=(RESULTS,))
report.register("heterogeneity_summary", render_summary, sources=(RESULTS,))
report.register("heterogeneity_runtime", render_runtime, sources=(RESULTS,))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--out", default=os.path.join(ROOT, "results", "heterogeneity"))
  parser.add_argument("--report_only", action="store_true")
  parser.add_argument("--cached_only", action="store_true",
                      help="run nothing: write docs/results/heterogeneity.json from the finished runs in --out, "
                           "recording which cells of the grid are missing (for a grid cut short)")
  parser.add_argument("--command", default="", help="with --cached_only: the command that ran the grid")
  parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "heterogeneity_client_accuracy.png"))
  args = parser.parse_args(argv)
  datasets = [d for d in args.datasets.split(",") if d]
  methods = [m for m in args.methods.split(",") if m]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  for d in datasets:
    if d not in DATASETS:
      raise ValueError(f"--datasets must be among {sorted(DATASETS)}, got {d!r}")
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"--methods must be among {list(METHODS)}, got {m!r}")
  tasks = [(d, m, s, args.out) for d in datasets for m in methods for s in seeds]
  t0 = time.time()
  if args.report_only:
    with open(RESULTS) as f:
      rows = [r for r in json.load(f)["rows"] if r["dataset"] in datasets and r["method"] in methods]
  elif args.cached_only:
    paths = [os.path.join(args.out, d, m, f"seed{s}.json") for d, m, s, _ in tasks]
    rows = [json.load(open(p)) for p in paths if os.path.exists(p)]
    missing = [f"{d}/{m}/seed{s}" for (d, m, s, _), p in zip(tasks, paths) if not os.path.exists(p)]
  elif args.workers > 1:
    with mp.get_context("spawn").Pool(args.workers) as pool:
      rows = pool.map(run_one, tasks, chunksize=1)
  else:
    rows = [run_one(t) for t in tasks]
  wall = time.time() - t0
  print(f"{len(rows)} runs in {wall:.0f}s")
  full = (set(datasets), set(methods)) == (set(DATASETS), set(METHODS))
  if args.cached_only and full:
    grid_s = sum(r.get("wall_s", 0.0) for r in rows)
    write_results(rows, report.provenance(
        args.command or "nice -n 19 python experiments/heterogeneity.py", seeds=seeds, workers=1,
        grid_wall_s=None, missing=missing,
        note=(f"Grid cut short: {len(missing)} of {len(tasks)} runs missing ({_missing_summary(missing)}); "
              f"the tables show the finished runs ({grid_s:.0f} s of run time)." if missing else "")))
    report.update_all(names=SECTIONS)
  elif not args.report_only and full:
    write_results(rows, report.provenance(
        "nice -n 19 python experiments/heterogeneity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        seeds=seeds, workers=args.workers, grid_wall_s=round(wall, 1)))
    report.update_all(names=SECTIONS)
  stats = collect(rows)
  table = markdown_tables(stats, datasets, methods)
  print(table)
  if args.report_only or args.cached_only:
    report.update_all(names=SECTIONS)
  else:
    with open(os.path.join(args.out, "table.md"), "w") as f:
      f.write(table)
  if args.plot:
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    plot(stats, datasets, methods, args.plot)
    plot_shifts(os.path.join(os.path.dirname(args.plot), "heterogeneity_shifts.png"))
  return stats


if __name__ == "__main__":
  # One XLA thread per worker process: the workers, not the threads, share the cores.
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  sys.path.insert(0, ROOT)
  main()
