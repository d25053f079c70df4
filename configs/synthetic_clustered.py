"""Synthetic(1, 1) of Li et al. with 4 planted clusters over 20 clients: does a method find them?

Clients c and c' share one generating model and input distribution iff c = c' mod 4
(``synthetic.load(num_clusters=4)``); 100 examples per client (80 train / 20 test). MLP
(60 -> 32 -> 10, so FedPer and LG-FedAvg have a body and a head), all clients every round, 20
local steps of batch 16. Default IFCA; any clustered or personalised method with
``--config.algorithm``. ~10 s per method on a 2-core CPU.

  python -m launch.main --config=configs/synthetic_clustered.py --workdir=workdir/synth_ifca
  python -m launch.main --config=configs/synthetic_clustered.py:smoke --workdir=/tmp/synth_cl
"""

from fedjax_health.algorithms import clustered_experiment as clustered
from fedjax_health.algorithms import personalized_experiment as personalized
from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = clustered.add_config(personalized.add_config(base_config()))
  config.algorithm = "ifca"
  config.num_rounds = 20
  config.eval_every = 5

  config.dataset.name = "synthetic"
  config.dataset.num_clients = 20
  config.dataset.num_clusters = 4
  config.dataset.alpha = 1.0
  config.dataset.beta = 1.0
  config.dataset.samples_per_client = 100

  config.model.name = "mlp"  # body_0 + head, so FedPer and LG-FedAvg have both parts
  config.model.hidden = (32,)

  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.05
  config.client.batch_size = 16
  config.client.num_epochs = 0
  config.client.num_steps = 20

  config.clustering.num_clusters = 4
  config.clustering.cfl_warmup_rounds = 5
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 2
    config.client.num_steps = 3
    config.clustering.cfl_warmup_rounds = 1
  return config
