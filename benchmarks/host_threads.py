"""Host threads: what a round would gain if its client map ran as two executions on two host threads.

  python -m benchmarks.host_threads                     # lognormal sigma 1, 1,000 clients, 11 repeats
  python -m benchmarks.host_threads --skew power_law:1.5 --repeats 15

The experiment behind ``fedavg(host_threads=)`` (``config.host_threads``; ``benchmarks.skew`` measures
the engine's own host-thread round). On XLA's CPU backend, the low-rank path's per-step work is
many small ops that run on one core (too small for XLA to split), while the round's large GEMMs
(the first layer's products and kernel sum) use every core. Independent loops inside one XLA CPU
program run one after the other (buffer assignment shares their temporaries), and so do two
executions dispatched from one Python thread; two executions dispatched from two Python threads run
at the same time. This script measures both facts, in one process, round-robin:

* ``loop``: a jitted loop of small batched products (``[20, 10, 200]``), once, twice from one thread,
  twice from two threads;
* ``round``: the centralised limit, the engine's round on the whole population, and two rounds on
  its two halves (clients alternating by size rank, so both halves hold every size) run one after
  the other and on two threads. The halves' rounds are not the whole round (each takes its own server
  step): their time on two threads bounds what a client map split over two host threads could reach,
  with the GEMMs of both halves competing for the same cores.

Writes a row per population (``skew/clients``) to ``docs/perf_host_threads.json`` (``--out``); prints
each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks.throughput import cpu_description, make_centralised, make_engine_round, skewed_dataset  # noqa: E402
from fedjax_health import models  # noqa: E402
from fedjax_health.data.federated import BatchPlanSpec  # noqa: E402

JSON = os.path.join(ROOT, "docs", "perf_host_threads.json")


def split_by_size_rank(sizes: np.ndarray, parts: int = 2) -> list[np.ndarray]:
  """Returns ``parts`` sorted index arrays partitioning the clients: clients ranked by size (stable),
  dealt round-robin, so every part holds clients of every size."""
  sizes = np.asarray(sizes)
  if sizes.ndim != 1:
    raise ValueError(f"sizes must be 1-D, got shape {sizes.shape}")
  if not 1 <= parts <= len(sizes):
    raise ValueError(f"parts must be in [1, {len(sizes)}] (the number of clients), got {parts}")
  order = np.argsort(sizes, kind="stable")
  return [np.sort(order[i::parts]) for i in range(parts)]


def _run(fn):
  jax.block_until_ready(fn())


def _on_threads(fns):
  threads = [threading.Thread(target=_run, args=(f,)) for f in fns]
  for t in threads:
    t.start()
  for t in threads:
    t.join()


def time_variants(variants: dict, repeats: int) -> dict:
  """Seconds per call of each zero-argument variant, timed round-robin."""
  for v in variants.values():
    v()
  times = {k: [] for k in variants}
  for _ in range(repeats):
    for k, v in variants.items():
      t = time.perf_counter()
      v()
      times[k].append(time.perf_counter() - t)
  return times


def small_op_loop(steps: int = 300):
  """A jitted loop of small batched products, as the low-rank chunks' steps, and two inputs."""
  def body(i, c):
    h, w = c
    return jnp.tanh(jnp.einsum("cbd,cde->cbe", h, w) * 0.01 + i), w

  f = jax.jit(lambda h, w: jax.lax.fori_loop(0, steps, body, (h, w))[0])
  w = jnp.full((20, 200, 200), 1e-3)
  return [lambda h=h: f(h, w) for h in (jnp.full((20, 10, 200), 0.1), jnp.full((20, 10, 200), 0.2))]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--skew", default="lognormal:1", help="lognormal:<sigma> or power_law:<a>")
  ap.add_argument("--clients", type=int, default=1000)
  ap.add_argument("--repeats", type=int, default=11)
  ap.add_argument("--out", default=JSON)
  args = ap.parse_args()
  kind, _, value = args.skew.partition(":")
  try:
    value = float(value)
  except ValueError:
    value = None
  if kind not in ("lognormal", "power_law") or value is None:
    raise SystemExit(f"--skew must be lognormal:<sigma> or power_law:<a>, got {args.skew!r}")
  if args.repeats < 1 or args.clients < 2:
    raise SystemExit(f"--repeats must be >= 1 and --clients >= 2, got {args.repeats} and {args.clients}")

  loops = small_op_loop()
  loop_t = time_variants({"one": lambda: _run(loops[0]),
                          "two_one_thread": lambda: [_run(f) for f in loops],
                          "two_threads": lambda: _on_threads(loops)}, args.repeats)

  ds = skewed_dataset(args.clients, kind, sigma=value, power=value)
  model = models.get_model("mlp", 10, (784,), hidden=(200,))
  halves = [ds.select_clients(c) for c in split_by_size_rank(ds.client_sizes)]
  rounds = [make_engine_round(model, d, BatchPlanSpec.create(d.client_sizes, 10, num_epochs=1), 1,
                              fast_path="auto")[0] for d in [ds] + halves]
  central = make_centralised(model, ds, 2)
  round_t = time_variants({"centralised": lambda: _run(central), "round": lambda: _run(rounds[0]),
                           "halves_one_thread": lambda: [_run(f) for f in rounds[1:]],
                           "halves_two_threads": lambda: _on_threads(rounds[1:])}, args.repeats)
  c = np.asarray(round_t["centralised"])
  out = {
      "loop_ms": {k: 1e3 * float(np.median(v)) for k, v in loop_t.items()},
      "round_ms": {k: 1e3 * float(np.median(v)) for k, v in round_t.items()},
      "round_x_limit": {k: float(np.median(np.asarray(v) / c)) for k, v in round_t.items()},
      "skew": args.skew, "clients": args.clients, "repeats": args.repeats, "cpu": cpu_description(),
      "cores": os.cpu_count(), "jax": jax.__version__, "command": " ".join(["python -m benchmarks.host_threads"] +
                                                                            sys.argv[1:]),
  }
  for k in ("loop_ms", "round_ms", "round_x_limit"):
    print(k, {n: round(v, 2) for n, v in out[k].items()}, flush=True)
  from experiments import report as report_lib
  out.update(report_lib.provenance(out["command"]))
  doc = {"points": {}}
  if os.path.exists(args.out):  # one row per population: a population measured again replaces its row
    with open(args.out) as f:
      doc = json.load(f)
  doc["points"][f"{args.skew}/{args.clients}"] = report_lib.rounded(out)
  report_lib.write_json(args.out, doc)


if __name__ == "__main__":
  main()
