"""Gradient inversion of one FedAvg round on BreastMNIST: can the server see the ultrasound images?

64 clinics' staff each upload the update of one local SGD step on ONE 16x16 image (downsampled
from 28x28) through the sigmoid LeNet of the gradient-inversion literature (Zhu et al. 2019);
the server runs Inverting Gradients (Geiping et al. 2020: cosine distance, signed Adam, iDLG
labels, 2 restarts, 200 iterations) on all 64 updates at once. ~1 min on 2 CPU cores.
Change one defence at a time on the command line, e.g. ``--config.inversion.noise_multiplier=0.01
--config.inversion.clip_norm=1``, ``--config.inversion.batch_size=4``,
``--config.inversion.local_steps=5``, ``--config.inversion.secure_agg_group=4``,
``--config.model.activation=relu``; ``experiments/inversion_sweep.py`` runs them all.

  python -m launch.main --config=configs/inversion_breastmnist.py --workdir=workdir/inversion_breast
  python -m launch.main --config=configs/inversion_breastmnist.py:smoke --workdir=/tmp/inv_smoke
"""

from fedjax_health.attacks.inversion_run import inversion_config
from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.mode = "inversion"
  config.seed = 0

  # Input: the federation the victims' images come from.
  config.dataset.name = "breastmnist"
  config.dataset.num_clients = 10
  config.dataset.partition = "dirichlet"
  config.dataset.alpha = 0.5

  # Model: LeNet with sigmoid activations, as in DLG/iDLG (ReLU/tanh via --config.model.activation).
  config.model.name = "lenet"
  config.model.activation = "sigmoid"
  config.model.width = 12

  # Client: the victims' local training (the attacker replays it).
  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.1

  # Attack and defences.
  config.inversion = inversion_config()
  config.inversion.resolution = 16
  config.inversion.num_victims = 64
  config.inversion.num_steps = 200  # enough at 16x16 (the docs' sweep); native 28x28 wants the default 500
  if arg == "smoke":
    config.inversion.resolution = 8
    config.inversion.num_victims = 4
    config.inversion.num_steps = 20
    config.inversion.num_restarts = 1
    config.inversion.grid_examples = 4
  return config
