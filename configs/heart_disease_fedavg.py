"""FedAvg across the 4 hospitals of Fed-Heart-Disease (our protocol; FLamby's exact one: heart_disease_flamby.py).

Logistic regression (13 features -> 1 logit), 15 rounds of 100 local SGD steps of batch 4 at every
hospital, server averages weighted by examples. ~15 s on a 2-core CPU.

  python -m launch.main --config=configs/heart_disease_fedavg.py --workdir=workdir/hd_fedavg
  python -m launch.main --config=configs/heart_disease_fedavg.py:smoke --workdir=/tmp/hd
"""

from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "fedavg"
  config.num_rounds = 15  # FLamby: (486 // 4 // 4) * 50 // 100
  config.client.learning_rate = 0.01  # FLamby uses 0.001; 0.01 converges within the 15 rounds
  config.client.batch_size = 4
  config.client.num_steps = 100
  if arg == "smoke":
    config.num_rounds = 2
    config.client.num_steps = 5
  return config
