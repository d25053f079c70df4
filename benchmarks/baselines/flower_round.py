"""Flower (flwr[simulation], Ray backend) baseline: FedAvg round time of a workload.

Runs in benchmarks/venvs/flower (see benchmarks/setup_baselines.sh). Each simulated client trains
the same model with a jitted JAX step; the server is Flower's FedAvg. The round time is the interval
between the starts of consecutive fit rounds (evaluation off), median over rounds after the first.
  benchmarks/venvs/flower/bin/python benchmarks/baselines/flower_round.py --workload w1
"""

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import WORKLOADS, make_data  # noqa: E402


@functools.lru_cache(maxsize=None)
def get_step():
  """The jitted SGD step, built once per Ray actor process (not once per client)."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def step(p, xb, yb):
    def loss(p):
      h = jax.nn.relu(xb @ p[0] + p[1])
      logits = h @ p[2] + p[3]
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))
    g = jax.grad(loss)(p)
    return [a - 0.1 * b for a, b in zip(p, g)]

  return step


def init_params(workload, seed=0):
  rng = np.random.default_rng(seed)
  if workload != "w1":
    raise ValueError("the Flower baseline implements the W1 MLP only")
  return [rng.normal(0, 784 ** -0.5, (784, 200)).astype(np.float32), np.zeros(200, np.float32),
          rng.normal(0, 200 ** -0.5, (200, 10)).astype(np.float32), np.zeros(10, np.float32)]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workload", default="w1")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--clients", type=int, default=0, help="override the number of clients")
  args = ap.parse_args()

  from flwr.client import ClientApp, NumPyClient
  from flwr.common import Context, ndarrays_to_parameters
  from flwr.server import ServerApp, ServerAppComponents, ServerConfig
  from flwr.server.strategy import FedAvg
  from flwr.simulation import run_simulation

  clients, per, shape, batch, epochs = WORKLOADS[args.workload]
  clients = args.clients or clients
  x, y, offsets = make_data(args.workload)

  class Client(NumPyClient):
    def __init__(self, cid):
      self.x, self.y = x[offsets[cid]:offsets[cid + 1]], y[offsets[cid]:offsets[cid + 1]]

    def fit(self, parameters, config):
      import jax.numpy as jnp
      step = get_step()
      p = [jnp.asarray(a) for a in parameters]
      perm = np.random.default_rng(int(config.get("round", 0))).permutation(len(self.y))
      for _ in range(epochs):
        for s in range(0, len(self.y), batch):
          idx = perm[s:s + batch]
          p = step(p, self.x[idx], self.y[idx])
      return [np.asarray(a) for a in p], len(self.y), {}

  starts = []

  def fit_config(server_round):
    starts.append(time.perf_counter())
    return {"round": server_round}

  def server_fn(context: Context):
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients,
                      min_available_clients=clients, min_evaluate_clients=0, on_fit_config_fn=fit_config,
                      initial_parameters=ndarrays_to_parameters(init_params(args.workload)))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

  def client_fn(context: Context):
    return Client(int(context.node_config["partition-id"])).to_client()

  logging.getLogger("flwr").setLevel(logging.WARNING)
  t0 = time.perf_counter()
  run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                 num_supernodes=clients, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
  end = time.perf_counter()
  bounds = starts + [end]
  rounds = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
  print(json.dumps({"baseline": "flower", "workload": args.workload, "clients": clients,
                    "round_s": statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0],
                    "all_rounds_s": rounds, "total_s": end - t0}))


if __name__ == "__main__":
  main()
