"""FedJAX 0.0.17 baseline: one FedAvg round of a workload, median seconds after warm-up.

Runs in benchmarks/venvs/fedjax (see benchmarks/setup_baselines.sh). Prints one JSON line.
  benchmarks/venvs/fedjax/bin/python benchmarks/baselines/fedjax_round.py --workload w1
"""

import argparse
import json
import os
import statistics
import sys
import time

import fedjax
import haiku as hk
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import WORKLOADS, make_data  # noqa: E402


def forward(batch, name):
  x = batch["x"]
  if name == "w1":
    return hk.Sequential([hk.Linear(200), jax.nn.relu, hk.Linear(10)])(x)
  # FedJAX's EMNIST CNN (dropout omitted, as in our model): conv32-conv64-maxpool-dense128-dense10
  x = jax.nn.relu(hk.Conv2D(32, (3, 3), padding="VALID")(x))
  x = jax.nn.relu(hk.Conv2D(64, (3, 3), padding="VALID")(x))
  x = hk.MaxPool(window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="VALID")(x)
  x = hk.Flatten()(x)
  x = jax.nn.relu(hk.Linear(128)(x))
  return hk.Linear(10)(x)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workload", default="w1")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  clients, per, shape, batch, epochs = WORKLOADS[args.workload]
  x, y, offsets = make_data(args.workload)
  transformed = hk.transform(lambda b: forward(b, args.workload))
  model = fedjax.create_model_from_haiku(
      transformed_forward_pass=transformed, sample_batch={"x": np.zeros((1,) + shape, np.float32)},
      train_loss=lambda b, preds: fedjax.metrics.unreduced_cross_entropy_loss(b["y"], preds))
  data = {f"{c}": {"x": x[offsets[c]:offsets[c + 1]], "y": y[offsets[c]:offsets[c + 1]]} for c in range(clients)}
  fd = fedjax.InMemoryFederatedData(data)
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(0.1), fedjax.optimizers.sgd(1.0),
      fedjax.ShuffleRepeatBatchHParams(batch_size=batch, num_epochs=epochs))
  state = algorithm.init(model.init(jax.random.PRNGKey(0)))
  cohort = [(cid, fd.get_client(cid), jax.random.PRNGKey(i)) for i, cid in enumerate(fd.client_ids())]
  times = []
  for r in range(args.repeats + 1):
    t = time.perf_counter()
    state, _ = algorithm.apply(state, cohort)
    jax.block_until_ready(state.params)
    if r:
      times.append(time.perf_counter() - t)
  print(json.dumps({"baseline": "fedjax-0.0.17", "workload": args.workload, "round_s": statistics.median(times),
                    "jax": jax.__version__}))


if __name__ == "__main__":
  main()
