"""Local-only baselines: each hospital of Fed-Heart-Disease trains alone (FLamby's "Local i").

Adam lr 0.001, batch 4, 50 epochs (one epoch per round, Adam state restarted each round); each
site's model is evaluated on all 4 sites' test splits. ~30 s on 2 CPUs.

  python -m launch.main --config=configs/heart_disease_local.py --workdir=workdir/hd_local
"""

from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "local"
  config.num_rounds = 50
  config.client.optimizer = "adam"
  config.client.learning_rate = 0.001
  config.client.batch_size = 4
  config.client.num_epochs = 1
  if arg == "smoke":
    config.num_rounds = 2
  return config
