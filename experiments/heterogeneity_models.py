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
PUBLISHED = os.path.join(ROOT, "docs", "model_heterogeneity_published.json")
NAMES = {"heart_disease": "Fed-Heart-Disease", "breastmnist": "BreastMNIST", "retinamnist": "RetinaMNIST"}
COMM_TARGET = 0.01  # the target: beat local-only uploading <= 1% of FedAvg's bytes


def settings_of(dataset: str) -> dict:
  """Returns the settings of ``dataset``'s grid that the table's caption states (from its config)."""
  c = load_config(dataset, "fedproto", 0)
  return {"num_rounds": int(c.num_rounds), "local_steps": int(c.client.num_steps),
          "batch_size": int(c.client.batch_size), "model_groups": [dict(g) for g in c.hetero.model_groups],
          "feddf_steps": int(c.hetero.feddf_steps)}


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
    entries = {m: {k: [r[k] for r in rs if k in r] for k in KEEP[:5] + ("wall_s",)}}
    if m == "fedproto":
      entries["fedproto_nearest"] = {"mean_client_accuracy": [r["proto_mean_client_accuracy"] for r in rs],
                                     "worst10_client_accuracy": [r["proto_worst10_client_accuracy"] for r in rs],
                                     "bytes_up_per_client": [r["bytes_up_per_client"] for r in rs]}
    for name, stats in entries.items():
      key = "mean_client_accuracy" if name != "fedproto_nearest" else "proto_mean_client_accuracy"
      gains = [r[key] - by[(ds, "hetero_local", r["seed"])]["mean_client_accuracy"] for r in rs
               if (ds, "hetero_local", r["seed"]) in by]
      stats["gain_vs_local"] = gains
      stats["gain_vs_group_fedavg"] = [
          r[key] - by[(ds, "hetero_fedavg", r["seed"])]["mean_client_accuracy"] for r in rs
          if (ds, "hetero_fedavg", r["seed"]) in by and m != "hetero_fedavg"]
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
    counts = {v["mean_client_accuracy"][2] for v in s.values()}
    mixed = len(counts) > 1  # an interrupted grid: say how many seeds each row has
    seeds = (f"{max(counts)} seed" + ("s" if max(counts) > 1 else "")) if not mixed else f"{min(counts)}-{max(counts)} seeds, see the seeds column"
    lines += [f"### {NAMES.get(ds, ds)} ({seeds}; accuracy in %, mean ± sd over seeds; gain paired by seed)",
              "",
              "| method | mean client acc | gain vs local only | worst-10% client acc | bytes up / client / round "
              "| % of FedAvg's upload | wall s / run |" + (" seeds |" if mixed else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if mixed else "")]
    for name in ("hetero_local", "hetero_fedavg", "fedavg", "fedmd", "fd", "feddf", "fedproto", "fedproto_nearest"):
      if name not in s:
        continue
      e = s[name]
      pct = lambda st: f"{100 * st[0]:.1f} ± {100 * st[1]:.1f}"
      wall = lambda e: f"{e['wall_s'][0]:.0f}" if "wall_s" in e else "-"
      gain = "-" if name == "hetero_local" or "gain_vs_local" not in e else (
          f"{100 * e['gain_vs_local'][0]:+.1f} ± {100 * e['gain_vs_local'][1]:.1f}")
      up = e["bytes_up_per_client"][0]
      share = "-" if not fedavg_up else f"{100 * up / fedavg_up:.2f}%"
      lines.append(f"| {LABELS[name]} | {pct(e['mean_client_accuracy'])} | {gain} | "
                   f"{pct(e['worst10_client_accuracy'])} | {up:,.0f} | {share} | {wall(e)} |"
                   + (f" {e['mean_client_accuracy'][2]} |" if mixed else ""))
    if mixed or max(counts) < 3 or len(s) < len(LABELS):
      lines.append(f"\n*Incomplete grid: the rows above are the runs of seeds 0-2 that finished (seeds column / "
                   f"header); `python experiments/heterogeneity_models.py --datasets={ds}` completes it "
                   "(finished runs are skipped).*")
    lines.append("")
  return "\n".join(lines)


def _load(path=RESULTS) -> dict:
  with open(path) as f:
    return json.load(f)


def render_settings(results: dict) -> str:
  """One line per federation: the rounds, steps and models its rows were run with."""
  out = []
  for ds in DATASETS:
    st = results.get("settings", {}).get(ds)
    if ds not in results["stats"] or st is None:
      continue
    models = ", ".join(g["name"] + ("" if "features" not in g else " " + "-".join(map(str, g["features"])))
                       + ("" if "hidden" not in g else " " + "-".join(map(str, g["hidden"]))) for g in st["model_groups"])
    out.append(f"* {NAMES[ds]}: {st['num_rounds']} rounds of {st['local_steps']} local steps (batch "
               f"{st['batch_size']}); groups {models}; FedDF {st['feddf_steps']} distillation steps per group "
               "per round.")
  return "\n".join(out)


def targets(stats: dict) -> list[dict]:
  """Per federation: the methods that beat local-only at <= 1% of FedAvg's upload, and FedDF vs FedAvg within groups."""
  out = []
  for ds in DATASETS:
    if ds not in stats:
      continue
    s = stats[ds]
    if not {"fedavg", "feddf", "hetero_fedavg", "hetero_local"} <= set(s):
      continue  # the baselines the targets compare with are not run yet
    fedavg_up = s["fedavg"]["bytes_up_per_client"][0]
    cheap = []
    for name in ("fedmd", "fd", "fedproto", "fedproto_nearest"):
      e = s.get(name)
      if e is None or "gain_vs_local" not in e:
        continue
      share = e["bytes_up_per_client"][0] / fedavg_up
      if share <= COMM_TARGET and e["gain_vs_local"][0] > 0:
        cheap.append((name, e["gain_vs_local"], share))
    df, gf = s["feddf"], s["hetero_fedavg"]
    paired = df.get("gain_vs_group_fedavg")
    diff = paired if paired else [df["mean_client_accuracy"][0] - gf["mean_client_accuracy"][0], None, 0]
    out.append({"dataset": ds, "cheap_winners": cheap, "feddf_vs_group_fedavg": diff,
                "seeds": df["mean_client_accuracy"][2]})
  return out


def render_targets(results: dict) -> str:
  """The issue's two targets, per federation, in words generated from the committed stats."""
  lines = []
  for t in targets(results["stats"]):
    name = NAMES[t["dataset"]]
    if t["cheap_winners"]:
      wins = "; ".join(f"{LABELS[n]} {100 * g[0]:+.1f} ± {100 * g[1]:.1f} points at {100 * sh:.2f}% of FedAvg's upload"
                       + (", a mean gain within the spread over seeds" if g[0] <= g[1] else "")
                       for n, g, sh in t["cheap_winners"])
      first = f"beats local-only on mean client accuracy within 1% of FedAvg's upload: **yes** ({wins})"
    else:
      first = "beats local-only on mean client accuracy within 1% of FedAvg's upload: **no** method does"
    d = t["feddf_vs_group_fedavg"]
    how = (f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f} points, paired by seed" if d[1] is not None
           else f"{100 * d[0]:+.1f} points, difference of the means")
    verdict = "**yes**" if d[0] >= 0 else "**no**"
    lines.append(f"* {name} ({t['seeds']} seeds): {first}. FedDF matches or beats FedAvg within groups: {verdict} ({how}).")
  return "\n".join(lines)


def render_published(path=PUBLISHED) -> str:
  """The papers' headline claims with their settings, from the committed, source-checked JSON."""
  pub = _load(path)
  lines = [pub["note"], "", "| method | headline claim (as published) | figures | setting | checked in |",
           "|---|---|---|---|---|"]
  for m in pub["methods"]:
    figs = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in m["figures"].items()) or "none quoted"
    st = m["setting"]
    setting = f"{st['datasets']}; {st['architectures']}; {st['clients']}"
    lines.append(f"| {m['method']} ({m['paper']}) | {m['claim']} | {figs} | {setting} | {m['checked_in']}; "
                 f"{m['source']} |")
  return "\n".join(lines)


report.register("model_heterogeneity", lambda: markdown_tables(_load()["stats"]) + "\n" + render_settings(_load()),
                sources=(RESULTS,))
report.register("model_heterogeneity_targets", lambda: render_targets(_load()), sources=(RESULTS,))
report.register("model_heterogeneity_published", render_published, sources=(PUBLISHED,))


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
    # Keep the committed stats of the federations not rerun here (each run's raw JSON is not committed).
    stats, settings = {}, {}
    if os.path.exists(RESULTS):
      old = _load()
      stats = {d: v for d, v in old["stats"].items() if d not in datasets}
      settings = {d: v for d, v in old.get("settings", {}).items() if d not in datasets}
    stats.update(collect(rows))
    settings.update({d: settings_of(d) for d in datasets if d in stats})
    with open(RESULTS, "w") as f:
      json.dump({"command": "experiments/heterogeneity_models.py", "settings": settings, "stats": stats}, f, indent=1)
    report.load_renderers()
    report.update_all()  # the docs and README sections generated from the JSON
  table = markdown_tables(stats)
  print(table)
  if args.report_only:
    report.load_renderers()
    print("rewrote:", report.update_all() or "nothing (up to date)")
  return table


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  sys.path.insert(0, ROOT)
  main()
