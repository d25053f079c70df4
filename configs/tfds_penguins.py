"""FedAvg on a tfds tabular dataset with a natural client feature: Palmer penguins, one client per island.

``penguins/simple`` has 4 body measurements and the sex of 344 penguins from 3 islands (Biscoe,
Dream, Torgersen); each island is a client (``client_feature="island"``), like a hospital in a
cross-silo federation. The test split is the last 20% of tfds's only split. Logistic regression on
the z-scored measurements + one-hot sex, 20 rounds of 50 local steps; seconds on a CPU.
Prepare once (docs/tfds.md; tabular, so no TensorFlow): ``pip install tensorflow-datasets && tfds build penguins/simple
--file_format=array_record`` (needs network), or ``--config.dataset.download=True``. The smoke
variant reads tfds's mock data (random examples of the same feature spec).

The shipped Fed-Heart-Disease through the same path (prepared from the package's files, no network):
``--config.dataset.tfds_name=fed_heart_disease --config.dataset.client_feature=center
--config.dataset.train_split=train --config.dataset.test_split=test``.

  python -m launch.main --config=configs/tfds_penguins.py --workdir=workdir/tfds_penguins
  python -m launch.main --config=configs/tfds_penguins.py:smoke --workdir=/tmp/tfds_penguins
"""

from fedjax_health.config_base import base_config
from fedjax_health.data.tfds_data import dataset_config


def get_config(arg: str = ""):
  config = base_config()
  config.algorithm = "fedavg"
  config.num_rounds = 20

  config.dataset = dataset_config()
  config.dataset.tfds_name = "penguins/simple"
  config.dataset.train_split = "train[:80%]"
  config.dataset.test_split = "train[80%:]"
  config.dataset.client_feature = "island"  # one client per island
  config.dataset.normalize = "pooled"

  config.model.name = "logreg"
  config.client.learning_rate = 0.05
  config.client.batch_size = 8
  config.client.num_steps = 50
  if arg == "smoke":
    config.num_rounds = 2
    config.client.num_steps = 5
    config.dataset.mock_examples = 30  # tfds.testing.mock_data: no download
  return config
