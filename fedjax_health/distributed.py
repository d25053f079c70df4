"""Running one simulation across several processes with JAX's own multi-controller runtime.

Every process runs the same program (``python -m launch.main ... --num_processes=N --process_id=i
--coordinator_address=host:port``). ``jax.distributed.initialize`` joins them; the cohort is then
sharded with ``shard_map`` over a ``'clients'`` mesh of *all* processes' devices, so each process
trains its slice of the clients and FedAvg's sum is a cross-process ``psum`` (gloo on CPU, NCCL on
GPU, ICI/DCN on TPU). Inputs that every process holds identically (the server state, the flat data,
the round key) become replicated global arrays. Process 0 writes the outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Joins this process to a multi-process run (CPU collectives via gloo)."""
  if num_processes < 2:
    return
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
  if not coordinator_address:
    raise ValueError("--coordinator_address (host:port of process 0) is required with --num_processes > 1")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_chief() -> bool:
  return jax.process_index() == 0


def replicate(tree: Any, mesh) -> Any:
  """Returns ``tree`` as global arrays replicated over ``mesh`` (every process passes the same values)."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def to_local(tree: Any) -> Any:
  """Returns this process's copy of replicated global arrays as numpy arrays."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)


def broadcast_from_chief(tree: Any) -> Any:
  """Returns process 0's value of ``tree`` (numpy leaves of the same structure on every process)."""
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))
