"""Pooled (centralised) baseline on Fed-Heart-Disease: all 486 train rows in one place.

Adam lr 0.001, batch 4, 50 epochs (one per round), evaluated on each hospital's test split.
~10 s on 2 CPUs.

  python -m launch.main --config=configs/heart_disease_pooled.py --workdir=workdir/hd_pooled
"""

from configs import heart_disease_local


def get_config(arg: str = ""):
  config = heart_disease_local.get_config(arg)
  config.algorithm = "pooled"
  return config
