"""Scale curve: FedAvg round time and peak memory for cohorts of 100 to 10,000 clients.

Workloads: W1 (20 examples of 784 features per client, batch 10, MLP 784-200-10; on the default
low-rank path, and as ``w1_dense`` on the dense per-client path) and Synthetic(1,1)
(Li et al.; 60 features, lognormal sizes capped at 200, batch 10, MLP 60-100-10). Each point runs in a
fresh process so its peak resident memory (``ru_maxrss``) is its own. Time should grow linearly with
the cohort and peak memory should be set by the chunk (``clients_per_step``) plus the data, not by the
cohort: FedAvg's mean is accumulated streaming, never as a ``[cohort, params]`` stack.

  python -m benchmarks.scale [--cohorts 100,1000,4000,10000] [--width 1] [--out benchmarks/out]

Writes ``scale.json`` and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(workload: str, cohort: int, width: int, repeats: int) -> dict:
  import resource
  import statistics
  import time

  import jax
  import numpy as np

  from benchmarks.throughput import w1_dataset
  from fedjax_health import client as client_lib
  from fedjax_health import models
  from fedjax_health.algorithms import fedavg as fa
  from fedjax_health.data import synthetic
  from fedjax_health.data.federated import BatchPlanSpec

  fast_path = "off" if workload.endswith("_dense") else "auto"
  if workload.startswith("w1"):
    ds = w1_dataset(cohort)
    model = models.get_model("mlp", 10, (784,), hidden=(200,))
  else:
    sizes = np.minimum(synthetic.client_sizes(cohort, np.random.default_rng(0)), 200)
    ds = synthetic.load(cohort, sizes=np.maximum(sizes, 3), seed=0).train
    model = models.get_model("mlp", 10, (60,), hidden=(100,))
  rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  plan = BatchPlanSpec.create(ds.client_sizes, 10, num_epochs=1)
  alg = fa.fedavg(model, num_clients=ds.num_clients, cohort_size=ds.num_clients, plan=plan,
                  client_opt=client_lib.sgd(0.05), clients_per_step=width, fast_path=fast_path)
  state = alg.init(model.init(jax.random.key(0)))
  train = fa.device_train_data(ds, alg.gram_rows)
  round_fn = jax.jit(alg.round_fn, donate_argnums=(0,))
  state, _ = round_fn(state, train, jax.random.key(1))
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, _ = round_fn(state, train, jax.random.key(1))
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"workload": workload, "cohort": cohort, "width": width, "path": alg.path, "examples": int(ds.num_examples),
          "round_s": statistics.median(times), "peak_rss_mb": peak_kb / 1024, "rss_after_data_mb": rss_data / 1024,
          "data_mb": sum(v.nbytes for v in ds.arrays.values()) / 2**20, "steps_per_client": plan.num_steps}


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for wl in sorted({r["workload"] for r in rows}):
    pts = sorted((r["cohort"], r["round_s"], r["peak_rss_mb"]) for r in rows if r["workload"] == wl)
    c, t, m = zip(*pts)
    axes[0].plot(c, t, marker="o", label=wl)
    axes[1].plot(c, m, marker="o", label=wl)
  axes[0].set(xlabel="clients in the round", ylabel="round time (s)", xscale="log", yscale="log",
              title="round time (linear = slope 1)")
  axes[1].set(xlabel="clients in the round", ylabel="peak RSS (MB)", xscale="log", title="peak memory")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cohorts", default="100,1000,4000,10000")
  ap.add_argument("--workloads", default="w1,w1_dense,synthetic",
                  help="w1 (default fast path: low-rank), w1_dense (fast_path off), synthetic")
  ap.add_argument("--width", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="benchmarks/out")
  ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: workload:cohort in this process
  args = ap.parse_args()
  if args.one:
    wl, cohort = args.one.split(":")
    print(json.dumps(measure(wl, int(cohort), args.width, args.repeats)))
    return
  rows = []
  for wl in args.workloads.split(","):
    for cohort in [int(c) for c in args.cohorts.split(",")]:
      out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--one", f"{wl}:{cohort}",
                            "--width", str(args.width), "--repeats", str(args.repeats)],
                           capture_output=True, text=True, check=True)
      row = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append(row)
      print(f"{wl:10s} [{row['path']}] cohort {cohort:6d}: round {row['round_s'] * 1e3:9.1f} ms, "
            f"{row['round_s'] / cohort * 1e6:7.1f} us/client, peak RSS {row['peak_rss_mb']:7.0f} MB "
            f"(data {row['data_mb']:.0f} MB)", flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "scale.json"), "w") as f:
    json.dump(rows, f, indent=2)
  plot(rows, os.path.join(args.out, "scale.png"))


if __name__ == "__main__":
  main()
