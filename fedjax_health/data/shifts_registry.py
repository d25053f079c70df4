"""Wiring of the cluster-shifted MedMNIST datasets: registry entries and their config check.

The data transforms themselves (``ShiftSpec``, ``apply_shift``, ``load_clustered_medmnist``) are
in ``fedjax_health.data.shifts``, importable without the config machinery; this module registers
them as datasets ``<subset>_clustered`` and validates ``config.dataset`` for them (listed in
``fedjax_health/plugins.py``).
"""

from __future__ import annotations

from fedjax_health import config_validation
from fedjax_health.data import medmnist
from fedjax_health.data import registry as data_registry
from fedjax_health.data.federated import FederatedData
from fedjax_health.data.shifts import ACQUISITION_SHIFTS, load_clustered_medmnist


def _registry_loader(subset: str):
  def load(cfg, seed: int) -> FederatedData:
    return load_clustered_medmnist(subset, num_clients=cfg.num_clients, num_clusters=cfg.num_clusters,
                                   alpha=cfg.get("alpha", 1.0), seed=seed + cfg.get("partition_seed", 0),
                                   strength=cfg.get("shift_strength", 1.0), path=cfg.get("path") or None)
  return load


for _subset in medmnist.SUBSETS:
  data_registry.DATASETS[f"{_subset}_clustered"] = _registry_loader(_subset)


@config_validation.register_check
def check_clustered_dataset(config, data=None) -> None:
  """Validates ``config.dataset`` for the ``*_clustered`` MedMNIST datasets."""
  del data
  ds = config.dataset
  if not ds.name.endswith("_clustered"):
    return
  require = config_validation.require
  require(ds.num_clients >= 1, "dataset.num_clients", ">= 1", ds.num_clients)
  require(1 <= ds.get("num_clusters", 0) <= min(len(ACQUISITION_SHIFTS), ds.num_clients), "dataset.num_clusters",
          f"in [1, min({len(ACQUISITION_SHIFTS)}, dataset.num_clients={ds.num_clients})]", ds.get("num_clusters"))
  require(ds.alpha > 0, "dataset.alpha", "> 0", ds.alpha)
  require(ds.get("shift_strength", 1.0) >= 0, "dataset.shift_strength", ">= 0", ds.get("shift_strength"))
