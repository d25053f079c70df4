"""A/B of two low-rank path changes, each population timed round-robin beside its centralised limit.

``--change products``: the first layer's products once per round over the dataset's rows, or per
chunk. ``fedavg(first_layer_products=True)`` forms ``x W`` for the input Gram table's rows with one
pass per round and the kernel's weighted sum with one more (``lowrank.first_layer_products``,
``first_layer_delta``); ``False`` forms them per chunk of clients over their padded batch slots.

``--change densify``: long plain-SGD clients (too many steps for their factors) trained dense step
by step (``fedavg(densify_steps=0)``) or in densified blocks (``lowrank.local_train_densified``).

Each population (1,000 clients, 20 examples on average, MLP 784-200-10, batch 10, one epoch) is
timed round-robin in one process beside its centralised limit, so load changes hit every variant
alike; the per-repeat ratios' medians ("paired") are printed beside the medians' ratios.

  python -m benchmarks.first_layer                       # sigma 1, 1.5 and the power law, full cohort
  python -m benchmarks.first_layer --cohorts 1000,750,500 --populations lognormal:1
      # the break-even share of the population (fedavg.FIRST_LAYER_MIN_COHORT)
  python -m benchmarks.first_layer --change densify      # blocks against step-by-step long clients

Prints its table; nothing is written (docs/performance.md quotes the runs it cites).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from benchmarks.throughput import interleaved_times, make_centralised, make_engine_round, skewed_dataset
from fedjax_health import models
from fedjax_health.data.federated import BatchPlanSpec


# --change: (A, B) variants, each (name, make_engine_round keywords)
CHANGES = {
    "products": (("per chunk", dict(first_layer_products=False)), ("per round", dict(first_layer_products=True))),
    "densify": (("step by step", dict(densify_steps=0)), ("blocks", dict(densify_steps=None))),
}


def measure(skew: str, cohort: int, repeats: int, change: str = "products") -> dict:
  """Returns per-variant round times (seconds, one list per variant) for one population and cohort."""
  kind, value = skew.split(":")
  ds = skewed_dataset(1000, kind, sigma=float(value), power=float(value), mean=20)
  model = models.get_model("mlp", 10, (784,), hidden=(200,))
  plan = dataclasses.replace(BatchPlanSpec.create(ds.client_sizes, 10, num_epochs=1), step_buckets="pow2")
  fns = {}
  if cohort == ds.num_clients:  # the limit is defined for the whole population's examples
    fns["centralised"] = make_centralised(model, ds, 2)
  for name, kw in CHANGES[change]:
    fns[name] = make_engine_round(model, ds, plan, 1, fast_path="auto", cohort_size=cohort, **kw)[0]
  interleaved_times(fns, 1)  # warm-up
  return {k: np.asarray(v) for k, v in interleaved_times(fns, repeats).items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--populations", default="lognormal:1,lognormal:1.5,power_law:1.5")
  parser.add_argument("--cohorts", default="1000")
  parser.add_argument("--repeats", type=int, default=25)
  parser.add_argument("--change", default="products", choices=sorted(CHANGES))
  args = parser.parse_args(argv)
  a, b = (name for name, _ in CHANGES[args.change])
  print(f"| sizes | cohort | {a} (ms) | {b} (ms) | {b} / {a}, paired | "
        f"{a}, x limit (paired) | {b}, x limit (paired) |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for skew in args.populations.split(","):
    for cohort in (int(c) for c in args.cohorts.split(",")):
      t = measure(skew, cohort, args.repeats, args.change)
      ta, tb = t[a], t[b]
      lim = t.get("centralised")

      def x(v):
        return "-" if lim is None else f"{np.median(v) / np.median(lim):.2f}x ({np.median(v / lim):.2f}x)"

      print(f"| {skew} | {cohort:,} | {1e3 * np.median(ta):.1f} | {1e3 * np.median(tb):.1f} | "
            f"{np.median(tb / ta):.3f} | {x(ta)} | {x(tb)} |", flush=True)


if __name__ == "__main__":
  main()
