import os
import shutil

import numpy as np
import pytest

from fedjax_health.data import heart_disease


def test_flamby_row_counts_and_split():
  data = heart_disease.load()
  np.testing.assert_array_equal(data.train.client_sizes, [199, 172, 30, 85])
  np.testing.assert_array_equal(data.test.client_sizes, [104, 89, 16, 45])
  assert data.train.x.shape[1] == heart_disease.NUM_FEATURES == 13
  assert data.train.client_ids == heart_disease.CENTERS
  # label balance as in FLamby's README (train / test positive rates)
  pos = [data.train.client(c)["y"].mean() for c in range(4)]
  np.testing.assert_allclose(pos, [0.457, 0.378, 1.0, 0.776], atol=1e-3)


def test_rows_left_after_dropping_missing():
  for center, rows in zip(heart_disease.CENTERS, (303, 261, 46, 130)):
    xtr, _, xte, _ = heart_disease.load_center(os.path.join(heart_disease.default_data_dir(),
                                                            f"processed.{center}.data"))
    assert len(xtr) + len(xte) == rows


def test_split_equals_sklearn():
  model_selection = pytest.importorskip("sklearn.model_selection")
  rng = np.random.default_rng(0)
  for n, strat in [(303, True), (46, False), (130, True), (57, True)]:
    y = rng.integers(0, 2, n) if strat else None
    a, b = model_selection.train_test_split(np.arange(n), test_size=1 - 0.66, train_size=0.66, random_state=43,
                                            shuffle=True, stratify=y)
    a2, b2 = heart_disease.sklearn_train_test_split(n, 0.66, 43, y)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)


def test_normalisation_modes():
  per = heart_disease.load(normalize="per_center")
  for c in range(4):
    x = per.train.client(c)["x"]
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
  pooled = heart_disease.load(normalize="pooled")
  np.testing.assert_allclose(pooled.train.x.mean(0), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="normalize"):
    heart_disease.load(normalize="minmax")


def test_one_hot_columns_are_binary():
  raw = heart_disease.load(normalize="none")
  dummies = raw.train.x[:, 8:]
  assert set(np.unique(dummies).tolist()) <= {0.0, 1.0}


def test_malformed_row_names_file_and_line(tmp_path):
  for f in os.listdir(heart_disease.default_data_dir()):
    shutil.copy(os.path.join(heart_disease.default_data_dir(), f), tmp_path)
  bad = tmp_path / "processed.va.data"
  lines = bad.read_text().splitlines()
  lines[4] = "63,1,4,abc,0,0,2,150,0,1.0,?,?,?,1"
  bad.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"processed\.va\.data:5: malformed"):
    heart_disease.load(str(tmp_path))
  lines[4] = "63,1,4"
  bad.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"processed\.va\.data:5: expected 14"):
    heart_disease.load(str(tmp_path))


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="processed.cleveland.data"):
    heart_disease.load(str(tmp_path))
