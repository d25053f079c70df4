"""Patient-level DP-SGD on BreastMNIST split over 10 clinics (Dirichlet(0.5) label skew), small MLP.

Each clinic runs 10 DP-SGD steps per round with Poisson rate q = 0.1 (per-image gradients clipped
to 1, noise calibrated with dp-accounting so 30 rounds cost epsilon = 3 at delta = 1e-5 per
patient); the server averages the clinics' updates with unit weights. ~1 min on a 2-core CPU.

  python -m launch.main --config=configs/breastmnist_dp_patient.py --workdir=workdir/breast_dp_patient
  python -m launch.main --config=configs/breastmnist_dp_patient.py:smoke --workdir=/tmp/bdp
"""

from fedjax_health.config_base import base_config
from fedjax_health.privacy.experiment import privacy_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "dp_fedavg"
  config.num_rounds = 30
  config.eval_every = 5
  config.dataset.name = "breastmnist"
  config.dataset.num_clients = 10
  config.dataset.partition = "dirichlet"
  config.dataset.alpha = 0.5
  # An MLP, not a CNN: per-example gradients of convolutions (vmap(grad)) become grouped
  # convolutions, ~20x slower on CPU than the batched matmuls of an MLP.
  config.model.name = "mlp"
  config.model.hidden = (32,)
  config.client.learning_rate = 0.1
  config.client.num_epochs = 0
  config.client.num_steps = 10
  config.client.batch_size = 16  # unused by the Poisson plan

  config.privacy = privacy_config()
  config.privacy.client.mechanism = "none"
  config.privacy.patient.enabled = True
  config.privacy.patient.clip_norm = 1.0
  config.privacy.patient.sampling_rate = 0.1
  config.privacy.patient.target_epsilon = 3.0
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 1
    config.client.num_steps = 2
    config.model.hidden = (8,)
  return config
