"""Heterogeneous hospitals: clustered and personalised FL vs FedAvg, judged per client.

Runs every method on four federations, for several seeds, and writes the table and plots of
``docs/heterogeneity.md``:
  * RetinaMNIST and BreastMNIST over clinics in 4 planted clusters (label mix + acquisition shift:
    ``configs/retinamnist_clustered.py``, ``configs/breastmnist_clustered.py``),
  * Fed-Heart-Disease, 4 natural hospitals (``configs/heart_disease_personalized.py``),
  * Synthetic(1, 1) with 4 planted clusters (``configs/synthetic_clustered.py``).
Every client is scored with its own model (its cluster's, its personal one, or the global one for
FedAvg) on its own test split: pooled accuracy, mean and worst-10% client accuracy, ARI.

  nice -n 10 .venv/bin/python experiments/heterogeneity.py                 # full grid, ~15-20 min on 2 cores
  .venv/bin/python experiments/heterogeneity.py --datasets=synthetic --methods=fedavg,ifca --seeds=0
  .venv/bin/python experiments/heterogeneity.py --report_only               # tables/plots from results/

Raw outputs (one summary JSON per run) go to ``results/heterogeneity/``; finished runs are skipped
on a rerun, so an interrupted grid resumes.
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
from experiments import grid  # noqa: E402
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--out", default=os.path.join(ROOT, "results", "heterogeneity"))
  parser.add_argument("--report_only", action="store_true")
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
    rows = [json.load(open(os.path.join(args.out, d, m, f"seed{s}.json"))) for d, m, s, _ in tasks
            if os.path.exists(os.path.join(args.out, d, m, f"seed{s}.json"))]
  elif args.workers > 1:
    with mp.get_context("spawn").Pool(args.workers) as pool:
      rows = pool.map(run_one, tasks, chunksize=1)
  else:
    rows = [run_one(t) for t in tasks]
  print(f"{len(rows)} runs in {time.time() - t0:.0f}s")
  stats = collect(rows)
  table = markdown_tables(stats, datasets, methods)
  print(table)
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
