"""Partitioners: split a centralised dataset across clients without copying per client.

Each partitioner returns ``(order, offsets)``: ``order`` is a permutation (or selection) of example
indices sorted by client, ``offsets`` the ``[num_clients + 1]`` boundaries. ``apply_partition``
turns that into a FederatedDataset with one gather.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from fedjax_health.data.federated import FederatedDataset

Partition = tuple[np.ndarray, np.ndarray]


def _check_num_clients(num_clients: int, n: int):
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if num_clients > n:
    raise ValueError(f"num_clients ({num_clients}) exceeds the number of examples ({n})")


def _from_assignment(assign: np.ndarray, num_clients: int, rng: np.random.Generator) -> Partition:
  """Sorts examples by assigned client (shuffled within each client)."""
  shuffle = rng.permutation(len(assign))
  order = shuffle[np.argsort(assign[shuffle], kind="stable")]
  counts = np.bincount(assign, minlength=num_clients)
  return order, np.concatenate([[0], np.cumsum(counts)])


def natural(group_ids: np.ndarray) -> Partition:
  """Partition by an existing id per example (site, user, device); clients in sorted id order."""
  group_ids = np.asarray(group_ids)
  uniq, inv = np.unique(group_ids, return_inverse=True)
  order = np.argsort(inv, kind="stable")
  counts = np.bincount(inv, minlength=len(uniq))
  return order, np.concatenate([[0], np.cumsum(counts)])


def iid(n: int, num_clients: int, rng: np.random.Generator) -> Partition:
  """Uniformly random equal-size split."""
  _check_num_clients(num_clients, n)
  perm = rng.permutation(n)
  sizes = np.full(num_clients, n // num_clients)
  sizes[: n % num_clients] += 1
  return perm, np.concatenate([[0], np.cumsum(sizes)])


def dirichlet_label_skew(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
                         min_size: int = 1, max_tries: int = 100) -> Partition:
  """Label skew: for each class, its examples are split across clients by p ~ Dir(alpha).

  The scheme of Hsu et al. 2019 / Yurochkin et al. 2019, redrawn until every client holds at
  least ``min_size`` examples (small alpha on few examples may otherwise leave clients empty).
  """
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  labels = np.asarray(labels).reshape(-1)
  _check_num_clients(num_clients, len(labels))
  classes = np.unique(labels)
  for _ in range(max_tries):
    assign = np.empty(len(labels), dtype=np.int64)
    for k in classes:
      idx = np.flatnonzero(labels == k)
      idx = idx[rng.permutation(len(idx))]
      p = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
      for c, part in enumerate(np.split(idx, cuts)):
        assign[part] = c
    if np.bincount(assign, minlength=num_clients).min() >= min_size:
      return _from_assignment(assign, num_clients, rng)
  raise ValueError(
      f"could not give every one of {num_clients} clients >= {min_size} examples with alpha={alpha} "
      f"in {max_tries} draws; raise alpha or lower num_clients")


def quantity_skew(n: int, num_clients: int, rng: np.random.Generator, kind: str = "lognormal",
                  sigma: float = 1.0, power: float = 1.5, min_size: int = 1) -> Partition:
  """Quantity skew: client sizes drawn from a lognormal or power law, data otherwise IID."""
  _check_num_clients(num_clients, n)
  if min_size * num_clients > n:
    raise ValueError(f"min_size * num_clients = {min_size * num_clients} exceeds {n} examples")
  if kind == "lognormal":
    if sigma <= 0:
      raise ValueError(f"sigma must be > 0, got {sigma}")
    w = rng.lognormal(0.0, sigma, num_clients)
  elif kind == "power_law":
    if power <= 0:
      raise ValueError(f"power must be > 0, got {power}")
    w = rng.pareto(power, num_clients) + 1.0
  else:
    raise ValueError(f"kind must be 'lognormal' or 'power_law', got {kind!r}")
  extra = n - min_size * num_clients
  sizes = min_size + np.floor(w / w.sum() * extra).astype(int)
  sizes[np.argsort(-w)[: n - sizes.sum()]] += 1  # hand out the rounding remainder
  perm = rng.permutation(n)
  return perm, np.concatenate([[0], np.cumsum(sizes)])


def pathological_shards(labels: np.ndarray, num_clients: int, shards_per_client: int,
                        rng: np.random.Generator) -> Partition:
  """McMahan et al. 2017: sort by label, cut into equal shards, give each client a few shards."""
  labels = np.asarray(labels).reshape(-1)
  _check_num_clients(num_clients, len(labels))
  if shards_per_client < 1:
    raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
  num_shards = num_clients * shards_per_client
  if num_shards > len(labels):
    raise ValueError(f"{num_shards} shards need at least that many examples, have {len(labels)}")
  by_label = np.argsort(labels, kind="stable")
  shards = np.array_split(by_label, num_shards)
  shard_perm = rng.permutation(num_shards)
  order, sizes = [], []
  for c in range(num_clients):
    mine = np.concatenate([shards[s] for s in shard_perm[c * shards_per_client:(c + 1) * shards_per_client]])
    order.append(mine)
    sizes.append(len(mine))
  return np.concatenate(order), np.concatenate([[0], np.cumsum(sizes)])


def apply_partition(arrays: Mapping[str, np.ndarray], partition: Partition, client_ids=None,
                    feature_shift: Callable[[np.ndarray, int], np.ndarray] | None = None) -> FederatedDataset:
  """Gathers ``arrays`` into client order; ``feature_shift(x_client, c)`` optionally alters inputs.

  The feature shift hook simulates per-client acquisition differences (scanner, contrast, ...).
  """
  order, offsets = partition
  out = {k: np.asarray(v)[order] for k, v in arrays.items()}
  if feature_shift is not None:
    x = out["x"].copy()
    for c in range(len(offsets) - 1):
      lo, hi = offsets[c], offsets[c + 1]
      x[lo:hi] = feature_shift(x[lo:hi], c)
    out["x"] = x
  return FederatedDataset(out, offsets, client_ids)
