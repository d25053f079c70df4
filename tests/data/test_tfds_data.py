"""tfds datasets: mock data (no network) and the shipped data prepared as array_record, no TensorFlow."""

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from fedjax_health.config_base import base_config  # noqa: E402
from fedjax_health.config_validation import validate_config  # noqa: E402
from fedjax_health.data import heart_disease, medmnist, registry  # noqa: E402
from fedjax_health.data import partition as part  # noqa: E402
from fedjax_health.data import tfds_data  # noqa: E402


def _cfg(**kw):
  cfg = tfds_data.dataset_config()
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _mock_split(name, split, n):
  """Reads a mocked split example by example, independently of the loader."""
  with tfds.testing.mock_data(num_examples=n):
    source = tfds.data_source(name, split=split, download=False)
    return [source[i] for i in range(len(source))]


def test_mock_image_dataset_is_partitioned_like_the_partitioner():
  cfg = _cfg(tfds_name="mnist", mock_examples=40, num_clients=4, alpha=0.5, partition_seed=1)
  data = registry.load_data(cfg, seed=2)
  examples = _mock_split("mnist", "train", 40)
  x = np.stack([e["image"] for e in examples]).astype(np.float32) / 255.0
  y = np.array([e["label"] for e in examples], np.int32)
  order, offsets = part.dirichlet_label_skew(y, 4, 0.5, np.random.default_rng(3), min_size=2)
  np.testing.assert_array_equal(data.train.offsets, offsets)
  np.testing.assert_array_equal(data.train.x, x[order])
  np.testing.assert_array_equal(data.train.y, y[order])
  assert data.input_shape == (28, 28, 1) and data.num_classes == 10 and data.name == "tfds:mnist"
  assert data.test.num_clients == 4 and data.test.num_examples == 40
  assert "tensorflow" not in sys.modules  # the whole path runs without TensorFlow


def test_mock_tabular_dataset_with_natural_clients():
  cfg = _cfg(tfds_name="penguins/simple", mock_examples=30, client_feature="island",
             train_split="train[:80%]", test_split="train[80%:]")
  data = registry.load_data(cfg, seed=0)
  examples = _mock_split("penguins/simple", "train[:80%]", 30)
  island = np.array([int(e["island"]) for e in examples])
  assert data.train.client_ids == tuple(["Biscoe", "Dream", "Torgersen"][i] for i in np.unique(island))
  np.testing.assert_array_equal(data.train.client_sizes, np.bincount(island)[np.unique(island)])
  # Inputs: the 4 measurements in name order, then sex one-hot (3 values); island is the client.
  raw = np.array([[e["body_mass_g"], e["culmen_depth_mm"], e["culmen_length_mm"], e["flipper_length_mm"]]
                  + list(np.eye(3)[int(e["sex"])]) for e in examples], np.float64)
  z = (raw - raw.mean(0)) / (raw.std(0) + 1e-9)
  for c, isl in enumerate(np.unique(island)):
    rows = np.flatnonzero(island == isl)
    np.testing.assert_allclose(data.train.client(c)["x"], z[rows], atol=1e-5)
    np.testing.assert_array_equal(data.train.client(c)["y"], [int(examples[i]["species"]) for i in rows])
  assert data.input_shape == (7,) and data.num_classes == 3


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_data"))


def test_shipped_heart_disease_through_tfds_equals_the_direct_loader(prepared_dir):
  cfg = _cfg(tfds_name="fed_heart_disease", client_feature="center", data_dir=prepared_dir)
  data = registry.load_data(cfg, seed=0)  # prepares array_record files from the package's copy
  ref = heart_disease.load(normalize="pooled")
  assert data.train.client_ids == ref.train.client_ids == heart_disease.CENTERS
  for split in ("train", "test"):
    a, b = getattr(data, split), getattr(ref, split)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_allclose(a.x, b.x, atol=1e-6)  # features stored as float32 before z-scoring
  assert "tensorflow" not in sys.modules


def test_shipped_breastmnist_through_tfds_equals_the_direct_loader(prepared_dir):
  cfg = _cfg(tfds_name="shipped_medmnist/breastmnist", data_dir=prepared_dir, num_clients=5,
             partition="dirichlet", alpha=0.3, val_split="val")
  data = registry.load_data(cfg, seed=4)
  ref = medmnist.load("breastmnist", num_clients=5, partition="dirichlet", alpha=0.3, seed=4)
  for split in ("train", "test"):
    a, b = getattr(data, split), getattr(ref, split)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
  np.testing.assert_array_equal(data.server_val["x"], ref.server_val["x"])


def test_missing_data_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"not prepared .*tfds build mnist --data_dir=.* --file_format=array_record"):
    registry.load_data(_cfg(tfds_name="mnist", data_dir=str(tmp_path)))


@pytest.mark.parametrize("field,value,message", [
    ("tfds_name", "no_such_dataset_xyz", "config.dataset.tfds_name='no_such_dataset_xyz' is not a tfds dataset"),
    ("label_key", "diagnosis", "config.dataset.label_key='diagnosis' is not a feature of 'mnist'"),
    ("client_feature", "hospital", "config.dataset.client_feature='hospital' is not a feature of 'mnist'"),
])
def test_bad_feature_names_fail_naming_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    registry.load_data(_cfg(mock_examples=8, **{field: value}))


def test_config_checks_name_the_field():
  config = base_config()
  config.dataset = tfds_data.dataset_config()
  validate_config(config)
  config.dataset.partition = "by_hospital"
  with pytest.raises(ValueError, match="config.dataset.partition must be one of"):
    validate_config(config)
  config = base_config()
  config.dataset.name = "tfds"  # base config without the tfds fields
  with pytest.raises(ValueError, match=r"config.dataset lacks the tfds fields \[.*'tfds_name'"):
    validate_config(config)
