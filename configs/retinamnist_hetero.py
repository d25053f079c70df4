"""Model heterogeneity on RetinaMNIST: 9 clinics with label skew running a CNN or MLPs of two widths.

Clinics get MedMNIST's train split by Dirichlet(0.5) label skew (test splits follow each clinic's
label mix); clinic c runs architecture c mod 3 (round robin): a small CNN (8, 16 filters, dense
32), an MLP 32 and an MLP 128-32, all with a 32-wide embedding for FedProto. Public set (server
held): MedMNIST's labelled val split (120 images), disjoint from every clinic's data; set
``--config.dataset.public_source=other`` for out-of-domain unlabelled BreastMNIST images converted
to RGB (FedDF only: FedMD needs labels). 15 rounds of 10 SGD steps of batch 16; each clinic's own
model is judged on its own test split. Compile-heavy: the CNN's local steps are unrolled (fast on
CPU once compiled); per-run wall times per method are in docs/model_heterogeneity.md (generated).
Default FedProto; any of fedmd, fd, feddf, fedproto, hetero_local, hetero_fedavg with
``--config.algorithm``; ``fedavg`` trains ``config.model`` (the CNN) everywhere.

  python -m launch.main --config=configs/retinamnist_hetero.py --workdir=workdir/retina_fedproto
  python -m launch.main --config=configs/retinamnist_hetero.py --config.algorithm=feddf --workdir=workdir/retina_feddf
  python -m launch.main --config=configs/retinamnist_hetero.py:smoke --workdir=/tmp/retina_hetero
"""

from fedjax_health.config_base import base_config
from fedjax_health.heterogeneous import algorithms as hetero


def get_config(arg: str = ""):
  config = hetero.add_config(base_config())
  config.algorithm = "fedproto"
  config.num_rounds = 15
  config.eval_every = 5

  # Input: label-skewed clinics plus MedMNIST's val split as the server's public set.
  config.dataset.name = "retinamnist_public"
  config.dataset.num_clients = 9
  config.dataset.partition = "dirichlet"
  config.dataset.alpha = 0.5
  config.dataset.public_source = "val"

  # Models: embedding width 32 everywhere (FedProto); config.model is the homogeneous reference.
  config.hetero.model_groups = (
      {"name": "cnn", "features": (8, 16), "dense": 32},
      {"name": "mlp", "hidden": (32,)},
      {"name": "mlp", "hidden": (128, 32)},
  )
  config.hetero.assignment = "round_robin"
  config.model.name = "cnn"
  config.model.features = (8, 16)
  config.model.dense = 32

  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.05
  config.client.batch_size = 16
  config.client.num_epochs = 0
  config.client.num_steps = 10

  config.hetero.fd_weight = 1.0
  config.hetero.proto_weight = 1.0
  config.hetero.fedmd_pretrain_epochs = 5
  config.hetero.fedmd_public_per_round = 0  # all public images every round
  config.hetero.feddf_steps = 50
  config.hetero.feddf_batch_size = 32
  config.hetero.feddf_eval_every = 5
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 2
    config.dataset.num_clients = 3
    config.client.num_steps = 2
    config.hetero.model_groups = (
        {"name": "cnn", "features": (2, 4), "dense": 8},
        {"name": "mlp", "hidden": (8,)},
        {"name": "mlp", "hidden": (16, 8)},
    )
    config.model.features = (2, 4)
    config.model.dense = 8
    config.hetero.fedmd_pretrain_epochs = 1
    config.hetero.feddf_steps = 4
    config.hetero.feddf_eval_every = 2
  return config
