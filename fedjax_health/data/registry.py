"""Dataset registry: a config's ``dataset.name`` picks the loader."""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedjax_health.data import heart_disease, medmnist, synthetic, tfds_data
from fedjax_health.data.federated import FederatedData


def _heart_disease(cfg, seed: int) -> FederatedData:
  del seed  # FLamby's split is fixed (random_state=43)
  return heart_disease.load(cfg.get("data_dir") or None, normalize=cfg.get("normalize", "pooled"))


def _medmnist(subset: str):
  def load(cfg, seed: int) -> FederatedData:
    return medmnist.load(subset, num_clients=cfg.num_clients, partition=cfg.get("partition", "dirichlet"),
                         alpha=cfg.get("alpha", 0.5), seed=seed + cfg.get("partition_seed", 0),
                         path=cfg.get("path") or None, shards_per_client=cfg.get("shards_per_client", 2))
  return load


def _synthetic(cfg, seed: int) -> FederatedData:
  n = cfg.num_clients
  per_client = cfg.get("samples_per_client", 0)
  sizes = np.full(n, per_client) if per_client > 0 else None
  if per_client > 0 and cfg.get("partition") == "quantity":  # lognormal sizes of mean samples_per_client
    from fedjax_health.data import partition
    _, offsets = partition.quantity_skew(n * per_client, n, np.random.default_rng(seed + cfg.get("partition_seed", 0)),
                                         sigma=cfg.get("size_sigma", 1.0), min_size=2)
    sizes = np.diff(offsets)
  return synthetic.load(n, alpha=cfg.get("alpha", 1.0), beta=cfg.get("beta", 1.0), seed=seed,
                        sizes=sizes, iid=cfg.get("iid", False), num_clusters=cfg.get("num_clusters", 0))


DATASETS: dict[str, Callable] = {
    "heart_disease": _heart_disease,
    "breastmnist": _medmnist("breastmnist"),
    "retinamnist": _medmnist("retinamnist"),
    "synthetic": _synthetic,
    "tfds": tfds_data.load,  # any tfds dataset by config.dataset.tfds_name (tfds_data.dataset_config())
}


def load_data(cfg, seed: int = 0) -> FederatedData:
  """Returns the FederatedData named by ``cfg.name`` (a ``config.dataset`` section)."""
  if cfg.name not in DATASETS:
    raise ValueError(f"config.dataset.name must be one of {sorted(DATASETS)}, got {cfg.name!r}")
  return DATASETS[cfg.name](cfg, seed)
