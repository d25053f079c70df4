"""Backdoor on BreastMNIST, cross-device: 100 clinics (Dirichlet 0.5), 20 sampled per round, 10% malicious.

The attackers (a fixed 10% of clinics) stamp a 3x3 white patch on half of their images and
relabel them "normal/benign" (class 1), with PGD (radius 0.5) and model replacement, from round
20 on (the first 20 rounds train honestly towards convergence); the server runs norm bounding.
Swap ``attack.kind`` / ``defense.aggregator`` / ``defense.detector`` for the other cells of the
table in docs/security.md. ~1-2 min on 2 CPUs.

  python -m launch.main --config=configs/breastmnist_attack.py --workdir=workdir/breast_attack
  python -m launch.main --config=configs/breastmnist_attack.py --workdir=workdir/breast_attack \
      --config.defense.aggregator=mean   # the undefended FedAvg
  python -m launch.main --config=configs/breastmnist_attack.py:smoke --workdir=/tmp/ba
"""

from fedjax_health.attacks.attack_defense import attack_config, defense_config
from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "attack_defense"
  config.num_rounds = 30
  config.eval_every = 5
  config.cohort_size = 20  # cross-device: a sampled cohort of small clinics
  config.dataset.name = "breastmnist"
  config.dataset.num_clients = 100
  config.dataset.partition = "dirichlet"
  config.dataset.alpha = 0.5
  config.model.name = "cnn"
  config.model.features = (8, 16)
  config.model.dense = 32
  config.client.learning_rate = 0.05
  config.client.batch_size = 8
  config.client.num_epochs = 2

  config.attack = attack_config()
  config.attack.kind = "backdoor"
  config.attack.fraction = 0.1
  config.attack.start_round = 20
  config.attack.target = 1  # "normal/benign": a malignant lesion with the trigger is called benign
  config.attack.trigger = "patch"
  config.attack.poison_fraction = 0.5
  config.attack.pgd_radius = 0.5
  config.attack.replacement = True

  config.defense = defense_config()
  config.defense.aggregator = "norm_bound"
  config.defense.max_norm = 0.5  # about the honest clinics' update norm near convergence
  config.defense.num_byzantine = 2
  if arg == "smoke":
    config.num_rounds = 3
    config.eval_every = 1
    config.cohort_size = 10
    config.dataset.num_clients = 20
    config.attack.start_round = 1
    config.model.features = (2, 4)
    config.model.dense = 8
    config.client.num_epochs = 1
  return config
