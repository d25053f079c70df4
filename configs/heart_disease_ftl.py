"""Federated transfer learning (Liu et al. 2020) on a vertical split of Fed-Heart-Disease.

Party A (clinic: age, sex, chest-pain type; labels) and party B (exercise-test lab: blood pressure,
cholesterol, fasting sugar, resting ECG, max heart rate, exercise angina, ST depression; no
labels) share ``ftl.overlap`` patients; B is scored on its 254 patients A never saw, next to the
supervised baselines. ``ftl.protection`` = none | paillier (2048-bit keys) | secret_sharing.
Plaintext: ~10 s on 2 CPU cores; each Paillier epoch costs seconds (see docs/transfer.md).

  python -m launch.main --config=configs/heart_disease_ftl.py --workdir=workdir/ftl
  python -m launch.main --config=configs/heart_disease_ftl.py --workdir=workdir/ftl_he \
      --config.ftl.protection=paillier --config.ftl.epochs=5 --config.ftl.overlap=20
  python -m launch.main --config=configs/heart_disease_ftl.py:smoke --workdir=/tmp/ftl_smoke
"""

from fedjax_health.config_base import base_config
from fedjax_health.transfer.experiment import ftl_config


def get_config(arg: str = ""):
  config = base_config()
  config.mode = "ftl"
  config.seed = 0
  config.ftl = ftl_config()
  if arg == "smoke":
    # Secret sharing end to end on 8 shared patients, tiny networks, a few epochs.
    config.ftl.protection = "secret_sharing"
    config.ftl.overlap = 8
    config.ftl.hidden = ()
    config.ftl.epochs = 3
    config.ftl.pretrain_epochs = 5
    config.ftl.log_every = 1
  return config
