"""FLamby's exact Fed-Heart-Disease benchmark protocol, one method per config argument.

  python -m launch.main --config=configs/heart_disease_flamby.py:fedavg --workdir=workdir/flamby_fedavg
  python -m launch.main --config=configs/heart_disease_flamby.py:fedadam,smoke --workdir=/tmp/fl   # seconds

Arguments: pooled | local | fedavg | fedprox | fedadam | fedyogi | fedadagrad (add ",smoke" for the
small variant). Settings read from owkin/FLamby at edacf54 (June 2024):
``flamby/datasets/fed_heart_disease/common.py`` (batch 4; pooled/local: Adam lr 1e-3, 50 epochs;
federated rounds ``(486 // 4 // 4) * 50 // 100 = 15`` of ``num_updates = 100`` local SGD steps,
``flamby/benchmarks/fed_benchmark.py``), ``flamby/config_heart_disease.json`` (per-strategy rates),
``flamby/strategies/fed_avg.py`` and ``fed_opt.py`` (aggregate weighted by training-set size;
FedAdam/FedYogi/FedAdagrad of Reddi et al. without bias correction, ``v`` starting at 0),
``model.py`` (``torch.nn.Linear(13, 1)``, torch's default uniform init) and ``dataset.py``
(features z-scored per centre for the federated and local runs, with pooled statistics for pooled
training and for the pooled test set). ~10-20 s per method on 2 CPUs.

Differences that remain: FLamby draws batches from a per-client DataLoader that keeps its place
across rounds and ends each epoch with a short batch (199 = 49 * 4 + 3); we draw 100 full batches
from fresh permutations each round. FLamby's std is torch's unbiased one, ours numpy's (n vs n-1).
"""

from fedjax_health.config_base import base_config

# client lr, server optimizer, server lr, FedProx mu: flamby/config_heart_disease.json at edacf54.
STRATEGIES = {
    "fedavg": (0.001, "sgd", 1.0, 0.0),
    "fedprox": (0.001, "sgd", 1.0, 0.01),
    "fedadam": (0.01, "adam", 0.01, 0.0),
    "fedyogi": (0.003162, "yogi", 0.01, 0.0),
    "fedadagrad": (0.003162, "adagrad", 0.316228, 0.0),
}
METHODS = ("pooled", "local") + tuple(STRATEGIES)


def get_config(arg: str = "fedavg"):
  parts = [p for p in arg.split(",") if p]
  method = next((p for p in parts if p != "smoke"), "fedavg")
  if method not in METHODS:
    raise ValueError(f"configs/heart_disease_flamby.py takes one of {METHODS} (optionally ',smoke'), got {arg!r}")
  config = base_config()
  config.model.init = "torch"  # torch.nn.Linear's default init
  config.client.batch_size = 4
  config.server.weighting = "dataset_size"
  config.server.form = "reddi"
  config.server.initial_accumulator = 0.0  # FLamby's v starts at 0
  if method in ("pooled", "local"):
    config.algorithm = method
    # Pooled training normalises with pooled statistics, local training per centre.
    config.dataset.normalize = "pooled" if method == "pooled" else "per_center"
    config.num_rounds = 1  # one uninterrupted run: the Adam state is kept for all 50 epochs
    config.client.optimizer = "adam"
    config.client.learning_rate = 0.001
    config.client.num_epochs = 50
  else:
    lr, server, server_lr, mu = STRATEGIES[method]
    config.algorithm = "fedavg"
    config.dataset.normalize = "per_center"
    config.num_rounds = (486 // 4 // 4) * 50 // 100  # = 15
    config.client.optimizer = "sgd"
    config.client.learning_rate = lr
    config.client.num_steps = 100
    config.client.prox_mu = mu
    config.server.optimizer = server
    config.server.learning_rate = server_lr
    config.server.b1, config.server.b2, config.server.tau = 0.9, 0.999, 1e-8
  if "smoke" in parts:
    if method in ("pooled", "local"):
      config.client.num_epochs = 1
    else:
      config.num_rounds = 2
      config.client.num_steps = 5
  return config
