"""Cross-device FedAvg on 10,000 devices with lognormal sizes (sigma 1, mean 20), 1,000 per round.

Synthetic(1, 1) of Li et al. (60 features, 10 classes) split by the quantity-skew partitioner
(lognormal sigma 1, mean 20 examples, at least 2), MLP 60-100-10, 1 local epoch of batch 10. The
round's cost follows the 1,000 sampled devices' own steps (step buckets), and FedAvg's mean is
accumulated streaming, so memory is set by the chunk and the data, not by the cohort. Train
sizes run from 1 to 288 (mean 16; up to 29 steps). Run time of the full config: not measured yet
(the shared CPU was overloaded when it was written); ``:smoke`` runs in ``tests/test_launch.py``.

  python -m launch.main --config=configs/synthetic_skewed_10000.py --workdir=workdir/skewed_10000
  python -m launch.main --config=configs/synthetic_skewed_10000.py:smoke --workdir=/tmp/skewed_smoke
"""

from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "fedavg"
  config.num_rounds = 20
  config.eval_every = 5
  config.cohort_size = 1000

  # Input: 10,000 devices, lognormal sizes (quantity skew), 20 examples on average.
  config.dataset.name = "synthetic"
  config.dataset.num_clients = 10000
  config.dataset.alpha = 1.0
  config.dataset.beta = 1.0
  config.dataset.partition = "quantity"
  config.dataset.samples_per_client = 20
  config.dataset.size_sigma = 1.0

  # Model and client.
  config.model.name = "mlp"
  config.model.hidden = (100,)
  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.05
  config.client.batch_size = 10
  config.client.num_epochs = 1
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 1
    config.dataset.num_clients = 200
    config.cohort_size = 50
  return config
