"""Skew sweep: FedAvg rounds on heavy-tailed client sizes, side by side with baselines in one process.

Each point is a population of ``cohort`` clients holding ``20 * cohort`` examples (784 features,
10 classes) split by ``partition.quantity_skew`` (lognormal sigma 0 = equal sizes, 0.5, 1, 1.5, and a
power law), a FedAvg round with every client in the cohort, MLP 784-200-10, batch 10, SGD. Timed in
the same process, median over ``--repeats`` rounds after warm-up (compile excluded, reported apart):

  centralised        the limit: the same example-gradients as plan-steps SGD steps of one model
  python_loop        a Python loop over clients, one jitted local_train per client on its own steps
  dense / lowrank    our round, step buckets (each client costs its own steps), dense or default path
  host_threads       the default path's round with its client map on one host thread per core
                     (``fedavg(host_threads=)``, ``config.host_threads``: ``alg.host_round_fn``)
  lowrank_no_gram    the default path without the input Gram table (its Gram matrices formed every round)
  lowrank_chunk_products  the default path forming the first layer's products per chunk of clients
                     over their padded slots, not once per round over the dataset's rows
  lowrank_step_by_step  the default path training its long clients dense step by step, not in
                     densified blocks (``fedavg(densify_steps=0)``)
  dense_padded       our round with the padded plan (``step_buckets="none"``: every client runs the
                     largest client's steps; the engine before step buckets)

Workloads: ``mlp`` (1 epoch), ``mlp25`` (5 epochs of 50 examples: 25 local steps per client) and
``cnn`` (FedJAX's EMNIST CNN, 28x28x1, 1 epoch). Achieved GFLOP/s (XLA's FLOP count of one training
example times the example-gradients of the round) is reported against the machine's measured f32
GEMM peak. The machine's load (``os.getloadavg``) is stored with every point: on a shared CPU
compare ratios, not times.

  python -m benchmarks.skew                   # the default sweep (~20 min idle 2-core CPU; hours under load)
  python -m benchmarks.skew --report_only     # rebuild docs/performance.md's table and the plot

Writes ``docs/perf_skew.json`` and ``docs/img/perf_skew.png``; the tables and verdicts in
``docs/performance.md`` and README.md are rendered from the JSON by ``experiments/perf_tables.py``
(``make report`` rebuilds them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.compare import matmul_peak_gflops
from benchmarks.throughput import (cpu_description, interleaved_times, make_centralised, make_engine_round,
                                   make_python_loop, skewed_dataset)
from fedjax_health import models
from fedjax_health.data.federated import BatchPlanSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = os.path.join(ROOT, "docs", "perf_skew.json")
PNG = os.path.join(ROOT, "docs", "img", "perf_skew.png")
# (workload, skew, cohort, baselines): the sweep that fits ~20 minutes on an idle 2-core CPU.
DEFAULT_POINTS = (  # most important first: the JSON is rewritten after every point
    ("mlp", "lognormal:1", 1000, "central,loop,lowrank,host_threads,lowrank_chunk_products,lowrank_no_gram,dense,"
                                 "dense_static,dense_padded"),
    ("mlp", "lognormal:0", 1000, "central,loop,lowrank,host_threads,lowrank_no_gram,dense,dense_padded"),
    ("mlp", "lognormal:1.5", 1000, "central,loop,lowrank,host_threads,lowrank_chunk_products,lowrank_no_gram,"
                                   "lowrank_step_by_step,dense,dense_static"),
    ("mlp", "power_law:1.5", 1000, "central,loop,lowrank,host_threads,lowrank_chunk_products,lowrank_no_gram,"
                                   "lowrank_step_by_step,dense,dense_static"),
    ("mlp", "lognormal:0.5", 1000, "central,loop,lowrank,host_threads,lowrank_chunk_products,dense"),
    ("mlp25", "lognormal:0", 1000, "central,lowrank,host_threads,lowrank_step_by_step,dense"),
    ("mlp", "lognormal:1", 10000, "central,lowrank,host_threads,dense"),
    ("mlp", "lognormal:1", 100, "central,loop,lowrank,host_threads,dense"),
    ("cnn", "lognormal:1", 100, "central,loop,dense,dense_static,dense_padded"),
)


def flops_per_example(model, example_x, example_y) -> float:
  """XLA's FLOP count of one SGD step on one example (forward + backward + update)."""
  params = model.init(jax.random.key(0))
  step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(
      lambda q: jnp.mean(model.example_losses(q, example_x[None], example_y[None])))(p)))
  cost = step.lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _interleaved_medians(fns: dict, repeats: int) -> dict:
  """Median seconds per function, timed round-robin (each repeat runs every function once), so a
  load change on a shared CPU hits every baseline alike (their ratios stay comparable)."""
  return {k: statistics.median(v) for k, v in interleaved_times(fns, repeats).items()}


HOST_THREADS = os.cpu_count() or 2  # "host_threads": one per core

ENGINES = {  # name: (fast_path, step_buckets, input Gram table, first layer's products once per round,
    #               fedavg(densify_steps=) (None: default), fedavg(host_threads=))
    "lowrank": ("auto", "pow2", True, None, None, 1),  # the default path: low-rank short buckets, long clients dense
    "host_threads": ("auto", "pow2", True, None, None, HOST_THREADS),  # the default path, client map on host threads
    "lowrank_chunk_products": ("auto", "pow2", True, False, None, 1),  # the default path, first layer per chunk
    "lowrank_no_gram": ("auto", "pow2", False, None, None, 1),  # the default path forming its Gram matrices every round
    "lowrank_step_by_step": ("auto", "pow2", True, None, 0, 1),  # the default path, long clients not in densified blocks
    "dense": ("off", "pow2", True, None, None, 1),  # every client dense, one at a time, exactly its own steps
    "dense_static": ("off", "pow2_static", True, None, None, 1),  # dense, padded to its power-of-two bucket
    "dense_padded": ("off", "none", True, None, None, 1),  # dense, padded to the largest client (the old engine)
}


def measure(workload: str, skew: str, cohort: int, which: str, repeats: int, peak: float) -> dict:
  kind, value = skew.split(":")
  value = float(value)
  epochs, mean = (5, 50) if workload == "mlp25" else (1, 20)
  if workload == "cnn":
    ds = skewed_dataset(cohort, kind, sigma=value, power=value, mean=mean, dim=(28, 28, 1))
    model = models.get_model("cnn", 10, (28, 28, 1))
    # Rolled loops like the MLP: the CNN's convolution gradients are canonical (models/conv.py), so
    # they run as fast inside XLA CPU loops as outside. Before that, unrolled steps and client map
    # (100 clients x 9 steps) did not compile in 17 min.
  else:
    ds = skewed_dataset(cohort, kind, sigma=value, power=value, mean=mean)
    model = models.get_model("mlp", 10, (784,), hidden=(200,))
  plan = BatchPlanSpec.create(ds.client_sizes, 10, num_epochs=epochs)
  sizes = ds.client_sizes
  steps = -(-sizes * epochs // 10)
  row = {"workload": workload, "skew": skew, "cohort": cohort, "examples": int(ds.num_examples),
         "largest_client": int(sizes.max()), "padded_steps": int(plan.num_steps),
         "real_steps": int(steps.sum()), "empty_clients": int((sizes == 0).sum()), "round_ms": {},
         "first_call_s": {}, "load_before": os.getloadavg()[0]}
  example_grads = int(sizes.sum()) * epochs
  flops = flops_per_example(model, jnp.asarray(ds.x[0]), jnp.asarray(ds.y[0])) * example_grads
  items = which.split(",")
  fns = {}
  if "central" in items:
    # the limit steps: the plan's steps of one client of mean size (2 for W1, 25 for 5 epochs of 50)
    fns["centralised"] = make_centralised(model, ds, max(1, -(-mean * epochs // 10)), epochs=epochs)
    jax.block_until_ready(fns["centralised"]())
  if "loop" in items:
    fns["python_loop"] = make_python_loop(model, ds, plan)
    jax.block_until_ready(fns["python_loop"]())
  for name, (fast_path, buckets, gram, products, densify, threads) in ENGINES.items():
    if name in items:
      p = dataclasses.replace(plan, step_buckets=buckets)
      fns[name], row["first_call_s"][name], path = make_engine_round(model, ds, p, 1, fast_path=fast_path,
                                                                     gram_table=gram, first_layer_products=products,
                                                                     densify_steps=densify, host_threads=threads)
      row.setdefault("paths", {})[name] = path
      if threads > 1:
        row["host_threads"] = threads
  medians = _interleaved_medians(fns, repeats)
  row["round_ms"] = {k: 1e3 * v for k, v in medians.items()}
  row["load_after"] = os.getloadavg()[0]
  row["gflops"] = {k: flops / (v * 1e-3) / 1e9 for k, v in row["round_ms"].items()}
  row["fraction_of_gemm_peak"] = {k: g / peak for k, g in row["gflops"].items()}
  return row


def plot(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pts = [r for r in report["points"] if r["workload"] == "mlp" and r["cohort"] == 1000]
  labels = [r["skew"].replace("lognormal:", "σ=").replace("power_law:", "power ") for r in pts]
  fig, ax = plt.subplots(figsize=(7, 3.6))
  names = (("lowrank", "engine, default path"), ("dense", "engine, dense, own steps"),
           ("dense_static", "engine, dense, pow2 buckets"), ("dense_padded", "engine, padded plan"),
           ("python_loop", "Python loop"))
  w = 0.8 / len(names)
  for i, (k, lab) in enumerate(names):
    vals = [r["round_ms"].get(k, np.nan) / r["round_ms"]["centralised"] for r in pts]
    ax.bar(np.arange(len(pts)) + (i - (len(names) - 1) / 2) * w, vals, w, label=lab)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.axhline(2.0, color="k", lw=0.8, ls="--")
  ax.set(xticks=np.arange(len(pts)), xticklabels=labels, yscale="log", ylabel="round time / centralised limit",
         title="1,000 clients, mean 20 examples, MLP 784-200-10 (one process per bar group)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_report(report: dict) -> None:
  """Plot, then regenerate the ``perf_skew*`` sections of docs/performance.md and README.md."""
  from experiments import report as report_lib
  os.makedirs(os.path.dirname(PNG), exist_ok=True)
  plot(report, PNG)
  report_lib.load_renderers()
  report_lib.update_all(names=["perf_skew", "perf_skew_verdict"])


BASELINES = ("central", "loop") + tuple(ENGINES)


def _parse_point(text: str) -> tuple[str, str, int, str]:
  """``workload/skew/cohort/baselines`` -> a point, or SystemExit naming what is wrong (before any measurement)."""
  parts = text.split("/")
  if len(parts) != 4:
    raise SystemExit(f"--points: {text!r} is not workload/skew/cohort/baselines")
  workload, skew, cohort, which = parts
  if workload not in ("mlp", "mlp25", "cnn"):
    raise SystemExit(f"--points: workload must be mlp, mlp25 or cnn, got {workload!r} in {text!r}")
  kind, _, value = skew.partition(":")
  try:
    float(value)
  except ValueError:
    value = None
  if kind not in ("lognormal", "power_law") or value is None:
    raise SystemExit(f"--points: skew must be lognormal:<sigma> or power_law:<a>, got {skew!r} in {text!r}")
  if not cohort.isdigit() or int(cohort) < 1:
    raise SystemExit(f"--points: cohort must be a positive integer, got {cohort!r} in {text!r}")
  unknown = [b for b in which.split(",") if b not in BASELINES]
  if unknown:
    raise SystemExit(f"--points: unknown baselines {unknown} in {text!r}; known: {', '.join(BASELINES)}")
  return workload, skew, int(cohort), which


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--points", default="", help="workload/skew/cohort/items;... (default: DEFAULT_POINTS)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--report_only", action="store_true", help="rebuild the table and plot from the JSON")
  ap.add_argument("--append", action="store_true",
                  help="keep the JSON's other points (a point measured again replaces its old row)")
  args = ap.parse_args()
  if args.report_only:
    with open(JSON) as f:
      write_report(json.load(f))
    return
  if args.repeats < 1:
    raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
  points = DEFAULT_POINTS if not args.points else tuple(_parse_point(p) for p in args.points.split(";"))
  peak = matmul_peak_gflops()
  report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {jax.default_backend()}",
            "cpu": cpu_description(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "jax": jax.__version__, "repeats": args.repeats,
            "gemm_peak_gflops": peak, "points": []}
  from experiments import report as report_lib
  prov = report_lib.provenance("python -m benchmarks.skew " + " ".join(sys.argv[1:]))
  report.update(commit=prov["commit"], command=prov["command"])
  if args.append and os.path.exists(JSON):
    # The run that measured the kept points stays the report's header; each new point records its own
    # run (commit, command, date, GEMM peak, repeats), rendered as a note under the table.
    with open(JSON) as f:
      old = json.load(f)
    again = {(w, s, c) for w, s, c, _ in points}
    run = {k: report[k] for k in ("commit", "command", "date", "gemm_peak_gflops", "repeats", "cpu")}
    report = dict(old, points=[r for r in old["points"] if (r["workload"], r["skew"], r["cohort"]) not in again])
  else:
    run = None
  for wl, skew, cohort, which in points:
    row = measure(wl, skew, cohort, which, args.repeats, peak)
    if run is not None:
      row["run"] = run
    report["points"].append(row)
    print(json.dumps(row), flush=True)
    loads = [r[k] for r in report["points"] for k in ("load_before", "load_after")]
    report["load_min"], report["load_max"] = min(loads), max(loads)
    with open(JSON, "w") as f:  # after every point: a sweep cut short keeps what it measured
      json.dump(report, f, indent=1)
    write_report(report)


if __name__ == "__main__":
  main()
