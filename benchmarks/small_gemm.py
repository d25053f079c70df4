"""The dense path's floor: one SGD step's cost against its batch size, on this machine.

A client on the dense path trains its own copy of the weights, so every local step multiplies a
``[batch, 784]`` input by the ``784 x 200`` first layer, forms its ``784 x 200`` gradient and
rewrites the layer: three passes over 627 KB for 6.3 MFLOP at batch 10. The centralised limit
does the same FLOPs in batches of thousands. This benchmark times, per step, inside one compiled
``fori_loop`` over ``ROWS_PER_CALL / rows`` steps (as the engine runs them; every call reads 16,000
fresh examples):

  layer1    the first layer alone: ``z = x W``, ``W -= lr * x^T (g + c z)`` (forward, weight
            gradient, update; ``g`` stands for the backpropagated gradient)
  mlp_step  the whole local step of the engine (``client.local_train``: MLP 784-200-10, softmax
            cross-entropy, masked mean, optax SGD), on ``rows`` examples per step

for ``rows`` from 10 (the workloads' batch) to 2,560, against the machine's f32 GEMM peak measured
in the same process. All calls are timed round-robin (each repeat runs every one once), so a load
change on a shared CPU hits every row count alike. It explains the "dense, own steps" column of ``docs/performance.md``: per
example, a batch-10 step costs several times a large-batch one, whatever the round does around it.

  python -m benchmarks.small_gemm              # ~2 min on an idle 2-core CPU

Writes ``docs/perf_small_gemm.json``; the table in ``docs/performance.md`` is rendered from it
(``experiments/perf_tables.py``, ``make report``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.compare import matmul_peak_gflops
from fedjax_health import client as client_lib
from fedjax_health import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = os.path.join(ROOT, "docs", "perf_small_gemm.json")
ROWS_PER_CALL = 16_000
D_IN, D_HIDDEN, CLASSES = 784, 200, 10


def layer1_step(rows: int):
  """Returns (one call, its steps): the first layer's forward, weight gradient and update at ``rows`` rows."""
  steps = max(1, ROWS_PER_CALL // rows)
  k = jax.random.split(jax.random.key(0), 3)
  w = 0.01 * jax.random.normal(k[0], (D_IN, D_HIDDEN))
  xs = jax.random.normal(k[1], (steps, rows, D_IN))
  gs = 0.01 * jax.random.normal(k[2], (steps, rows, D_HIDDEN))

  def body(i, w):
    z = xs[i] @ w
    return w - 1e-3 * (xs[i].T @ (gs[i] + 1e-3 * z))

  run = jax.jit(lambda w: jax.lax.fori_loop(0, steps, body, w))
  return (lambda: run(w)), steps


def mlp_step(rows: int):
  """Returns (one call, its steps): ``client.local_train`` (MLP 784-200-10, SGD) on ``rows`` examples per step."""
  steps = max(1, ROWS_PER_CALL // rows)
  model = models.get_model("mlp", CLASSES, (D_IN,), hidden=(D_HIDDEN,))
  params = model.init(jax.random.key(0))
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), client_lib.sgd(0.1))
  k = jax.random.split(jax.random.key(1), 2)
  xs = jax.random.normal(k[0], (steps, rows, D_IN))
  ys = jax.random.randint(k[1], (steps, rows), 0, CLASSES)
  mask = jnp.ones((steps, rows), bool)
  run = jax.jit(lambda p: client_lib.local_train(trainer, p, xs, ys, mask, jax.random.key(2))[0])
  return (lambda: run(params)), steps


def flops_per_row(workload: str) -> float:
  """FLOPs per example: the first layer's forward and weight gradient (``4 * 784 * 200``), or XLA's
  count for one example's MLP step (``benchmarks.skew``'s, so the GFLOP/s compare with its table)."""
  if workload == "layer1":
    return 2 * 2 * D_IN * D_HIDDEN
  from benchmarks.skew import flops_per_example
  model = models.get_model("mlp", CLASSES, (D_IN,), hidden=(D_HIDDEN,))
  return flops_per_example(model, jnp.zeros((D_IN,)), jnp.zeros((), jnp.int32))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", default="10,20,40,80,160,640,2560")
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--out", default=JSON)
  args = ap.parse_args()
  try:
    rows_list = [int(r) for r in args.rows.split(",")]
  except ValueError:
    rows_list = []
  if not rows_list or any(r < 1 for r in rows_list):
    raise SystemExit(f"--rows must be a comma-separated list of positive integers, got {args.rows!r}")
  if args.repeats < 1:
    raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
  from experiments import report as report_lib
  peak = matmul_peak_gflops()
  load_before = os.getloadavg()[0]
  flops = {w: flops_per_row(w) for w in ("layer1", "mlp_step")}
  calls = {}
  for rows in rows_list:
    for workload, make in (("layer1", layer1_step), ("mlp_step", mlp_step)):
      fn, steps = make(rows)
      jax.block_until_ready(fn())  # compile and warm up
      calls[(workload, rows)] = (fn, steps)
  times = {key: [] for key in calls}
  for _ in range(args.repeats):
    for key, (fn, _) in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[key].append(time.perf_counter() - t)
  points = []
  for (workload, rows), (_, steps) in calls.items():
    s = statistics.median(times[(workload, rows)]) / steps
    gflops = flops[workload] * rows / s / 1e9
    points.append({"workload": workload, "rows": rows, "steps_per_call": steps, "us_per_step": s * 1e6,
                   "us_per_10_rows": s * 1e6 * 10 / rows, "gflops": gflops, "fraction_of_peak": gflops / peak})
    print(points[-1], flush=True)
  doc = {"provenance": report_lib.provenance("python -m benchmarks.small_gemm " + " ".join(sys.argv[1:]),
                                             load_before=load_before, load_after=os.getloadavg()[0]),
         "gemm_peak_gflops": peak, "rows_per_call": ROWS_PER_CALL, "repeats": args.repeats,
         "points": report_lib.rounded(points)}
  report_lib.write_json(args.out, doc)
  if os.path.abspath(args.out) == JSON:
    report_lib.load_renderers()
    report_lib.update_all(names=["perf_small_gemm"])


if __name__ == "__main__":
  main()
