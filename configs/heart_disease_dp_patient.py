"""Patient-level DP-SGD inside each of the 4 Fed-Heart-Disease hospitals (cross-silo).

Every local step each patient of a hospital enters the batch with probability q = 0.1 (Poisson),
per-patient gradients (vmap(grad)) are clipped to 1, N(0, z^2) is added to their sum, divided by
the expected batch size. z is calibrated (RDP) so that 15 rounds x 25 steps cost epsilon = 3 at
delta = 1e-5 per patient. The server averages the 4 noised hospital updates with unit weights.
~30 s on a 2-core CPU.

  python -m launch.main --config=configs/heart_disease_dp_patient.py --workdir=workdir/hd_dp_patient
  python -m launch.main --config=configs/heart_disease_dp_patient.py:smoke --workdir=/tmp/hd_dpp
"""

from fedjax_health.config_base import base_config
from fedjax_health.privacy.experiment import privacy_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "dp_fedavg"
  config.num_rounds = 15
  config.client.learning_rate = 0.05  # the DP-SGD step is a mean over ~q n examples, noised
  config.client.num_epochs = 0
  config.client.num_steps = 25
  config.client.batch_size = 4  # unused by the Poisson plan, kept valid for the core checks

  config.privacy = privacy_config()
  config.privacy.delta = 1e-5
  config.privacy.client.mechanism = "none"  # no hospital-level noise: see heart_disease_dp.py
  config.privacy.patient.enabled = True
  config.privacy.patient.clip_norm = 1.0
  config.privacy.patient.sampling_rate = 0.1
  config.privacy.patient.target_epsilon = 3.0
  if arg == "smoke":
    config.num_rounds = 2
    config.client.num_steps = 3
  return config
