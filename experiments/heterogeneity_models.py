"""Model heterogeneity: FedMD, FD, FedDF, FedProto vs local-only and FedAvg, judged per client.

Runs every method on three federations whose clients run different architectures, for several
seeds, and writes ``docs/model_heterogeneity_results.json`` (small, committed) and the table of
``docs/model_heterogeneity.md``:
  * Fed-Heart-Disease, Cleveland held out as the public set, 3 hospitals on logistic regression /
    MLP 13 / MLP 32-13 (``configs/heart_disease_hetero.py``),
  * BreastMNIST (6 clinics) and RetinaMNIST (9 clinics), Dirichlet(0.5) label skew, CNN / MLP 32 /
    MLP 128-32, MedMNIST's val split public (``configs/{breast,retina}mnist_hetero.py``).
Every client is scored with its own model on its own test split (mean and worst-10% client
accuracy); bytes up per client per round come from the closed forms logged by each run.
``fedavg`` is the homogeneous reference: every client runs ``config.model`` (the largest MLP for
Fed-Heart-Disease, the CNN for MedMNIST).

  nice -n 10 /work/venv/bin/python experiments/heterogeneity_models.py            # full grid
  /work/venv/bin/python experiments/heterogeneity_models.py --datasets=heart_disease --seeds=0
  /work/venv/bin/python experiments/heterogeneity_models.py --report_only          # table from the JSON

Raw outputs (one JSON per run) go to ``results/heterogeneity_models/``; finished runs are skipped.
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
DATASETS = {
    "heart_disease": "heart_disease_hetero.py",
    "breastmnist": "breastmnist_hetero.py",
    "retinamnist": "retinamnist_hetero.py",
}
BASELINES = ("hetero_local", "hetero_fedavg", "fedavg")
METHODS = BASELINES + ("fedmd", "fd", "feddf", "fedproto")
LABELS = {"hetero_local": "local only", "hetero_fedavg": "FedAvg within groups",
          "fedavg": "FedAvg, one shared architecture", "fedmd": "FedMD", "fd": "FD", "feddf": "FedDF",
          "fedproto": "FedProto (head)", "fedproto_nearest": "FedProto (nearest prototype)"}
KEEP = ("accuracy", "mean_client_accuracy", "worst10_client_accuracy", "bytes_up_per_client",
        "bytes_down_per_client", "proto_mean_client_accuracy", "proto_worst10_client_accuracy")
RESULTS = os.path.join(ROOT, "docs", "model_heterogeneity_results.json")


def load_config(dataset: str, method: str, seed: int):
  return grid.load_config(DATASETS[dataset], method, seed)


def run_one(task) -> dict:
  """Runs one (dataset, method, seed); returns and writes its final metrics (cached across reruns)."""
  dataset, method, seed, out_dir = task
  row, cached = grid.run_cell(DATASETS[dataset], dataset, method, seed, out_dir,
                              lambda final: {**{k: final[k] for k in KEEP if k in final},
                                             **{k: v for k, v in final.items()
                                                if k.startswith("g") and k.endswith("_mean_client_accuracy")}})
  if not cached:
    print(f"{dataset:>14} {method:>13} seed {seed}: mean_client={row['mean_client_accuracy']:.3f} "
          f"worst10={row['worst10_client_accuracy']:.3f} up={row['bytes_up_per_client']:.0f}B "
          f"({row['wall_s']:.1f}s)", flush=True)
  return row


def collect(rows: list[dict]) -> dict:
  """Returns {dataset: {method: {metric: [mean, sd, n]}}} over seeds, gains over local-only paired by seed."""
  import numpy as np
  by = {(r["dataset"], r["method"], r["seed"]): r for r in rows}
  out: dict = {}
  for ds, m in sorted({(r["dataset"], r["method"]) for r in rows}):
    rs = [r for r in rows if (r["dataset"], r["method"]) == (ds, m)]
    entries = {m: {k: [r[k] for r in rs if k in r] for k in KEEP[:5]}}
    if m == "fedproto":
      entries["fedproto_nearest"] = {"mean_client_accuracy": [r["proto_mean_client_accuracy"] for r in rs],
                                     "worst10_client_accuracy": [r["proto_worst10_client_accuracy"] for r in rs],
                                     "bytes_up_per_client": [r["bytes_up_per_client"] for r in rs]}
    for name, stats in entries.items():
      key = "mean_client_accuracy" if name != "fedproto_nearest" else "proto_mean_client_accuracy"
      gains = [r[key] - by[(ds, "hetero_local", r["seed"])]["mean_client_accuracy"] for r in rs
               if (ds, "hetero_local", r["seed"]) in by]
      stats["gain_vs_local"] = gains
      out.setdefault(ds, {})[name] = {
          k: [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)] for k, v in stats.items() if v}
  return out


def markdown_tables(stats: dict) -> str:
  lines = []
  for ds in DATASETS:
    if ds not in stats:
      continue
    s = stats[ds]
    fedavg_up = s.get("fedavg", {}).get("bytes_up_per_client", [None])[0]
    seeds = max(v["mean_client_accuracy"][2] for v in s.values())
    lines += [f"### {ds} ({seeds} seeds; accuracy in %, mean ± sd over seeds; gain paired by seed)", "",
              "| method | mean client acc | gain vs local only | worst-10% client acc | bytes up / client / round "
              "| % of FedAvg's upload |",
              "|---|---|---|---|---|---|"]
    for name in ("hetero_local", "hetero_fedavg", "fedavg", "fedmd", "fd", "feddf", "fedproto", "fedproto_nearest"):
      if name not in s:
        continue
      e = s[name]
      pct = lambda st: f"{100 * st[0]:.1f} ± {100 * st[1]:.1f}"
      gain = "-" if name == "hetero_local" or "gain_vs_local" not in e else (
          f"{100 * e['gain_vs_local'][0]:+.1f} ± {100 * e['gain_vs_local'][1]:.1f}")
      up = e["bytes_up_per_client"][0]
      share = "-" if not fedavg_up else f"{100 * up / fedavg_up:.2f}%"
      lines.append(f"| {LABELS[name]} | {pct(e['mean_client_accuracy'])} | {gain} | "
                   f"{pct(e['worst10_client_accuracy'])} | {up:,.0f} | {share} |")
    lines.append("")
  return "\n".join(lines)


def findings(stats: dict) -> str:
  """Bullets under the table, every figure and comparison computed from the committed stats."""
  out = []
  for ds in DATASETS:
    if ds not in stats:
      continue
    s = stats[ds]
    fedavg_up = s.get("fedavg", {}).get("bytes_up_per_client", [None])[0]
    rows = [n for n in ("hetero_fedavg", "fedavg", "fedmd", "fd", "feddf", "fedproto", "fedproto_nearest")
            if n in s and "gain_vs_local" in s[n]]
    gain = lambda n: s[n]["gain_vs_local"]
    clear = [n for n in rows if gain(n)[0] > gain(n)[1]]
    best = max(rows, key=lambda n: s[n]["mean_client_accuracy"][0])
    parts = [f"{LABELS[n]} {100 * gain(n)[0]:+.1f} ± {100 * gain(n)[1]:.1f}" +
             (f" at {100 * s[n]['bytes_up_per_client'][0] / fedavg_up:.2f}% of FedAvg's upload" if fedavg_up else "")
             for n in rows]
    out.append(f"* **{ds}**, mean client accuracy gain over local-only training (points, paired by seed): "
               + "; ".join(parts) + ".")
    out.append(f"* Highest mean client accuracy: {LABELS[best]} ({100 * s[best]['mean_client_accuracy'][0]:.1f} %). "
               f"Gains larger than their seed sd: {', '.join(LABELS[n] for n in clear) or 'none'}; for the others "
               f"the spread over seeds is at least as large as the gain.")
  return "\n".join(out)


def _stats() -> dict:
  with open(RESULTS) as f:
    return json.load(f)["stats"]


report.register("model_heterogeneity", lambda: markdown_tables(_stats()).rstrip("\n"), sources=(RESULTS,))
report.register("model_heterogeneity_findings", lambda: findings(_stats()), sources=(RESULTS,))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--out", default=os.path.join(ROOT, "results", "heterogeneity_models"))
  parser.add_argument("--report_only", action="store_true", help="rebuild the table from the committed JSON")
  args = parser.parse_args(argv)
  if args.report_only:
    with open(RESULTS) as f:
      stats = json.load(f)["stats"]
  else:
    datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    for d in datasets:
      if d not in DATASETS:
        raise ValueError(f"--datasets must be among {sorted(DATASETS)}, got {d!r}")
    for m in methods:
      if m not in METHODS:
        raise ValueError(f"--methods must be among {list(METHODS)}, got {m!r}")
    # Seed-major within a dataset, so an interrupted grid still has every method for the first seeds.
    tasks = [(d, m, int(s), args.out) for d in datasets for s in args.seeds.split(",") if s for m in methods]
    t0 = time.time()
    if args.workers > 1:
      with mp.get_context("spawn").Pool(args.workers) as pool:
        rows = pool.map(run_one, tasks, chunksize=1)
    else:
      rows = [run_one(t) for t in tasks]
    print(f"{len(rows)} runs in {time.time() - t0:.0f}s")
    # Merge with every finished run on disk, so partial reruns keep the rest of the table.
    rows = []
    for root, _, files in os.walk(args.out):
      rows += [json.load(open(os.path.join(root, f))) for f in files if f.startswith("seed")]
    rows = [r for r in rows if r["dataset"] in datasets]
    stats = collect(rows)
    with open(RESULTS, "w") as f:
      json.dump({"command": "experiments/heterogeneity_models.py", "stats": stats}, f, indent=1)
  table = markdown_tables(stats)
  report.update_all(names=("model_heterogeneity", "model_heterogeneity_findings"))
  print(table)
  return table


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  sys.path.insert(0, ROOT)
  main()
