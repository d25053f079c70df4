"""Model heterogeneity on Fed-Heart-Disease: three hospitals, three architectures, Cleveland public.

Cleveland (all 303 rows) is held out as the server's labelled public set (FedMD's transfer
learning and consensus, FedDF's unlabelled distillation data); Hungary, Switzerland and VA are the
clients, one per architecture (round robin): logreg (linear), MLP 13-13, MLP 13-32-13. The MLPs
end in 13 units so every model's embedding (the head's input; the 13 z-scored features for the linear
logreg) has one size, as FedProto needs. Every hospital trains every round, 20 rounds of 20 SGD
steps of batch 8; each hospital's own model is judged on its own test split. One run took 50-250 s
wall on a shared 2-core CPU (load ~20), mostly compilation. Default FedProto; any of fedmd, fd,
feddf, fedproto, hetero_local, hetero_fedavg
(FedAvg within each architecture) with ``--config.algorithm``; ``fedavg`` trains ``config.model``
(the largest MLP) for all three, the homogeneous reference.

  python -m launch.main --config=configs/heart_disease_hetero.py --workdir=workdir/hd_fedproto
  python -m launch.main --config=configs/heart_disease_hetero.py --config.algorithm=fd --workdir=workdir/hd_fd
  python -m launch.main --config=configs/heart_disease_hetero.py:smoke --workdir=/tmp/hd_hetero
"""

from fedjax_health.config_base import base_config
from fedjax_health.heterogeneous import algorithms as hetero


def get_config(arg: str = ""):
  config = hetero.add_config(base_config())
  config.algorithm = "fedproto"
  config.num_rounds = 20
  config.eval_every = 5

  # Input: Cleveland held out whole as the public set; the other three hospitals are the clients.
  config.dataset.name = "heart_disease_public"
  config.dataset.normalize = "pooled"
  config.dataset.public_site = "cleveland"

  # Models: one architecture per hospital; config.model is the homogeneous reference for fedavg.
  config.hetero.model_groups = (
      {"name": "logreg", "binary_single_logit": False},
      {"name": "mlp", "hidden": (13,)},
      {"name": "mlp", "hidden": (32, 13)},
  )
  config.hetero.assignment = "round_robin"
  config.model.name = "mlp"
  config.model.hidden = (32, 13)

  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.05
  config.client.batch_size = 8
  config.client.num_epochs = 0
  config.client.num_steps = 20

  config.hetero.fd_weight = 1.0
  config.hetero.fd_temperature = 1.0
  config.hetero.proto_weight = 1.0
  config.hetero.fedmd_pretrain_epochs = 5
  config.hetero.fedmd_public_per_round = 64  # of Cleveland's 303 rows
  config.hetero.feddf_steps = 100
  config.hetero.feddf_batch_size = 32
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 2
    config.client.num_steps = 3
    config.hetero.fedmd_pretrain_epochs = 1
    config.hetero.feddf_steps = 4
    config.hetero.feddf_eval_every = 2
  return config
