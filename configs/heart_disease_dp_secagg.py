"""Distributed DP under simulated secure aggregation (SecAgg+) on Fed-Heart-Disease.

Each hospital clips its update to 0.5, adds its share N(0, (z C)^2 / 3) of the noise, quantises
to the ring Z_2^32 and masks it; the server only sees masked vectors and the sum. Each round every
hospital drops out with probability 0.1: the dropped hospitals' masks are removed through Shamir
shares (threshold 2 of 3 neighbours); a round with too few survivors (fewer than the 3 noise
shares, or a secret without 2 surviving shareholders) is aborted and reported, never summed wrong.
epsilon = 8 at delta = 1e-5 per hospital over 15 rounds. ~30 s on a 2-core CPU.

  python -m launch.main --config=configs/heart_disease_dp_secagg.py --workdir=workdir/hd_dp_secagg
  python -m launch.main --config=configs/heart_disease_dp_secagg.py:smoke --workdir=/tmp/hd_sa
"""

from fedjax_health.config_base import base_config
from fedjax_health.privacy.experiment import privacy_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "dp_fedavg"
  config.num_rounds = 15
  config.client.learning_rate = 0.01
  config.client.num_steps = 100

  config.privacy = privacy_config()
  config.privacy.client.mechanism = "distributed"
  config.privacy.client.clip_norm = 0.5
  config.privacy.client.target_epsilon = 8.0
  config.privacy.secagg.enabled = True
  config.privacy.secagg.num_neighbors = 3  # complete graph on 4 hospitals
  config.privacy.secagg.threshold = 2
  config.privacy.secagg.dropout_rate = 0.1
  config.privacy.secagg.min_survivor_fraction = 0.75  # noise sized for 3 of the 4 hospitals
  if arg == "smoke":
    config.num_rounds = 2
    config.client.num_steps = 5
  return config
