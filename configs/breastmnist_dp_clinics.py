"""Client-level (clinic-level) DP-FedAvg, cross-device: BreastMNIST over 100 small clinics.

Each round every clinic joins with probability q = 0.3 (Poisson; ~30 clinics), runs one local
epoch, clips its update to 0.5; the server adds N(0, (z C)^2) to the sum and divides by 30.
z is calibrated (RDP) for epsilon = 8 at delta = 1e-5 per clinic over 40 rounds. Logistic
regression on the 784 pixels keeps the noise dimension small. ~1 min on a 2-core CPU.

  python -m launch.main --config=configs/breastmnist_dp_clinics.py --workdir=workdir/breast_dp_clinics
  python -m launch.main --config=configs/breastmnist_dp_clinics.py:smoke --workdir=/tmp/bdc
"""

from fedjax_health.config_base import base_config
from fedjax_health.privacy.experiment import privacy_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "dp_fedavg"
  config.num_rounds = 40
  config.eval_every = 5
  config.dataset.name = "breastmnist"
  config.dataset.num_clients = 100
  config.dataset.partition = "iid"
  config.model.name = "logreg"
  config.client.learning_rate = 0.1
  config.client.batch_size = 4
  config.client.num_epochs = 1
  config.clients_per_step = 100  # tiny clients: vmap the whole cohort

  config.privacy = privacy_config()
  config.privacy.client.mechanism = "central"
  config.privacy.client.sampling = "poisson"
  config.privacy.client.sampling_rate = 0.3
  config.privacy.client.clip_norm = 0.5
  config.privacy.client.target_epsilon = 8.0
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 1
  return config
