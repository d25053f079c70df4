"""FedAvg on BreastMNIST split across 10 clinics with Dirichlet(0.5) label skew, small CNN.

20 rounds, all clinics each round, 1 local epoch of batch 16, SGD lr 0.05. ~1 min on 2 CPUs.

  python -m launch.main --config=configs/breastmnist_dirichlet.py --workdir=workdir/breast
"""

from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "fedavg"
  config.num_rounds = 20
  config.dataset.name = "breastmnist"
  config.dataset.num_clients = 10
  config.dataset.partition = "dirichlet"
  config.dataset.alpha = 0.5
  config.model.name = "cnn"
  config.model.features = (16, 32)
  config.model.dense = 64
  config.client.learning_rate = 0.05
  config.client.batch_size = 16
  config.client.num_epochs = 1
  if arg == "smoke":
    config.num_rounds = 2
    config.model.features = (4, 8)
    config.model.dense = 16
  return config
