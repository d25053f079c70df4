"""Workload definitions shared by every baseline (pure numpy: runs in any venv)."""

import numpy as np

WORKLOADS = {
    # name: (num_clients, examples per client, input shape, batch, local epochs)
    "w1": (1000, 20, (784,), 10, 1),
    "cnn": (20, 50, (28, 28, 1), 10, 1),  # 5 local steps of batch 10 per client
}


def make_data(name: str, seed: int = 0):
  """Returns (x [N, ...] float32, y [N] int32, offsets) for the workload, identical in every venv."""
  clients, per, shape, _, _ = WORKLOADS[name]
  rng = np.random.default_rng(seed)
  n = clients * per
  x = rng.random((n,) + shape, dtype=np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  return x, y, np.arange(0, n + 1, per)
