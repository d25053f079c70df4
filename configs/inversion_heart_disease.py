"""Gradient inversion of one FedAvg round on Fed-Heart-Disease: can the server read patient records?

64 uploads, each the update of one local SGD step on ONE patient's record (13 z-scored features:
age, sex, blood pressure, cholesterol, ...) through a 13-32-1 sigmoid MLP; the server inverts all
64 at once (Inverting Gradients' cosine distance with signed Adam, iDLG labels, no image prior)
and reports the per-feature error and the fraction of records recovered with every feature within
0.25 standard deviations. ~20 s on 2 CPU cores.

  python -m launch.main --config=configs/inversion_heart_disease.py --workdir=workdir/inversion_hd
  python -m launch.main --config=configs/inversion_heart_disease.py:smoke --workdir=/tmp/inv_hd_smoke
"""

from fedjax_health.attacks.inversion_run import inversion_config
from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.mode = "inversion"
  config.seed = 0

  # Input: the four hospitals, features z-scored with pooled train statistics.
  config.dataset.name = "heart_disease"
  config.dataset.normalize = "pooled"

  # Model: a small sigmoid MLP with one logit (sigmoid BCE, the iDLG sign case).
  config.model.name = "mlp"
  config.model.hidden = (32,)
  config.model.activation = "sigmoid"
  config.model.binary_single_logit = True

  # Client: the victims' local training (the attacker replays it).
  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.1

  # Attack and defences.
  config.inversion = inversion_config()
  config.inversion.num_victims = 64
  config.inversion.num_steps = 300
  config.inversion.tv_weight = 0.0  # no image prior for records
  if arg == "smoke":
    config.inversion.num_victims = 4
    config.inversion.num_steps = 20
    config.inversion.num_restarts = 1
  return config
