"""Memory estimate of a round, checked before anything is compiled.

The estimate counts what must be resident at once: the flat train/test data on device, the
per-client working set of the clients trained together (``clients_per_step``: parameters, optimiser
state, gradients and the update, about 6 copies of the parameters each, plus the chunk's gathered
batches and activations), and, for aggregators that need every update at once (robust, clustered),
the ``[cohort, params]`` stack with about 3 temporaries. FedAvg's default streaming mean never
builds that stack.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np


def available_bytes() -> int:
  """Returns the memory the default device can use (device limit on GPU/TPU, MemAvailable on CPU)."""
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if os.path.exists("/proc/meminfo"):  # Linux: what can be allocated without swapping
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # elsewhere: physical memory


def estimate_round_bytes(num_params: int, data_bytes: int, cohort: int, width: int, batch_bytes: int,
                         stacked: bool, members: int = 1) -> int:
  """Returns a conservative estimate of a round's peak bytes (see the module docstring).

  ``members`` > 1: that many rounds vmapped in one program (seeds, sweep values) share the data and
  each hold their own working set at once.
  """
  width = min(width, cohort)
  per_client = 6 * 4 * num_params + 4 * batch_bytes
  working = width * per_client
  if stacked:
    working += 4 * 4 * num_params * cohort
  return int(data_bytes + members * working)


def check_round_fits(config, data, model, stacked: bool = False, members: int = 1) -> int:
  """Raises ValueError naming the fields to change when the estimated round cannot fit memory.

  ``members``: rounds vmapped together (``config.num_seeds`` x the sweep's values).
  """
  params = jax.eval_shape(model.init, jax.random.key(0))
  num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  data_bytes = sum(v.nbytes for v in data.train.arrays.values()) + sum(v.nbytes for v in data.test.arrays.values())
  cohort = config.cohort_size or data.num_clients
  c = config.client
  example_bytes = int(np.prod(data.input_shape)) * 4
  steps = max(c.num_steps, 1) if c.num_epochs == 0 else math.ceil(c.num_epochs * data.train.client_sizes.max() / c.batch_size)
  batch_bytes = steps * c.batch_size * example_bytes
  need = estimate_round_bytes(num_params, data_bytes, cohort, config.clients_per_step, batch_bytes, stacked, members)
  have = available_bytes()
  lowrank_width = config.get("lowrank_width", 0)
  if lowrank_width and config.get("fast_path", "auto") != "off":
    # a low-rank chunk holds every client's factors: about its inputs and its layer outputs per step
    lowrank_need = data_bytes + lowrank_width * 3 * batch_bytes
    if lowrank_need > have:
      raise ValueError(
          f"a low-rank chunk is estimated to need {lowrank_need / 2**30:.1f} GiB but {have / 2**30:.1f} GiB is "
          f"available (config.lowrank_width={lowrank_width}, {steps} steps of {c.batch_size}); lower "
          f"config.lowrank_width (0 = sized to the cache / memory)")
  host_threads = config.get("host_threads", 1)
  if host_threads > 1:
    # Each part of the client map runs at once with its own working set and its own [rows, d_out]
    # buffer of the first layer's U (fedavg(host_threads=)).
    first_out = next((p.shape[-1] for p in jax.tree.leaves(params) if len(p.shape) == 2), 0)
    part = need - data_bytes + 4 * data.train.num_examples * first_out
    host_need = need + (host_threads - 1) * part
    if host_need > have:
      raise ValueError(
          f"the round on {host_threads} host threads is estimated to need {host_need / 2**30:.1f} GiB but "
          f"{have / 2**30:.1f} GiB is available (each part of the client map holds its own working set and "
          f"a [{data.train.num_examples:,}, {first_out}] buffer); lower config.host_threads")
  if need > have:
    raise ValueError(
        f"the round is estimated to need {need / 2**30:.1f} GiB but {have / 2**30:.1f} GiB is available "
        f"(config.cohort_size={cohort}, config.clients_per_step={config.clients_per_step}, {num_params:,} params"
        + (f", {members} members in one program: config.num_seeds x config.sweep.values" if members > 1 else "")
        + "); lower config.clients_per_step or config.cohort_size"
        + (", or run fewer seeds or sweep values at once" if members > 1 else ""))
  return need
