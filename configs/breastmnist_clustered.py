"""BreastMNIST over 8 clinics in 4 planted clusters (label mix + acquisition shift), judged per clinic.

Clinic c is in cluster c % 4 (2 clinics each); each cluster has its own label mix (Dirichlet(1.0)
over clusters per class) and its own simulated scanner: reference, low contrast + bright, blur +
noise, inverted polarity (``fedjax_health/data/shifts.py``). Small MLP, all clinics every round,
10 local steps of batch 16. Default IFCA; any clustered (multicenter, ifca, cfl) or personalised
(fedper, lg_fedavg, local_only, apfl, ditto, interpolation, finetune) method, or fedavg, with
``--config.algorithm``. ~10 s per method on a 2-core CPU (mostly compilation).

  python -m launch.main --config=configs/breastmnist_clustered.py --workdir=workdir/breast_ifca
  python -m launch.main --config=configs/breastmnist_clustered.py --config.algorithm=fedper \
      --workdir=workdir/breast_fedper
  python -m launch.main --config=configs/breastmnist_clustered.py:smoke --workdir=/tmp/breast_cl
"""

from configs import retinamnist_clustered


def get_config(arg: str = ""):
  config = retinamnist_clustered.get_config(arg)  # same method settings; only the input differs
  # Input: 8 clinics, 4 planted clusters.
  config.dataset.name = "breastmnist_clustered"
  config.dataset.num_clients = 8
  return config
