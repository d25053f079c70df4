"""Personalised and clustered FL across the 4 hospitals of Fed-Heart-Disease, judged per hospital.

Small MLP (13 features -> 16 -> 2 logits), every hospital every round, 20 rounds of
20 local SGD steps of batch 8; each hospital's own model is evaluated on its own test split.
Default FedPer; any of fedper, lg_fedavg, local_only, apfl, ditto, interpolation, finetune,
multicenter, ifca, cfl with ``--config.algorithm``. ~10 s per method on a 2-core CPU.

  python -m launch.main --config=configs/heart_disease_personalized.py --workdir=workdir/hd_fedper
  python -m launch.main --config=configs/heart_disease_personalized.py --config.algorithm=apfl \
      --workdir=workdir/hd_apfl
  python -m launch.main --config=configs/heart_disease_personalized.py:smoke --workdir=/tmp/hd_pers
"""

from fedjax_health.algorithms import clustered_experiment as clustered
from fedjax_health.algorithms import personalized_experiment as personalized
from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = clustered.add_config(personalized.add_config(base_config()))
  config.algorithm = "fedper"
  config.num_rounds = 20
  config.eval_every = 5

  # Input: the 4 natural sites, pooled z-scoring.
  config.dataset.name = "heart_disease"
  config.dataset.normalize = "pooled"

  # Model: body_0 (representation) + head (FedPer keeps the head, LG-FedAvg the body).
  config.model.name = "mlp"
  config.model.hidden = (16,)

  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.05
  config.client.batch_size = 8
  config.client.num_epochs = 0
  config.client.num_steps = 20

  config.clustering.num_clusters = 2  # 4 hospitals: at most 2 groups of 2
  config.clustering.cfl_warmup_rounds = 5
  config.personalization.apfl_alpha = 0.25
  config.personalization.ditto_lambda = 0.1
  config.personalization.finetune_epochs = 1
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 2
    config.client.num_steps = 3
    config.clustering.cfl_warmup_rounds = 1
  return config
