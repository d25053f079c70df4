"""MedMNIST v2 (BreastMNIST, RetinaMNIST, 28x28) split across clinics by a partitioner.

Data: Yang et al., "MedMNIST v2", Scientific Data 10, 41 (2023), CC BY 4.0; BreastMNIST from
Al-Dhabyani et al. (2020, BUSI), RetinaMNIST from Liu et al. (2022, DeepDRiD). Provenance and
checksums: ``files/DATA_README.md``.

Each clinic gets a train split (from MedMNIST's train split, by the partitioner) and a test split
(from MedMNIST's test split) whose label mix follows that clinic's train label mix, so that each
clinic is evaluated on data like its own. MedMNIST's val split is kept whole as the server's
held-out set.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Callable

import numpy as np

from fedjax_health.data import partition as part
from fedjax_health.data.federated import FederatedData, FederatedDataset

SUBSETS = {"breastmnist": 2, "retinamnist": 5}


def default_path(subset: str) -> str:
  return str(resources.files("fedjax_health.data") / "files" / "medmnist" / f"{subset}.npz")


def load_arrays(subset: str, path: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Returns {split: (x float32 [N,28,28,C] in [0,1], y int32 [N])} for train/val/test."""
  if subset not in SUBSETS:
    raise ValueError(f"MedMNIST subset must be one of {sorted(SUBSETS)}, got {subset!r}")
  path = path or default_path(subset)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"MedMNIST file not found: {path}")
  try:
    f = np.load(path, allow_pickle=False)
  except Exception as e:  # a truncated file, a non-zip file, a pickle: numpy raises several types
    raise ValueError(f"{path}: not a readable MedMNIST .npz file ({type(e).__name__}: {e})") from None
  if not hasattr(f, "files"):
    raise ValueError(f"{path}: a single .npy array, not a MedMNIST .npz archive of train/val/test arrays")
  with f:
    out = {}
    for split in ("train", "val", "test"):
      for key in (f"{split}_images", f"{split}_labels"):
        if key not in f:
          raise ValueError(f"{path}: missing array {key!r}")
      try:
        images, labels = f[f"{split}_images"], f[f"{split}_labels"]
      except Exception as e:  # a truncated member, a bad CRC, an object array
        raise ValueError(f"{path}: cannot read {split}_images/{split}_labels ({type(e).__name__}: {e})") from None
      out[split] = _checked_split(path, split, images, labels, SUBSETS[subset])
  return out


def _checked_split(path: str, split: str, images: np.ndarray, labels: np.ndarray, num_classes: int):
  """Returns (x float32 [N,H,W,C] in [0, 1], y int32 [N]); errors name the file and array."""
  if images.ndim not in (3, 4):
    raise ValueError(f"{path}: {split}_images must be [N, height, width] or [N, height, width, channels], "
                     f"got shape {images.shape}")
  if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
    raise ValueError(f"{path}: {split}_images must be numbers, got dtype {images.dtype}")
  labels = labels.reshape(len(labels), -1) if labels.ndim > 1 else labels
  if labels.ndim == 2 and labels.shape[1] != 1:
    raise ValueError(f"{path}: {split}_labels must hold one class id per image, got shape {labels.shape}")
  labels = labels.reshape(-1)
  if len(labels) != len(images):
    raise ValueError(f"{path}: {split}_images has {len(images)} images but {split}_labels has {len(labels)} labels")
  if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
    raise ValueError(f"{path}: {split}_labels must be integer class ids, got dtype {labels.dtype}")
  bad = ~np.isfinite(labels) if np.issubdtype(labels.dtype, np.floating) else np.zeros(len(labels), bool)
  bad |= (np.nan_to_num(labels) != np.round(np.nan_to_num(labels))) | (np.nan_to_num(labels) < 0)
  bad |= np.nan_to_num(labels) >= num_classes
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"{path}: {split}_labels must be class ids in [0, {num_classes}), found {labels[i]!r} "
                     f"at index {i}")
  x = images.astype(np.float32) / 255.0
  if np.issubdtype(images.dtype, np.floating):
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
      raise ValueError(f"{path}: {split}_images holds NaN or inf pixels (first in image {int(np.flatnonzero(~finite)[0])})")
  if x.ndim == 3:
    x = x[..., None]
  return x, labels.astype(np.int32)
  return out


def follow_label_mix(train_labels_by_client: list[np.ndarray], test_labels: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Splits test examples so each client's test label mix follows its train label mix.

  For each class, its test examples are divided among clients in proportion to how many train
  examples of that class each client holds. Returns (order, offsets).
  """
  num_clients = len(train_labels_by_client)
  assign = np.empty(len(test_labels), dtype=np.int64)
  for k in np.unique(test_labels):
    idx = np.flatnonzero(test_labels == k)
    idx = idx[rng.permutation(len(idx))]
    counts = np.array([np.sum(l == k) for l in train_labels_by_client], dtype=np.float64)
    p = counts / counts.sum() if counts.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
    cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(int)
    for c, chunk in enumerate(np.split(idx, cuts)):
      assign[chunk] = c
  order = np.argsort(assign, kind="stable")
  counts = np.bincount(assign, minlength=num_clients)
  return order, np.concatenate([[0], np.cumsum(counts)])


def load(subset: str = "breastmnist", num_clients: int = 10, partition: str = "dirichlet", alpha: float = 0.5,
         seed: int = 0, path: str | None = None, shards_per_client: int = 2,
         feature_shift: Callable[[np.ndarray, int], np.ndarray] | None = None) -> FederatedData:
  """Returns MedMNIST ``subset`` split across ``num_clients`` clinics.

  Args:
    partition: ``dirichlet`` (label skew, ``alpha``), ``iid``, ``quantity`` (lognormal sizes) or
      ``shards`` (pathological, ``shards_per_client``).
    feature_shift: optional ``f(x_client, c) -> x_client`` applied to both splits of clinic c.
  """
  arrays = load_arrays(subset, path)
  x_tr, y_tr = arrays["train"]
  x_te, y_te = arrays["test"]
  rng = np.random.default_rng(seed)
  if partition == "dirichlet":
    p = part.dirichlet_label_skew(y_tr, num_clients, alpha, rng, min_size=2)
  elif partition == "iid":
    p = part.iid(len(y_tr), num_clients, rng)
  elif partition == "quantity":
    p = part.quantity_skew(len(y_tr), num_clients, rng, min_size=2)
  elif partition == "shards":
    p = part.pathological_shards(y_tr, num_clients, shards_per_client, rng)
  else:
    raise ValueError(f"partition must be one of dirichlet, iid, quantity, shards; got {partition!r}")
  ids = tuple(f"clinic_{c}" for c in range(num_clients))
  train = part.apply_partition({"x": x_tr, "y": y_tr}, p, ids, feature_shift)
  by_client = [train.client(c)["y"] for c in range(num_clients)]
  test = part.apply_partition({"x": x_te, "y": y_te}, follow_label_mix(by_client, y_te, rng), ids, feature_shift)
  x_val, y_val = arrays["val"]
  return FederatedData(train=train, test=test, num_classes=SUBSETS[subset], name=subset,
                       server_val={"x": x_val, "y": y_val})


def pooled_dataset(subset: str, path: str | None = None) -> FederatedDataset:
  """Returns MedMNIST's train split as one client (the centralised baseline)."""
  x, y = load_arrays(subset, path)["train"]
  return FederatedDataset({"x": x, "y": y}, np.array([0, len(y)]), ("pooled",))
