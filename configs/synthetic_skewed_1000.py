"""Cross-device FedAvg on 1,000 devices with heavy-tailed data: lognormal sizes (sigma 1.5, mean 20).

Synthetic(1, 1) of Li et al. (60 features, 10 classes), client sizes from the quantity-skew
partitioner (``partition.quantity_skew``: lognormal sigma 1.5, mean 20 examples, at least 2), 100
devices per round, MLP 60-100-10, 1 local epoch of batch 10. Train sizes run from 1 to 543
(mean 16, 80% go to training): the largest device takes 55 steps, most take 1-3. With step buckets
(``fedjax_health/step_buckets.py``) a round costs the sampled devices' own steps, not 100 copies of
the largest device's. Run time of the full config: not measured yet (the shared CPU was overloaded
when it was written); ``:smoke`` runs in ``tests/test_launch.py``.

  python -m launch.main --config=configs/synthetic_skewed_1000.py --workdir=workdir/skewed_1000
  python -m launch.main --config=configs/synthetic_skewed_1000.py:smoke --workdir=/tmp/skewed_smoke
"""

from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "fedavg"
  config.num_rounds = 50
  config.eval_every = 10
  config.cohort_size = 100

  # Input: 1,000 devices, lognormal sizes (quantity skew), 20 examples on average (train + test).
  config.dataset.name = "synthetic"
  config.dataset.num_clients = 1000
  config.dataset.alpha = 1.0
  config.dataset.beta = 1.0
  config.dataset.partition = "quantity"
  config.dataset.samples_per_client = 20
  config.dataset.size_sigma = 1.5

  # Model and client: plain SGD, one epoch (devices take 1 to 55 steps).
  config.model.name = "mlp"
  config.model.hidden = (100,)
  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.05
  config.client.batch_size = 10
  config.client.num_epochs = 1
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 1
    config.dataset.num_clients = 60
    config.cohort_size = 20
  return config
