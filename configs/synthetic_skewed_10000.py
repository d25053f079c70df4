"""Cross-device FedAvg on 10,000 devices with lognormal sizes (sigma 1, mean 20), 1,000 per round.

Synthetic(1, 1) of Li et al. (60 features, 10 classes) split by the quantity-skew partitioner
(lognormal sigma 1, mean 20 examples, at least 2), MLP 60-100-10, 1 local epoch of batch 10. The
round's cost follows the 1,000 sampled devices' own steps (step buckets), and FedAvg's mean is
accumulated streaming, so memory is set by the chunk and the data, not by the cohort. Train
sizes run from 1 to 288 (mean 16; up to 29 steps). Run time of the full config: not measured yet
(the shared CPU was overloaded when it was written); ``:smoke`` runs in ``tests/test_launch.py``.

  python -m launch.main --config=configs/synthetic_skewed_10000.py --workdir=workdir/skewed_10000
  python -m launch.main --config=configs/synthetic_skewed_10000.py:smoke --workdir=/tmp/skewed_smoke
"""

from configs import synthetic_skewed_1000


def get_config(arg: str = ""):
  config = synthetic_skewed_1000.get_config(arg)  # same data generator, model and client; scale differs
  config.num_rounds = 20
  config.eval_every = 5
  config.cohort_size = 1000
  config.dataset.num_clients = 10000  # lognormal sizes, 20 examples on average
  config.dataset.size_sigma = 1.0
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 1
    config.dataset.num_clients = 200
    config.cohort_size = 50
  return config
