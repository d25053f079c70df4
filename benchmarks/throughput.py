"""Throughput of one FedAvg round on workload W1, side by side with baselines, in one process.

W1 (cross-device): 1000 clients x 20 examples, batch 10, 1 local epoch (2 steps), MLP 784-200-10,
plain SGD, FedAvg aggregation. Timed as the median of rounds after warm-up (compile excluded):

  engine[width=w]  our compiled round, cohort map of width w (1 = lax.map/scan ... 1000 = full vmap)
  python_loop      a Python loop over clients calling one jitted per-client local_train, then mean
  centralised      the limit: the same 20,000 examples as 2 SGD steps of batch 10,000, one model
  lowrank[w]       our compiled round on the exact low-rank path (lowrank.py), chunks of w clients
                   (0 = the automatic width); the default ("auto") path for this workload

  python -m benchmarks.throughput [--clients 1000] [--widths 1,8,32,128,1000] [--out benchmarks/out]

Writes ``throughput.json`` with round times (ms) and ratios to the centralised limit and to the
Python loop, and prints the width to use as the default cohort-map width on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_health import client as client_lib
from fedjax_health import models
from fedjax_health.algorithms import fedavg as fa
from fedjax_health.data.federated import BatchPlanSpec, FederatedDataset


def w1_dataset(num_clients: int, per_client: int = 20, dim: int = 784, num_classes: int = 10, seed: int = 0):
  rng = np.random.default_rng(seed)
  n = num_clients * per_client
  x = rng.random((n, dim), dtype=np.float32)
  y = rng.integers(0, num_classes, n).astype(np.int32)
  return FederatedDataset({"x": x, "y": y}, np.arange(0, n + 1, per_client))


def median_time(fn, repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def cpu_description() -> str:
  """The CPU's model name and widest x86 vector extension (from /proc/cpuinfo; "unknown CPU" elsewhere):
  ratios against the centralised limit moved with it (docs/performance.md)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return platform.processor() or "unknown CPU"
  model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
               platform.processor() or "unknown CPU")
  flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), ()))
  vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
  return f"{model}, {vector}" if vector else model


def interleaved_times(fns: dict, repeats: int) -> dict:
  """Seconds per call of each zero-argument function, ``repeats`` calls each, timed round-robin (each
  repeat runs every function once), so a load change on a shared CPU hits every variant alike."""
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t)
  return times


def skewed_dataset(num_clients: int, skew: str = "lognormal", sigma: float = 1.0, power: float = 1.5,
                   mean: int = 20, dim: int = 784, num_classes: int = 10, seed: int = 0):
  """W1-like data with heavy-tailed client sizes: ``num_clients * mean`` examples split by
  ``partition.quantity_skew`` (lognormal ``sigma`` or power law ``power``; ``sigma=0``: equal sizes)."""
  from fedjax_health.data import partition
  if skew == "lognormal" and sigma == 0:
    return w1_dataset(num_clients, mean, dim, num_classes, seed)
  rng = np.random.default_rng(seed)
  n = num_clients * mean
  _, offsets = partition.quantity_skew(n, num_clients, rng, kind=skew, sigma=sigma, power=power)
  shape = (dim,) if isinstance(dim, int) else tuple(dim)
  x = rng.random((n,) + shape, dtype=np.float32)
  y = rng.integers(0, num_classes, n).astype(np.int32)
  return FederatedDataset({"x": x, "y": y}, offsets)


def bench_engine(model, ds, plan, width, repeats, lr=0.1, unroll=1, fast_path="off", lowrank_width=None,
                 with_compile=False):
  """Median round time of our engine; ``fast_path`` "off" = dense per-client path, "auto"/"lowrank".

  The plan's ``step_buckets`` picks bucketed ("pow2", default) or padded ("none") client training.
  With ``with_compile`` returns (median round time, first call's time incl. compile, path).
  """
  step, first, path = make_engine_round(model, ds, plan, width, lr, unroll, fast_path, lowrank_width)
  t = median_time(step, repeats, warmup=0)
  return (t, first, path) if with_compile else t


def make_engine_round(model, ds, plan, width=1, lr=0.1, unroll=1, fast_path="off", lowrank_width=None,
                      gram_table=True, narrow_buckets=True, first_layer_products=None, cohort_size=None,
                      densify_steps=None, host_threads=1):
  """Returns (one round as a zero-argument function, first call's time incl. compile, path).

  ``gram_table``: give the round the precomputed input Gram table (``device_train_data(ds,
  alg.gram_rows)``, as simulations do); False forms the Gram matrices every round.
  ``cohort_size``: clients per round (default every client).
  ``first_layer_products``: passed to ``fedavg`` (None: its automatic choice; False: the first layer's
  products per chunk, as before the round-wide GEMMs).
  ``densify_steps``: passed to ``fedavg`` (0: long plain-SGD clients train dense step by step; None:
  the default blocks).
  ``narrow_buckets``: False builds the round without the low-rank path's narrow one-step buckets
  (``fedavg(narrow_divisors=())``): every one-step client pays the whole batch.
  ``host_threads``: n > 1 runs ``alg.host_round_fn`` (the client map as n executions on n host threads).
  """
  alg = fa.fedavg(model, num_clients=ds.num_clients, cohort_size=cohort_size or ds.num_clients, plan=plan,
                  client_opt=client_lib.sgd(lr), clients_per_step=width, unroll=unroll, map_unroll=unroll,
                  fast_path=fast_path, lowrank_width=lowrank_width, first_layer_products=first_layer_products,
                  densify_steps=densify_steps, narrow_divisors=None if narrow_buckets else (),
                  host_threads=host_threads)
  state = alg.init(model.init(jax.random.key(0)))
  train = fa.device_train_data(ds, alg.gram_rows if gram_table else 0)
  round_fn = alg.host_round_fn if host_threads > 1 else jax.jit(alg.round_fn)
  holder = {"state": state}

  def step():
    holder["state"], m = round_fn(holder["state"], train, jax.random.key(1))
    return holder["state"].params

  t0 = time.perf_counter()
  jax.block_until_ready(step())  # traces and compiles the round: later calls reuse it
  return step, time.perf_counter() - t0, alg.path


def bench_python_loop(model, ds, plan, repeats, lr=0.1, unroll=1):
  """A Python loop over clients, one jitted local_train per client on its own steps (ragged sizes ok)."""
  return median_time(make_python_loop(model, ds, plan, lr, unroll), repeats)


def make_python_loop(model, ds, plan, lr=0.1, unroll=1):
  """Returns one round of the Python loop over clients as a zero-argument function."""
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(lr), unroll=unroll)
  local = jax.jit(lambda p, x, y, m, k: client_lib.local_train(trainer, p, x, y, m, k)[0])
  params = model.init(jax.random.key(0))
  b = plan.batch_size
  epochs = plan.num_epochs or 1
  clients = []
  for c in range(ds.num_clients):
    arr = ds.client(c)
    n = len(arr["y"]) * epochs
    if n == 0:
      continue
    steps = -(-n // b)
    idx = np.resize(np.arange(len(arr["y"])), steps * b)
    mask = np.arange(steps * b) < n
    clients.append((jnp.asarray(arr["x"][idx].reshape((steps, b) + ds.x.shape[1:])),
                    jnp.asarray(arr["y"][idx].reshape(steps, b)), jnp.asarray(mask.reshape(steps, b))))
  keys = jax.random.split(jax.random.key(0), ds.num_clients)
  mean_fn = jax.jit(lambda p, acc, n: jax.tree.map(lambda a, d: a + d / n, p, acc))

  def step():
    acc = jax.tree.map(jnp.zeros_like, params)
    for c, (xs, ys, mask) in enumerate(clients):
      d = local(params, xs, ys, mask, keys[c])
      acc = jax.tree.map(jnp.add, acc, d)
    return mean_fn(params, acc, float(ds.num_clients))

  return step


def bench_centralised(model, ds, steps: int, repeats: int, lr=0.1, unroll=1, epochs: int = 1):
  """The limit: the same ``epochs * N`` example-gradients as ``steps`` SGD steps on one model."""
  return median_time(make_centralised(model, ds, steps, lr, unroll, epochs), repeats)


def make_centralised(model, ds, steps: int, lr=0.1, unroll=1, epochs: int = 1):
  """Returns the centralised limit's training as a zero-argument function (see ``bench_centralised``)."""
  params = model.init(jax.random.key(0))
  opt = optax.sgd(lr)
  n = epochs * ds.num_examples // steps * steps
  rows = np.resize(np.arange(ds.num_examples), n)
  x = jnp.asarray(ds.x[rows]).reshape((steps, -1) + ds.x.shape[1:])
  y = jnp.asarray(ds.y[rows]).reshape(steps, -1)

  @jax.jit
  def train(p):
    def body(carry, xy):
      p, s = carry
      g = jax.grad(lambda q: jnp.mean(model.example_losses(q, xy[0], xy[1])))(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), (x, y), unroll=unroll)
    return p

  return lambda: train(params)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--clients", type=int, default=1000)
  ap.add_argument("--widths", default="1,8,32,128,1000", help="dense-path cohort-map widths")
  ap.add_argument("--lowrank-widths", default="0,50,100,250,1000", help="low-rank chunk widths (0 = auto)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default="benchmarks/out")
  args = ap.parse_args()
  ds = w1_dataset(args.clients)
  model = models.get_model("mlp", 10, (784,), hidden=(200,))
  plan = BatchPlanSpec.create(ds.client_sizes, 10, num_epochs=1)
  results = {"workload": f"W1: {args.clients} clients x 20 examples, batch 10, 1 epoch, MLP 784-200-10",
             "machine": f"{platform.machine()} {os.cpu_count()} cores, backend={jax.default_backend()}",
             "jax": jax.__version__, "round_ms": {}}
  t_central = bench_centralised(model, ds, plan.num_steps, args.repeats)
  results["round_ms"]["centralised"] = 1e3 * t_central
  print(f"centralised limit: {1e3 * t_central:8.1f} ms", flush=True)
  t_loop = bench_python_loop(model, ds, plan, max(2, args.repeats // 2))
  results["round_ms"]["python_loop"] = 1e3 * t_loop
  print(f"python loop      : {1e3 * t_loop:8.1f} ms", flush=True)
  # Low-rank first: after the wide dense maps have allocated GBs, later runs in this process were
  # measured ~1.8x slower (allocator state), which no single-config launch sees.
  for w in [int(v) for v in args.lowrank_widths.split(",")]:
    t = bench_engine(model, ds, plan, 1, args.repeats, fast_path="lowrank", lowrank_width=w or None)
    results["round_ms"][f"lowrank_width_{w or 'auto'}"] = 1e3 * t
    print(f"lowrank width {w or 'auto':>4}: {1e3 * t:8.1f} ms  ({t / t_central:.2f}x limit, "
          f"{t_loop / t:.2f}x faster than loop)", flush=True)
  for w in [int(v) for v in args.widths.split(",")]:
    t = bench_engine(model, ds, plan, w, args.repeats)
    results["round_ms"][f"engine_width_{w}"] = 1e3 * t
    print(f"engine width {w:5d}: {1e3 * t:8.1f} ms  ({t / t_central:.2f}x limit, {t_loop / t:.2f}x faster than loop)",
          flush=True)
  engine = {k: v for k, v in results["round_ms"].items() if k.startswith(("engine", "lowrank"))}
  best = min(engine, key=engine.get)
  results["best"] = best
  results["ratio_best_to_centralised"] = engine[best] / results["round_ms"]["centralised"]
  results["speedup_best_vs_python_loop"] = results["round_ms"]["python_loop"] / engine[best]
  print(f"best: {best} = {results['ratio_best_to_centralised']:.2f}x the centralised limit, "
        f"{results['speedup_best_vs_python_loop']:.2f}x faster than the Python loop")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "throughput.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
