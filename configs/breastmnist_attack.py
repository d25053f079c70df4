"""Backdoor on BreastMNIST, cross-device: 60 clinics (Dirichlet 1.0), 15 sampled per round, 10% malicious.

The attackers (a fixed 10% of clinics) stamp a 3x3 white patch on half of their images and
relabel them "malignant" (class 0: the clean model never calls a patched benign scan malignant,
so every success is the backdoor's), with PGD (radius 0.15, about an honest update's norm) and
model replacement, from round 30 on (the first 30 rounds train honestly towards convergence);
the server runs norm bounding at the same 0.15. A small MLP keeps the 400-cell grid of
experiments/security.py within minutes on 2 CPUs (``--config.model.name=cnn`` for a CNN).
Swap ``attack.kind`` / ``defense.aggregator`` / ``defense.detector`` for the other cells of the
table in docs/security.md. ~10 s on 2 CPUs (ASR and detection rates are in metrics.jsonl).

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
  config.num_rounds = 40
  config.eval_every = 5
  config.cohort_size = 15  # cross-device: a sampled cohort of small clinics
  config.dataset.name = "breastmnist"
  config.dataset.num_clients = 60  # 546 train images: ~9 per clinic (alpha 0.5 cannot give all 60 >= 2)
  config.dataset.partition = "dirichlet"
  config.dataset.alpha = 1.0
  config.model.name = "mlp"
  config.model.hidden = (32,)
  config.client.learning_rate = 0.05
  config.client.batch_size = 8
  config.client.num_epochs = 2

  config.attack = attack_config()
  config.attack.kind = "backdoor"
  config.attack.fraction = 0.1
  config.attack.start_round = 30
  config.attack.target = 0  # "malignant"
  config.attack.trigger = "patch"
  config.attack.poison_fraction = 0.5
  config.attack.pgd_radius = 0.15
  config.attack.replacement = True

  config.defense = defense_config()
  config.defense.aggregator = "norm_bound"
  config.defense.max_norm = 0.15  # about the honest clinics' update norm near convergence
  config.defense.num_byzantine = 2
  if arg == "smoke":
    config.num_rounds = 3
    config.eval_every = 1
    config.cohort_size = 10
    config.dataset.num_clients = 20
    config.attack.start_round = 1
    config.model.hidden = (8,)
    config.client.num_epochs = 1
  return config
