"""Synthetic(alpha, beta) of Li et al. 2020 (FedProx, MLSys), for any number of clients.

For client k: u_k ~ N(0, alpha), B_k ~ N(0, beta); W_k ~ N(u_k, 1) [10 x 60], b_k ~ N(u_k, 1);
v_k ~ N(B_k, 1) [60]; x ~ N(v_k, Sigma) with Sigma_jj = j^(-1.2); y = argmax(W_k x + b_k).
alpha controls how much the local models differ, beta how much the local inputs differ.
Client sizes follow a lognormal law (FedProx draws lognormal(4, 2) + 50); each client keeps
``test_fraction`` of its examples as its test split.
"""

from __future__ import annotations

import numpy as np

from fedjax_health.data.federated import FederatedData, FederatedDataset

DIM = 60
NUM_CLASSES = 10


def client_sizes(num_clients: int, rng: np.random.Generator, mean_log: float = 4.0, sigma_log: float = 2.0,
                 min_size: int = 50, max_size: int | None = None) -> np.ndarray:
  """Lognormal client sizes as in FedProx's generator, optionally capped."""
  sizes = rng.lognormal(mean_log, sigma_log, num_clients).astype(np.int64) + min_size
  if max_size is not None:
    sizes = np.minimum(sizes, max_size)
  return sizes


def load(num_clients: int = 100, alpha: float = 1.0, beta: float = 1.0, seed: int = 0,
         sizes: np.ndarray | None = None, test_fraction: float = 0.2, iid: bool = False,
         num_clusters: int = 0) -> FederatedData:
  """Returns Synthetic(alpha, beta) with ``num_clients`` clients.

  Args:
    sizes: examples per client (train + test); default lognormal as in FedProx, capped at 500.
    iid: one shared model and input distribution for all clients (FedProx's Synthetic-IID).
    num_clusters: if > 0, clients share one of ``num_clusters`` planted models (client c is in
      cluster c % num_clusters); the cluster ids are returned in ``client_meta['cluster']``.
  """
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if alpha < 0 or beta < 0:
    raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  if sizes is None:
    sizes = client_sizes(num_clients, rng, max_size=500)
  sizes = np.asarray(sizes, dtype=np.int64)
  if sizes.shape != (num_clients,) or np.any(sizes < 2):
    raise ValueError(f"sizes must be [{num_clients}] ints >= 2, got shape {sizes.shape}")
  cov_diag = np.arange(1, DIM + 1, dtype=np.float64) ** -1.2
  n_total = int(sizes.sum())
  client = np.repeat(np.arange(num_clients), sizes)

  if iid:  # one model and one input mean for everybody
    groups = np.zeros(num_clients, np.int64)
    w = rng.normal(0, 1, (1, NUM_CLASSES, DIM))
    b = rng.normal(0, 1, (1, NUM_CLASSES))
    v = np.zeros((1, DIM))
  else:
    groups = np.arange(num_clients) % num_clusters if num_clusters > 0 else np.arange(num_clients)
    num_models = num_clusters if num_clusters > 0 else num_clients
    u = rng.normal(0, np.sqrt(alpha), num_models)
    bb = rng.normal(0, np.sqrt(beta), num_models)
    w = rng.normal(u[:, None, None], 1.0, (num_models, NUM_CLASSES, DIM))
    b = rng.normal(u[:, None], 1.0, (num_models, NUM_CLASSES))
    v = rng.normal(bb[:, None], 1.0, (num_models, DIM))
  g = groups[client]
  x = (v[g] + rng.normal(0, 1, (n_total, DIM)) * np.sqrt(cov_diag)).astype(np.float32)
  y = np.empty(n_total, np.int32)
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  for c in range(num_clients):  # data generation only; never a [N, 10, 60] tensor
    lo, hi, m = bounds[c], bounds[c + 1], groups[c]
    y[lo:hi] = np.argmax(x[lo:hi] @ w[m].T + b[m], axis=1)

  n_test = np.maximum(1, np.floor(sizes * test_fraction).astype(np.int64))
  n_train = sizes - n_test
  is_test = np.concatenate([np.arange(s) >= t for s, t in zip(sizes, n_train)])
  cluster = (np.arange(num_clients) % num_clusters if num_clusters > 0 else np.zeros(num_clients, np.int64))
  arrays_tr = {"x": x[~is_test], "y": y[~is_test]}
  arrays_te = {"x": x[is_test], "y": y[is_test]}
  train = FederatedDataset(arrays_tr, np.concatenate([[0], np.cumsum(n_train)]))
  test = FederatedDataset(arrays_te, np.concatenate([[0], np.cumsum(n_test)]))
  return FederatedData(train=train, test=test, num_classes=NUM_CLASSES,
                       name=f"synthetic_{alpha}_{beta}",
                       client_meta={"cluster": cluster.astype(np.int32)})
