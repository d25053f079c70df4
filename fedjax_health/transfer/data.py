"""Transfer splits: a labelled party A and an unlabelled party B with different features.

A general loader (``make_transfer_data``) builds the two parties from their own feature tables and
patient ids; the overlap is the set of ids both hold. ``heart_disease_split`` makes the split used
in the docs from the shipped Fed-Heart-Disease data (FLamby preprocessing, pooled z-scoring):

* party A ("clinic"): demographics and symptoms (``A_FEATURES``) and the diagnosis label, for the
  patients of the FLamby train split (486 rows of the four hospitals);
* party B ("exercise-test lab"): resting vitals, lab values, resting ECG and the exercise test
  (``B_FEATURES``), no labels, for ``overlap`` of A's patients (drawn with ``seed``) plus the
  patients of the FLamby test split (254 rows), which A never saw: B's non-overlapping patients
  are the transfer target, evaluated with their true labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_health.data import heart_disease

A_FEATURES = ("age", "sex", "cp_2", "cp_3", "cp_4")
B_FEATURES = ("trestbps", "chol", "fbs", "restecg_1", "restecg_2", "thalach", "exang", "oldpeak")


@dataclasses.dataclass(frozen=True)
class TransferData:
  """Two parties' rows, aligned on the overlap.

  Attributes:
    x_a: ``[N_A, F_A]`` party A's features, its overlapping patients first (``x_a[:n_overlap]``).
    y_a: ``[N_A]`` party A's labels in {0, 1}.
    x_b: ``[N_B, F_B]`` party B's features, overlapping patients first, in the same order as A's.
    y_b_eval: ``[N_B - n_overlap]`` true labels of B's non-overlapping rows (evaluation only;
      never used in training), or None.
    ids_a, ids_b: patient ids in the row order above.
    n_overlap: number of shared patients.
    features_a, features_b: column names.
  """

  x_a: np.ndarray
  y_a: np.ndarray
  x_b: np.ndarray
  y_b_eval: np.ndarray | None
  ids_a: np.ndarray
  ids_b: np.ndarray
  n_overlap: int
  features_a: tuple[str, ...]
  features_b: tuple[str, ...]

  @property
  def x_b_target(self) -> np.ndarray:
    """B's non-overlapping rows: the transfer target."""
    return self.x_b[self.n_overlap:]

  @property
  def y_overlap(self) -> np.ndarray:
    return self.y_a[:self.n_overlap]


def _check_ids(ids, n_rows: int, field: str) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.shape[0] != n_rows:
    raise ValueError(f"{field} must be 1-D with one id per row ({n_rows}), got shape {ids.shape}")
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f"{field} has duplicate ids")
  return ids


def make_transfer_data(x_a, y_a, ids_a, x_b, ids_b, overlap_ids=None, y_b_eval=None,
                       features_a=None, features_b=None) -> TransferData:
  """Returns the parties' rows reordered so the overlap comes first, in the same order for both.

  Args:
    x_a, y_a, ids_a: party A's features ``[N_A, F_A]``, labels ``[N_A]`` (0/1) and patient ids.
    x_b, ids_b: party B's features ``[N_B, F_B]`` and patient ids.
    overlap_ids: the shared patients; None = every id both parties hold. Each must be held by both.
    y_b_eval: optional labels of B's rows (in ``ids_b`` order), kept for its non-overlapping rows.
  """
  x_a, x_b = np.asarray(x_a, np.float32), np.asarray(x_b, np.float32)
  if x_a.ndim != 2 or x_b.ndim != 2:
    raise ValueError(f"x_a and x_b must be 2-D [rows, features], got {x_a.shape} and {x_b.shape}")
  y_a = np.asarray(y_a)
  if y_a.shape != (x_a.shape[0],):
    raise ValueError(f"y_a must have shape ({x_a.shape[0]},), got {y_a.shape}")
  if not np.all(np.isin(y_a, (0, 1))):
    raise ValueError("y_a must hold binary labels in {0, 1}")
  ids_a = _check_ids(ids_a, x_a.shape[0], "ids_a")
  ids_b = _check_ids(ids_b, x_b.shape[0], "ids_b")
  if overlap_ids is None:
    overlap_ids = ids_a[np.isin(ids_a, ids_b)]
  overlap_ids = np.asarray(overlap_ids)
  if overlap_ids.size == 0:
    raise ValueError("overlap_ids is empty: the parties share no patient, FTL needs at least one")
  if len(np.unique(overlap_ids)) != len(overlap_ids):
    raise ValueError("overlap_ids has duplicate ids")
  for field, ids in (("ids_a", ids_a), ("ids_b", ids_b)):
    missing = overlap_ids[~np.isin(overlap_ids, ids)]
    if missing.size:
      raise ValueError(f"overlap_ids holds {missing.size} ids absent from {field} (e.g. {missing[:3].tolist()}): "
                       "the parties' ids do not match")
  pos_a = {v: i for i, v in enumerate(ids_a.tolist())}
  pos_b = {v: i for i, v in enumerate(ids_b.tolist())}
  ov_a = np.array([pos_a[v] for v in overlap_ids.tolist()], np.int64)
  ov_b = np.array([pos_b[v] for v in overlap_ids.tolist()], np.int64)
  order_a = np.concatenate([ov_a, np.setdiff1d(np.arange(len(ids_a)), ov_a)])
  rest_b = np.setdiff1d(np.arange(len(ids_b)), ov_b)
  order_b = np.concatenate([ov_b, rest_b])
  if y_b_eval is not None:
    y_b_eval = np.asarray(y_b_eval)
    if y_b_eval.shape != (x_b.shape[0],):
      raise ValueError(f"y_b_eval must have shape ({x_b.shape[0]},), got {y_b_eval.shape}")
    y_b_eval = y_b_eval[rest_b]
  return TransferData(x_a[order_a], y_a[order_a].astype(np.int32), x_b[order_b], y_b_eval, ids_a[order_a],
                      ids_b[order_b], int(len(overlap_ids)), tuple(features_a or ()), tuple(features_b or ()))


def feature_columns(names, field: str) -> list[int]:
  """Returns the column indices of Fed-Heart-Disease features ``names``; unknown names raise."""
  names = tuple(names)
  if not names:
    raise ValueError(f"{field} must name at least one feature of {heart_disease.FEATURE_NAMES}")
  unknown = [n for n in names if n not in heart_disease.FEATURE_NAMES]
  if unknown:
    raise ValueError(f"{field} names unknown columns {unknown}; known: {heart_disease.FEATURE_NAMES}")
  if len(set(names)) != len(names):
    raise ValueError(f"{field} repeats a feature: {names}")
  return [heart_disease.FEATURE_NAMES.index(n) for n in names]


def heart_disease_arrays(data_dir: str | None = None):
  """Returns (x_train, y_train, x_test, y_test): all four hospitals, pooled z-scoring."""
  data = heart_disease.load(data_dir, normalize="pooled")
  return data.train.x, data.train.y, data.test.x, data.test.y


def heart_disease_split(overlap: int, seed: int, features_a=A_FEATURES, features_b=B_FEATURES,
                        data_dir: str | None = None, arrays=None) -> TransferData:
  """Returns the Fed-Heart-Disease transfer split with ``overlap`` shared patients (see module doc).

  ``arrays``: (x_train, y_train, x_test, y_test) already loaded (experiments reuse them).
  """
  cols_a = feature_columns(features_a, "transfer.features_a")
  cols_b = feature_columns(features_b, "transfer.features_b")
  xtr, ytr, xte, yte = arrays if arrays is not None else heart_disease_arrays(data_dir)
  n_train = xtr.shape[0]
  if not 1 <= overlap <= n_train:
    raise ValueError(f"transfer.overlap must be in [1, {n_train}] (party A's patients), got {overlap}")
  ids_a = np.arange(n_train)
  ids_test = n_train + np.arange(xte.shape[0])
  shared = np.random.default_rng(seed).choice(ids_a, size=overlap, replace=False)
  x_b = np.concatenate([xtr[shared][:, cols_b], xte[:, cols_b]])
  ids_b = np.concatenate([shared, ids_test])
  y_b = np.concatenate([ytr[shared], yte])
  return make_transfer_data(xtr[:, cols_a], ytr, ids_a, x_b, ids_b, overlap_ids=shared, y_b_eval=y_b,
                            features_a=features_a, features_b=features_b)
