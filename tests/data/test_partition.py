import numpy as np
import pytest

from fedjax_health.data import partition


def _check_is_partition(order, offsets, n, num_clients):
  assert offsets.shape == (num_clients + 1,) and offsets[0] == 0 and offsets[-1] == n
  np.testing.assert_array_equal(np.sort(order), np.arange(n))


def _label_entropy(labels, order, offsets):
  ents = []
  for c in range(len(offsets) - 1):
    y = labels[order[offsets[c]:offsets[c + 1]]]
    p = np.bincount(y, minlength=labels.max() + 1) / max(len(y), 1)
    p = p[p > 0]
    ents.append(-(p * np.log(p)).sum())
  return np.mean(ents)


def test_natural_groups_by_id():
  order, offsets = partition.natural(np.array([2, 0, 2, 1, 0]))
  np.testing.assert_array_equal(offsets, [0, 2, 3, 5])
  np.testing.assert_array_equal(order, [1, 4, 3, 0, 2])


def test_dirichlet_is_a_partition_and_skew_grows_as_alpha_shrinks():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 5000)
  ent = {}
  for alpha in (0.1, 1.0, 100.0):
    order, offsets = partition.dirichlet_label_skew(labels, 20, alpha, np.random.default_rng(1))
    _check_is_partition(order, offsets, len(labels), 20)
    ent[alpha] = _label_entropy(labels, order, offsets)
  assert ent[0.1] < ent[1.0] < ent[100.0]
  assert ent[100.0] > 0.95 * np.log(10)  # near IID


def test_dirichlet_rejects_bad_alpha():
  with pytest.raises(ValueError, match="alpha must be > 0"):
    partition.dirichlet_label_skew(np.zeros(10, int), 2, 0.0, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["lognormal", "power_law"])
def test_quantity_skew_sizes(kind):
  order, offsets = partition.quantity_skew(10000, 100, np.random.default_rng(0), kind=kind, min_size=5)
  _check_is_partition(order, offsets, 10000, 100)
  sizes = np.diff(offsets)
  assert sizes.min() >= 5
  assert sizes.max() > 4 * np.median(sizes)  # heavy tail


def test_pathological_shards_few_labels_per_client():
  labels = np.repeat(np.arange(10), 100)
  order, offsets = partition.pathological_shards(labels, 50, 2, np.random.default_rng(0))
  _check_is_partition(order, offsets, 1000, 50)
  for c in range(50):
    assert len(np.unique(labels[order[offsets[c]:offsets[c + 1]]])) <= 2


def test_iid_equal_sizes():
  order, offsets = partition.iid(103, 10, np.random.default_rng(0))
  _check_is_partition(order, offsets, 103, 10)
  assert set(np.diff(offsets).tolist()) == {10, 11}


def test_apply_partition_with_feature_shift():
  arrays = {"x": np.zeros((6, 2), np.float32), "y": np.arange(6)}
  ds = partition.apply_partition(arrays, (np.array([5, 4, 3, 2, 1, 0]), np.array([0, 2, 6])),
                                 feature_shift=lambda x, c: x + c + 1)
  np.testing.assert_array_equal(ds.y, [5, 4, 3, 2, 1, 0])
  np.testing.assert_array_equal(ds.x[:, 0], [1, 1, 2, 2, 2, 2])


def test_too_many_clients_is_an_error():
  with pytest.raises(ValueError, match="num_clients"):
    partition.iid(5, 6, np.random.default_rng(0))
