"""A/B of the low-rank path's first-layer products: once per round over the dataset's rows, or per chunk.

``fedavg(first_layer_products=True)`` forms ``x W`` for the input Gram table's rows with one pass
per round and the kernel's weighted sum with one more (``lowrank.first_layer_products``,
``first_layer_delta``); ``False`` forms them per chunk of clients over their padded batch slots.
Each population (1,000 clients, 20 examples on average, MLP 784-200-10, batch 10, one epoch) is
timed round-robin in one process beside its centralised limit, so load changes hit every variant
alike; the per-repeat ratios' medians ("paired") are printed beside the medians' ratios.

  python -m benchmarks.first_layer                       # sigma 1, 1.5 and the power law, full cohort
  python -m benchmarks.first_layer --cohorts 1000,750,500 --populations lognormal:1
      # the break-even share of the population (fedavg.FIRST_LAYER_MIN_COHORT)

Prints its table; nothing is written (docs/performance.md quotes the runs it cites).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from benchmarks.throughput import interleaved_times, make_centralised, make_engine_round, skewed_dataset
from fedjax_health import models
from fedjax_health.data.federated import BatchPlanSpec


def measure(skew: str, cohort: int, repeats: int) -> dict:
  """Returns per-variant round times (seconds, one list per variant) for one population and cohort."""
  kind, value = skew.split(":")
  ds = skewed_dataset(1000, kind, sigma=float(value), power=float(value), mean=20)
  model = models.get_model("mlp", 10, (784,), hidden=(200,))
  plan = dataclasses.replace(BatchPlanSpec.create(ds.client_sizes, 10, num_epochs=1), step_buckets="pow2")
  fns = {}
  if cohort == ds.num_clients:  # the limit is defined for the whole population's examples
    fns["centralised"] = make_centralised(model, ds, 2)
  for name, products in (("per chunk", False), ("per round", True)):
    fns[name] = make_engine_round(model, ds, plan, 1, fast_path="auto", first_layer_products=products,
                                  cohort_size=cohort)[0]
  interleaved_times(fns, 1)  # warm-up
  return {k: np.asarray(v) for k, v in interleaved_times(fns, repeats).items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--populations", default="lognormal:1,lognormal:1.5,power_law:1.5")
  parser.add_argument("--cohorts", default="1000")
  parser.add_argument("--repeats", type=int, default=25)
  args = parser.parse_args(argv)
  print("| sizes | cohort | per chunk (ms) | per round (ms) | per round / per chunk, paired | "
        "per chunk, x limit (paired) | per round, x limit (paired) |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for skew in args.populations.split(","):
    for cohort in (int(c) for c in args.cohorts.split(",")):
      t = measure(skew, cohort, args.repeats)
      chunk, rnd = t["per chunk"], t["per round"]
      lim = t.get("centralised")

      def x(v):
        return "-" if lim is None else f"{np.median(v) / np.median(lim):.2f}x ({np.median(v / lim):.2f}x)"

      print(f"| {skew} | {cohort:,} | {1e3 * np.median(chunk):.1f} | {1e3 * np.median(rnd):.1f} | "
            f"{np.median(rnd / chunk):.3f} | {x(chunk)} | {x(rnd)} |", flush=True)


if __name__ == "__main__":
  main()
