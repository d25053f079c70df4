"""Backdoor on Fed-Heart-Disease, cross-silo: one of the 4 hospitals is malicious.

The malicious hospital (Hungarian, client 1) sets two vitals (trestbps, thalach; z-scored) to
+3 on half of its records and relabels them "heart disease" (the clean model calls 1% of such
triggered healthy records diseased, so successes are the backdoor's), with PGD (radius 0.17,
about an honest update's norm) and model replacement (scale n_S / (n_i eta), eta = server lr = 1) from round 20 on; the
server uses the coordinate-wise median.
Krum and Bulyan cannot run here (4 sites: Krum needs n > 2f + 2 = 4, Bulyan n >= 4f + 3 = 7)
and the config check says so. ~10 s on 2 CPUs (ASR and detection rates are in metrics.jsonl).

  python -m launch.main --config=configs/heart_disease_attack.py --workdir=workdir/hd_attack
  python -m launch.main --config=configs/heart_disease_attack.py:smoke --workdir=/tmp/hda
"""

from fedjax_health.attacks.attack_defense import attack_config, defense_config
from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "attack_defense"
  config.num_rounds = 30
  config.eval_every = 5
  config.model.name = "mlp"  # a hidden layer, so the pruning defence has units to prune
  config.model.hidden = (16,)
  config.client.learning_rate = 0.05
  config.client.batch_size = 8
  config.client.num_steps = 20

  config.attack = attack_config()
  config.attack.kind = "backdoor"
  config.attack.clients = (1,)
  config.attack.start_round = 20
  config.attack.target = 1  # "heart disease"
  config.attack.trigger = "features"
  config.attack.trigger_features = (2, 5)  # trestbps, thalach
  config.attack.trigger_values = (3.0, 3.0)
  config.attack.pgd_radius = 0.17
  config.attack.replacement = True

  config.defense = defense_config()
  config.defense.aggregator = "median"
  config.defense.max_norm = 0.17
  if arg == "smoke":
    config.num_rounds = 3
    config.eval_every = 1
    config.attack.start_round = 1
    config.client.num_steps = 3
  return config
