"""FedAdagrad (Reddi et al. 2021) across the 4 hospitals of Fed-Heart-Disease, FLamby's tuned rates.

Client SGD lr 0.003162, server adagrad lr 0.316228, beta1 0.9, beta2 0.999, tau 1e-8. ~15 s on 2 CPUs.

  python -m launch.main --config=configs/heart_disease_fedadagrad.py --workdir=workdir/hd_fedadagrad
"""

from configs import heart_disease_fedavg


def get_config(arg: str = ""):
  config = heart_disease_fedavg.get_config(arg)
  config.algorithm = "fedopt"
  config.client.learning_rate = 0.003162
  config.server.optimizer = "adagrad"
  config.server.learning_rate = 0.316228
  config.server.b1 = 0.9
  config.server.b2 = 0.999
  config.server.tau = 1e-8
  return config
