import numpy as np
import pytest

from fedjax_health.data import medmnist, synthetic


@pytest.mark.parametrize("subset, shape, classes", [("breastmnist", (28, 28, 1), 2), ("retinamnist", (28, 28, 3), 5)])
def test_load_split_across_clinics(subset, shape, classes):
  data = medmnist.load(subset, num_clients=8, partition="dirichlet", alpha=0.5, seed=0)
  assert data.input_shape == shape and data.num_classes == classes
  n_train = {"breastmnist": 546, "retinamnist": 1080}[subset]
  n_test = {"breastmnist": 156, "retinamnist": 400}[subset]
  assert data.train.num_examples == n_train and data.test.num_examples == n_test
  assert data.train.num_clients == data.test.num_clients == 8
  assert 0.0 <= data.train.x.min() and data.train.x.max() <= 1.0
  # each clinic's test label mix follows its train label mix
  for c in range(8):
    tr = np.bincount(data.train.client(c)["y"], minlength=classes) / max(data.train.client_sizes[c], 1)
    te = np.bincount(data.test.client(c)["y"], minlength=classes) / max(data.test.client_sizes[c], 1)
    if data.test.client_sizes[c] >= 10:
      assert np.abs(tr - te).max() < 0.25


def test_bad_subset_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match="subset"):
    medmnist.load("pathmnist")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    medmnist.load("breastmnist", path=str(tmp_path / "nope.npz"))
  with pytest.raises(ValueError, match="partition"):
    medmnist.load("breastmnist", partition="random")


def test_synthetic_shapes_and_planted_clusters():
  data = synthetic.load(30, alpha=0.5, beta=0.5, seed=1, sizes=np.full(30, 40), num_clusters=3)
  assert data.train.num_clients == 30 and data.input_shape == (60,)
  np.testing.assert_array_equal(data.train.client_sizes, np.full(30, 32))
  np.testing.assert_array_equal(data.client_meta["cluster"], np.arange(30) % 3)
  assert data.train.y.max() < 10


def test_synthetic_default_sizes_are_heavy_tailed():
  data = synthetic.load(200, seed=0)
  sizes = data.train.client_sizes + data.test.client_sizes
  assert sizes.min() >= 50 and sizes.max() <= 500 and np.median(sizes) < sizes.max()
