"""FedProx (mu = 0.01, as FLamby) across the 4 hospitals of Fed-Heart-Disease. ~15 s on 2 CPUs.

  python -m launch.main --config=configs/heart_disease_fedprox.py --workdir=workdir/hd_fedprox
"""

from configs import heart_disease_fedavg


def get_config(arg: str = ""):
  config = heart_disease_fedavg.get_config(arg)
  config.algorithm = "fedprox"
  config.client.prox_mu = 0.01
  return config
