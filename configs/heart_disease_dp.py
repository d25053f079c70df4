"""Client-level (hospital-level) DP-FedAvg on Fed-Heart-Disease: 4 hospitals, every round.

Each hospital's update is clipped to L2 norm 0.5, the server adds N(0, (z C)^2) to the sum and
divides by 4 (McMahan et al. 2018); z is calibrated with dp-accounting (RDP) so that 15 rounds
cost epsilon = 8 at delta = 1e-5 per hospital. With only 4 hospitals the noise on the mean is
z C / 4 per coordinate, large: see docs/privacy.md. ~20 s on a 2-core CPU.

  python -m launch.main --config=configs/heart_disease_dp.py --workdir=workdir/hd_dp
  python -m launch.main --config=configs/heart_disease_dp.py --workdir=workdir/hd_dp \
      --config.privacy.client.target_epsilon=inf     # clipping only, no noise
  python -m launch.main --config=configs/heart_disease_dp.py:smoke --workdir=/tmp/hd_dp
"""

from fedjax_health.config_base import base_config
from fedjax_health.privacy.experiment import privacy_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "dp_fedavg"
  config.num_rounds = 15
  config.client.learning_rate = 0.01
  config.client.batch_size = 4
  config.client.num_steps = 100

  # Privacy: hospital-level central DP, all 4 hospitals every round (Poisson rate 1).
  config.privacy = privacy_config()
  config.privacy.delta = 1e-5
  config.privacy.client.mechanism = "central"
  config.privacy.client.sampling = "poisson"
  config.privacy.client.sampling_rate = 1.0
  config.privacy.client.clip_norm = 0.5  # ~ the median update norm of non-private FedAvg here
  config.privacy.client.target_epsilon = 8.0
  if arg == "smoke":
    config.num_rounds = 2
    config.client.num_steps = 5
  return config
