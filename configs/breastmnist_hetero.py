"""Model heterogeneity on BreastMNIST: 6 clinics with label skew running a CNN or MLPs of two widths.

Same methods and models as ``configs/retinamnist_hetero.py`` (CNN 8-16/32, MLP 32, MLP 128-32,
round robin; public set: MedMNIST's labelled val split of 78 images, or ``public_source=other`` for
RetinaMNIST images converted to grey, unlabelled); 6 clinics by Dirichlet(0.5) label skew over
the 546 training images. Per-run wall times (compile + rounds + evaluation, per method) are in
the generated table of docs/model_heterogeneity.md.

  python -m launch.main --config=configs/breastmnist_hetero.py --workdir=workdir/breast_fedproto
  python -m launch.main --config=configs/breastmnist_hetero.py --config.algorithm=fd --workdir=workdir/breast_fd
  python -m launch.main --config=configs/breastmnist_hetero.py:smoke --workdir=/tmp/breast_hetero
"""

from configs import retinamnist_hetero


def get_config(arg: str = ""):
  config = retinamnist_hetero.get_config(arg)  # same methods and models; only the input differs
  config.dataset.name = "breastmnist_public"
  config.dataset.num_clients = 3 if arg == "smoke" else 6
  return config
