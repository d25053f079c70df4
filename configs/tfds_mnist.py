"""FedAvg on any tfds image dataset (default MNIST) split across 10 clients by Dirichlet(0.5) label skew.

Reads the data with ``tfds.data_source`` (array_record files, no TensorFlow); prepare them once
(docs/tfds.md): ``pip install tensorflow tensorflow-datasets && tfds build mnist
--file_format=array_record``. Small CNN, 20 rounds of 1 local epoch; ~10 min on 2 CPUs for MNIST.
Any other tfds image dataset by name, e.g. histopathology patches:
``--config.dataset.tfds_name=patch_camelyon --config.dataset.num_clients=20``; variable-size images
need ``--config.dataset.image_size=64``. The smoke variant reads tfds's mock data (random examples
of MNIST's feature spec), so it needs neither network nor prepared files.

  python -m launch.main --config=configs/tfds_mnist.py --workdir=workdir/tfds_mnist
  python -m launch.main --config=configs/tfds_mnist.py:smoke --workdir=/tmp/tfds_mnist
"""

from fedjax_health.config_base import base_config
from fedjax_health.data.tfds_data import dataset_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "fedavg"
  config.num_rounds = 20

  # Input: tfds_data.dataset_config() holds every tfds field with its default.
  config.dataset = dataset_config()
  config.dataset.tfds_name = "mnist"
  config.dataset.num_clients = 10
  config.dataset.partition = "dirichlet"
  config.dataset.alpha = 0.5

  config.model.name = "cnn"
  config.model.features = (16, 32)
  config.model.dense = 64
  config.client.learning_rate = 0.05
  config.client.batch_size = 32
  config.client.num_epochs = 1
  if arg == "smoke":
    config.num_rounds = 2
    config.dataset.mock_examples = 64  # tfds.testing.mock_data: no download
    config.dataset.num_clients = 4
    # The tfds path end to end at the least compile time (CI); the CNN itself is exercised by
    # breastmnist_dirichlet.py:smoke.
    config.model.name = "logreg"
    config.client.unroll = False
  return config
