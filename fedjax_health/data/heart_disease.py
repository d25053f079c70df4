"""Fed-Heart-Disease: UCI Heart Disease from 4 hospitals, with FLamby's preprocessing.

Data: Janosi, Steinbrunn, Pfisterer & Detrano (1989), UCI ML Repository, CC BY 4.0
(https://doi.org/10.24432/C52P4X); see ``files/DATA_README.md`` for provenance and checksums.
Preprocessing follows FLamby (du Terrail et al., NeurIPS 2022 Datasets & Benchmarks):
drop slope/ca/thal, drop rows with any missing value, label ``num > 0``, one-hot ``cp`` and
``restecg`` with drop_first (13 features), per-centre 66/34 train/test split with sklearn's
``train_test_split(random_state=43)`` (stratified when both classes have > 2 rows), and z-scoring
with train statistics (per centre by default, pooled for the centralised baseline).
"""

from __future__ import annotations

import os
from importlib import resources

import numpy as np

from fedjax_health.data.federated import FederatedData, from_client_arrays

CENTERS = ("cleveland", "hungarian", "switzerland", "va")
COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
           "slope", "ca", "thal", "num")
DROPPED = (10, 11, 12)  # slope, ca, thal
FEATURE_NAMES = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
                 "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")
NUM_FEATURES = len(FEATURE_NAMES)
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43


def default_data_dir() -> str:
  return str(resources.files("fedjax_health.data") / "files" / "heart_disease")


def read_center_file(path: str) -> np.ndarray:
  """Returns the ``[rows, 14]`` float array of one UCI file, ``?`` as NaN; errors name file:line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"heart disease data file not found: {path}")
  rows = []
  with open(path, "rb") as f:
    raw = f.read()
  if b"\0" in raw:
    raise ValueError(f"{path}: binary data, not the UCI text format (comma-separated numbers, '?' for missing)")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); expected the UCI text format") from None
  for lineno, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line:
      continue
    fields = line.split(",")
    if len(fields) != len(COLUMNS):
      raise ValueError(f"{path}:{lineno}: expected {len(COLUMNS)} comma-separated fields, got {len(fields)}")
    try:
      row = [np.nan if v.strip() == "?" else float(v) for v in fields]
    except ValueError as e:
      raise ValueError(f"{path}:{lineno}: malformed value ({e})") from None
    if any(np.isinf(row)):
      raise ValueError(f"{path}:{lineno}: infinite value in column {COLUMNS[int(np.flatnonzero(np.isinf(row))[0])]!r}")
    num = row[COLUMNS.index("num")]
    if not np.isnan(num) and (num < 0 or num != int(num)):
      raise ValueError(f"{path}:{lineno}: label column 'num' must be a diagnosis 0-4 (or '?'), got {num!r}")
    rows.append(row)
  if not rows:
    raise ValueError(f"{path}: no data rows")
  return np.asarray(rows, dtype=np.float64)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
  # Same algorithm and random draws as sklearn.utils._approximate_mode.
  continuous = class_counts / class_counts.sum() * n_draws
  floored = np.floor(continuous)
  need_to_add = int(n_draws - floored.sum())
  if need_to_add > 0:
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
      (inds,) = np.where(remainder == value)
      add_now = min(len(inds), need_to_add)
      inds = rng.choice(inds, size=add_now, replace=False)
      floored[inds] += 1
      need_to_add -= add_now
      if need_to_add == 0:
        break
  return floored.astype(int)


def sklearn_train_test_split(n: int, train_size: float, seed: int, stratify: np.ndarray | None):
  """Returns (train_idx, test_idx) identical to sklearn's ``train_test_split(np.arange(n), ...)``.

  Reimplemented with numpy's legacy RandomState so the package needs no scikit-learn; the test
  suite checks equality against scikit-learn itself.
  """
  n_test = int(np.ceil((1.0 - train_size) * n))
  n_train = int(np.floor(train_size * n))
  rng = np.random.RandomState(seed)
  if stratify is None:
    perm = rng.permutation(n)
    return perm[n_test:n_test + n_train], perm[:n_test]
  classes, y_idx = np.unique(stratify, return_inverse=True)
  class_counts = np.bincount(y_idx)
  class_indices = np.split(np.argsort(y_idx, kind="mergesort"), np.cumsum(class_counts)[:-1])
  n_i = _approximate_mode(class_counts, n_train, rng)
  t_i = _approximate_mode(class_counts - n_i, n_test, rng)
  train, test = [], []
  for i in range(len(classes)):
    perm_i = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
    train.extend(perm_i[:n_i[i]])
    test.extend(perm_i[n_i[i]:n_i[i] + t_i[i]])
  return rng.permutation(train), rng.permutation(test)


def _encode(raw: np.ndarray) -> np.ndarray:
  kept = np.delete(raw[:, :13], DROPPED, axis=1)  # 10 attributes, cp at 2, restecg at 6
  cp, restecg = kept[:, 2], kept[:, 6]
  plain = np.delete(kept, [2, 6], axis=1)
  dummies = np.stack([cp == 2, cp == 3, cp == 4, restecg == 1, restecg == 2], axis=1)
  return np.concatenate([plain, dummies.astype(np.float64)], axis=1)


def load_center(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Returns unnormalised (x_train, y_train, x_test, y_test) of one centre, FLamby's split."""
  raw = read_center_file(path)
  keep_cols = [i for i in range(14) if i not in DROPPED]
  complete = ~np.isnan(raw[:, keep_cols]).any(axis=1)
  if np.isnan(raw[:, 13]).all():
    raise ValueError(f"{path}: every label ('num', column 14) is missing ('?')")
  if complete.sum() < 2:
    raise ValueError(f"{path}: {complete.sum()} of {len(raw)} rows are complete (rows with '?' outside "
                     f"slope/ca/thal are dropped, as in FLamby); need at least 2 for a train/test split")
  raw = raw[complete]
  y = (raw[:, 13] > 0).astype(np.int32)
  x = _encode(raw)
  levels, counts = np.unique(y, return_counts=True)
  stratify = y if len(levels) > 1 and np.all(counts > 2) else None
  tr, te = sklearn_train_test_split(len(y), TRAIN_FRACTION, SPLIT_SEED, stratify)
  return x[tr], y[tr], x[te], y[te]


def load(data_dir: str | None = None, normalize: str = "per_center", pooled: bool = False) -> FederatedData:
  """Returns Fed-Heart-Disease with 4 hospital clients (or one pooled client).

  Args:
    data_dir: folder with ``processed.{cleveland,hungarian,switzerland,va}.data``.
    normalize: ``per_center`` (each hospital z-scores with its own train statistics, as in
      FLamby's federated runs), ``pooled`` (statistics of all train rows), or ``none``.
    pooled: return a single client holding all four centres' rows (centralised baseline);
      the test split keeps its 4 clients so evaluation stays per hospital.
  """
  if normalize not in ("per_center", "pooled", "none"):
    raise ValueError(f"normalize must be 'per_center', 'pooled' or 'none', got {normalize!r}")
  data_dir = data_dir or default_data_dir()
  parts = [load_center(os.path.join(data_dir, f"processed.{c}.data")) for c in CENTERS]
  if normalize == "pooled":
    all_train = np.concatenate([p[0] for p in parts])
    stats = [(all_train.mean(0), all_train.std(0))] * len(parts)
  elif normalize == "per_center":
    stats = [(p[0].mean(0), p[0].std(0)) for p in parts]
  else:
    stats = [(0.0, 1.0)] * len(parts)
  train, test = [], []
  for (xtr, ytr, xte, yte), (mu, sd) in zip(parts, stats):
    train.append({"x": ((xtr - mu) / (sd + 1e-9)).astype(np.float32), "y": ytr})
    test.append({"x": ((xte - mu) / (sd + 1e-9)).astype(np.float32), "y": yte})
  train_ds = from_client_arrays(train, CENTERS)
  test_ds = from_client_arrays(test, CENTERS)
  if pooled:
    train_ds = train_ds.pooled()
  name = "heart_disease_pooled" if pooled else "heart_disease"
  return FederatedData(train=train_ds, test=test_ds, num_classes=2, name=name)
