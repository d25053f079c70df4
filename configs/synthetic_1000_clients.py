"""Cross-device scale: Synthetic(1, 1) of Li et al. with 1,000 devices, 100 sampled per round.

MLP 60-100-10, 1 local epoch of batch 10, 50 rounds. ~1 min on 2 CPUs.

  python -m launch.main --config=configs/synthetic_1000_clients.py --workdir=workdir/synthetic
"""

from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "fedavg"
  config.num_rounds = 50
  config.eval_every = 5
  config.cohort_size = 100
  config.clients_per_step = 1
  config.dataset.name = "synthetic"
  config.dataset.num_clients = 1000
  config.dataset.alpha = 1.0
  config.dataset.beta = 1.0
  config.model.name = "mlp"
  config.model.hidden = (100,)
  config.client.learning_rate = 0.05
  config.client.batch_size = 10
  config.client.num_epochs = 1
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 1
    config.dataset.num_clients = 50
    config.cohort_size = 10
  return config
