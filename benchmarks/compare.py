"""Side-by-side benchmark: our compiled round vs the centralised limit, a Python loop, FedJAX, Flower.

Workloads (benchmarks/baselines/workloads.py, identical random data in every venv):
  W1   1000 clients x 20 examples, batch 10, 1 epoch, MLP 784-200-10
  CNN  20 clients x 50 examples (5 local steps of batch 10), FedJAX's EMNIST CNN on 28x28x1
Baselines run in their own venvs, created on demand by benchmarks/setup_baselines.sh:
FedJAX 0.0.17 (jax 0.4.30, dm-haiku 0.0.13) and Flower (flwr[simulation], Ray). Also measured in
the same run: the machine's matmul peak (GFLOP/s, 2048^2 f32 GEMM) and memory-copy peak (GB/s), to
report achieved GFLOP/s and estimated GB/s of our round against them.

  bash benchmarks/setup_baselines.sh          # once (~3 min, ~2 GB)
  python -m benchmarks.compare [--skip-flower] [--out benchmarks/out]

Writes compare.json, compare.png and prints a markdown table of round times and ratios. Never run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess

import jax
import jax.numpy as jnp

from benchmarks.baselines.workloads import WORKLOADS, make_data
from benchmarks.throughput import bench_centralised, bench_engine, bench_python_loop, median_time
from fedjax_health import models
from fedjax_health.data.federated import BatchPlanSpec, FederatedDataset

HERE = os.path.dirname(os.path.abspath(__file__))


def matmul_peak_gflops(n: int = 2048) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return 2 * n ** 3 / median_time(lambda: f(a), 5) / 1e9


def memcopy_peak_gbs(mb: int = 256) -> float:
  x = jnp.ones((mb * 2 ** 20 // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  return 2 * x.nbytes / median_time(lambda: f(x), 5) / 1e9  # read + write


def round_cost(model, params, ds, plan):
  """Returns (FLOPs, model bytes) of one round: XLA's count for one local step times the steps."""
  b = plan.batch_size
  x, y = jnp.asarray(ds.x[:b]), jnp.asarray(ds.y[:b])
  step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.1 * g, p,
                                        jax.grad(lambda q: jnp.mean(model.example_losses(q, x, y)))(p)))
  cost = step.lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  steps = ds.num_clients * plan.num_steps
  param_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
  # per local step each client reads its weights twice (forward, backward) and writes them once
  return cost["flops"] * steps, 3 * param_bytes * steps


def run_baseline(venv: str, script: str, workload: str, extra=()) -> dict | None:
  python = os.path.join(HERE, "venvs", venv, "bin", "python")
  if not os.path.exists(python):
    print(f"  ({venv} venv missing: run benchmarks/setup_baselines.sh)")
    return None
  out = subprocess.run([python, os.path.join(HERE, "baselines", script), "--workload", workload, *extra],
                       capture_output=True, text=True, timeout=3600)
  if out.returncode:
    print(f"  {venv} failed: {out.stderr[-800:]}")
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


LABELS = {"ours": "ours", "ours_dense_path": "ours, dense path", "centralised": "centralised limit",
          "python_loop": "Python loop", "fedjax": "FedJAX 0.0.17", "flower": "Flower"}


def plot(report: dict, path: str) -> None:
  """Writes a bar chart of round times (log scale), one panel per workload."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  wls = list(report["workloads"])
  fig, axes = plt.subplots(1, len(wls), figsize=(5.5 * len(wls), 3.2), squeeze=False)
  for ax, wl in zip(axes[0], wls):
    r = report["workloads"][wl]["round_s"]
    keys = [k for k in LABELS if k in r]
    ax.barh([LABELS[k] for k in keys], [r[k] * 1e3 for k in keys],
            color=["tab:orange" if k.startswith("ours") else "tab:gray" for k in keys])
    for i, k in enumerate(keys):
      ax.text(r[k] * 1e3, i, f" {r[k] * 1e3:,.0f} ms", va="center", fontsize=8)
    vals = [r[k] * 1e3 for k in keys]
    ax.set(xscale="log", xlabel="round time (ms, log)", title=f"{wl} ({report['machine']})",
           xlim=(min(vals) / 4, max(vals) * 4))
    ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workloads", default="w1,cnn")
  ap.add_argument("--width", type=int, default=1, help="our cohort-map width")
  ap.add_argument("--skip-flower", action="store_true")
  ap.add_argument("--skip-fedjax", action="store_true")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default="benchmarks/out")
  ap.add_argument("--tag", default="", help="suffix of the output json")
  ap.add_argument("--plot-only", default="", help="redraw the PNG from an existing compare JSON")
  args = ap.parse_args()
  if args.plot_only:
    with open(args.plot_only) as f:
      plot(json.load(f), args.plot_only.replace(".json", ".png"))
    return
  peaks = {"matmul_gflops": matmul_peak_gflops(), "memcopy_gbs": memcopy_peak_gbs()}
  print(f"machine peaks: matmul {peaks['matmul_gflops']:.1f} GFLOP/s, memory copy {peaks['memcopy_gbs']:.1f} GB/s")
  report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {jax.default_backend()}", "peaks": peaks,
            "workloads": {}}
  for wl in args.workloads.split(","):
    clients, per, shape, batch, epochs = WORKLOADS[wl]
    x, y, offsets = make_data(wl)
    ds = FederatedDataset({"x": x, "y": y}, offsets)
    model = (models.get_model("mlp", 10, shape, hidden=(200,)) if wl == "w1"
             else models.get_model("cnn", 10, shape, features=(32, 64), dense=128))
    plan = BatchPlanSpec.create(ds.client_sizes, batch, num_epochs=epochs)
    flops, model_bytes = round_cost(model, model.init(jax.random.key(0)), ds, plan)
    # Unrolled CNN steps: measured when XLA CPU ran our CNN's convolution gradients ~10x slower inside
    # loops (before models/conv.py); kept so that docs/perf_compare.json's figures stay reproducible.
    unroll = wl == "cnn"
    res = {"ours": bench_engine(model, ds, plan, args.width, args.repeats, unroll=unroll, fast_path="auto"),
           "ours_dense_path": bench_engine(model, ds, plan, args.width, args.repeats, unroll=unroll),
           "centralised": bench_centralised(model, ds, plan.num_steps, args.repeats, unroll=unroll),
           "python_loop": bench_python_loop(model, ds, plan, max(2, args.repeats // 2), unroll=unroll)}
    if not args.skip_fedjax:
      r = run_baseline("fedjax", "fedjax_round.py", wl)
      if r:
        res["fedjax"] = r["round_s"]
    if not args.skip_flower and wl == "w1":
      r = run_baseline("flower", "flower_round.py", wl)
      if r:
        res["flower"] = r["round_s"]
    row = {"round_s": res, "flops_per_round": flops, "model_bytes_per_round": model_bytes,
           # dense-equivalent work per second: the FLOPs of per-client dense SGD over our round time
           "ours_gflops": flops / res["ours"] / 1e9,
           "dense_path_gbs_est": model_bytes / res["ours_dense_path"] / 1e9}
    row["ratios"] = {k: v / res["ours"] for k, v in res.items()}
    report["workloads"][wl] = row
    print(f"\n{wl}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in res.items()))
    print(f"  ours: {row['ours_gflops']:.1f} dense-equivalent GFLOP/s ({row['ours_gflops'] / peaks['matmul_gflops']:.0%} "
          f"of matmul peak); dense path ~{row['dense_path_gbs_est']:.1f} GB/s of weight traffic "
          f"({row['dense_path_gbs_est'] / peaks['memcopy_gbs']:.0%} of copy peak)")
  lines = ["| workload | ours | ours, dense path | centralised limit | Python loop | FedJAX 0.0.17 | Flower | ours vs limit | loop / ours | FedJAX / ours | Flower / ours |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for wl, row in report["workloads"].items():
    r = row["round_s"]
    f = lambda k: f"{r[k] * 1e3:.0f} ms" if k in r else "-"
    q = lambda k: f"{r[k] / r['ours']:.1f}x" if k in r else "-"
    lines.append(f"| {wl} | {f('ours')} | {f('ours_dense_path')} | {f('centralised')} | {f('python_loop')} | {f('fedjax')} | {f('flower')} | "
                 f"{r['ours'] / r['centralised']:.2f}x | {q('python_loop')} | {q('fedjax')} | {q('flower')} |")
  table = "\n".join(lines)
  print("\n" + table)
  report["table"] = table
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"compare{args.tag}.json"), "w") as fjson:
    json.dump(report, fjson, indent=2)
  plot(report, os.path.join(args.out, f"compare{args.tag}.png"))


if __name__ == "__main__":
  main()
