"""Cross-device FedAvg on RetinaMNIST over 100 patients' phones with lognormal data sizes.

The 1,080 training fundus photos are split by the quantity-skew partitioner (``partition=quantity``:
lognormal sizes, sigma 1, at least 2 images per phone: 2 to 41, mean 10.8); 30 phones per round
train 2 local epochs of batch 5 of an MLP 2352-256-5 (1 to 17 local steps). Short clients take
the exact low-rank path, long ones the dense path, each in its own step bucket
(``fedjax_health/step_buckets.py``); ``--config.fast_path=off`` trains every phone dense and gives the
same model up to float rounding. Run time of the full config: not measured yet (the shared CPU
was overloaded when it was written); ``:smoke`` runs in ``tests/test_launch.py``.

  python -m launch.main --config=configs/retinamnist_phones_skewed.py --workdir=workdir/retina_phones
  python -m launch.main --config=configs/retinamnist_phones_skewed.py:smoke --workdir=/tmp/retina_phones
"""

from fedjax_health.config_base import base_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "fedavg"
  config.num_rounds = 100
  config.eval_every = 20
  config.cohort_size = 30

  # Input: 100 phones, lognormal sizes.
  config.dataset.name = "retinamnist"
  config.dataset.num_clients = 100
  config.dataset.partition = "quantity"

  # Model.
  config.model.name = "mlp"
  config.model.hidden = (256,)

  # Client: plain SGD, 2 epochs of batch 5 (1 to 17 steps per phone).
  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.05
  config.client.batch_size = 5
  config.client.num_epochs = 2
  if arg == "smoke":
    config.num_rounds = 2
    config.eval_every = 1
    config.cohort_size = 10
  return config
