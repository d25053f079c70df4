"""Transfer splits: alignment of the parties' rows and clear errors on bad input."""

import numpy as np
import pytest

from fedjax_health.transfer import data as tdata


@pytest.fixture(scope="module")
def arrays():
  return tdata.heart_disease_arrays()


def test_heart_disease_split_aligns_the_overlap(arrays):
  xtr, ytr, xte, yte = arrays
  split = tdata.heart_disease_split(30, seed=3, arrays=arrays)
  n = split.n_overlap
  assert n == 30 and split.x_a.shape == (xtr.shape[0], len(tdata.A_FEATURES))
  assert split.x_b.shape == (30 + xte.shape[0], len(tdata.B_FEATURES))
  np.testing.assert_array_equal(split.ids_a[:n], split.ids_b[:n])
  cols_a = tdata.feature_columns(tdata.A_FEATURES, "a")
  cols_b = tdata.feature_columns(tdata.B_FEATURES, "b")
  np.testing.assert_array_equal(split.x_a, xtr[split.ids_a][:, cols_a])
  np.testing.assert_array_equal(split.x_b[:n], xtr[split.ids_a[:n]][:, cols_b])  # same patients, B's columns
  np.testing.assert_array_equal(split.y_a, ytr[split.ids_a])
  # B's targets: the test patients, never seen by A, with their true labels.
  assert not np.isin(split.ids_b[n:], split.ids_a).any()
  np.testing.assert_array_equal(split.y_b_eval, yte)
  assert set(tdata.A_FEATURES).isdisjoint(tdata.B_FEATURES)
  # The seed draws the overlap.
  assert not np.array_equal(tdata.heart_disease_split(30, seed=4, arrays=arrays).ids_a[:30], split.ids_a[:30])


def test_general_loader_orders_overlap_first():
  x_a, y_a = np.arange(8.0).reshape(4, 2), np.array([0, 1, 1, 0])
  x_b = np.arange(9.0).reshape(3, 3)
  split = tdata.make_transfer_data(x_a, y_a, ["p1", "p2", "p3", "p4"], x_b, ["q9", "p3", "p1"])
  assert split.n_overlap == 2
  np.testing.assert_array_equal(split.ids_a[:2], split.ids_b[:2])
  assert list(split.ids_b[2:]) == ["q9"]
  np.testing.assert_array_equal(split.x_b[2], x_b[0])


def test_bad_inputs_name_the_field(arrays):
  x_a, y_a, x_b = np.zeros((3, 2)), np.array([0, 1, 0]), np.zeros((2, 2))
  with pytest.raises(ValueError, match="overlap_ids is empty"):
    tdata.make_transfer_data(x_a, y_a, [1, 2, 3], x_b, [7, 8])
  with pytest.raises(ValueError, match="absent from ids_b"):
    tdata.make_transfer_data(x_a, y_a, [1, 2, 3], x_b, [1, 8], overlap_ids=[1, 2])
  with pytest.raises(ValueError, match="ids_a has duplicate"):
    tdata.make_transfer_data(x_a, y_a, [1, 1, 3], x_b, [1, 8])
  with pytest.raises(ValueError, match="ids_b must be 1-D with one id per row"):
    tdata.make_transfer_data(x_a, y_a, [1, 2, 3], x_b, [1])
  with pytest.raises(ValueError, match="y_a must hold binary"):
    tdata.make_transfer_data(x_a, np.array([0, 2, 1]), [1, 2, 3], x_b, [1, 8])
  with pytest.raises(ValueError, match=r"transfer.features_a names unknown columns \['cholesterol'\]"):
    tdata.heart_disease_split(10, 0, features_a=("age", "cholesterol"), arrays=arrays)
  with pytest.raises(ValueError, match="transfer.overlap must be in"):
    tdata.heart_disease_split(0, 0, arrays=arrays)
