"""Config validation: every field checked before any data is loaded or anything compiled.

Errors name the config field and the allowed values: ``config.num_rounds must be >= 1, got -1``.
Modules that add config sections register a checker with ``register_check``.
"""

from __future__ import annotations

import os
from typing import Callable

CHECKS: list[Callable] = []


def register_check(fn: Callable):
  """Registers ``fn(config, data_or_None)`` to run in ``validate_config``."""
  CHECKS.append(fn)
  return fn


# The FedAvg family: rounds with a streaming aggregate (no [cohort, params] stack), which also run
# their client map on host threads (config.host_threads > 1).
FEDAVG_FAMILY = ("fedavg", "fedprox", "fedopt", "local", "pooled")


def require(cond: bool, field: str, allowed: str, value) -> None:
  if not cond:
    raise ValueError(f"config.{field} must be {allowed}, got {value!r}")


def _choice(config, field: str, allowed) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  require(value in allowed, field, f"one of {sorted(allowed)}", value)


@register_check
def check_core(config, data=None) -> None:
  from fedjax_health import models
  from fedjax_health.data import registry as data_registry
  from fedjax_health.simulation import ALGORITHMS
  from fedjax_health import plugins
  plugins.load_plugins()

  require(isinstance(config.num_rounds, int) and config.num_rounds >= 1, "num_rounds", ">= 1", config.num_rounds)
  require(config.eval_every >= 1, "eval_every", ">= 1", config.eval_every)
  require(config.checkpoint_every >= 0, "checkpoint_every", ">= 0 (0: off)", config.checkpoint_every)
  _choice(config, "algorithm", ALGORITHMS)
  _choice(config, "dataset.name", data_registry.DATASETS)
  _choice(config, "model.name", models.MODELS)
  if "activation" in config.model:
    _choice(config, "model.activation", models.ACTIVATIONS)
  ds = config.dataset
  if ds.name in ("breastmnist", "retinamnist", "synthetic"):
    require(ds.num_clients >= 1, "dataset.num_clients", ">= 1", ds.num_clients)
  if ds.name in ("breastmnist", "retinamnist"):
    _choice(config, "dataset.partition", ("dirichlet", "iid", "quantity", "shards"))
    if ds.partition == "dirichlet":
      require(ds.alpha > 0, "dataset.alpha", "> 0", ds.alpha)
  if ds.name == "synthetic":
    require(ds.alpha >= 0, "dataset.alpha", ">= 0", ds.alpha)
    require(ds.beta >= 0, "dataset.beta", ">= 0", ds.beta)
    require(ds.get("size_sigma", 1.0) > 0, "dataset.size_sigma", "> 0", ds.get("size_sigma", 1.0))
  for key in ("data_dir", "path"):
    path = ds.get(key)
    if path:
      require(os.path.exists(path), f"dataset.{key}", "an existing path", path)
  c = config.client
  _choice(config, "client.optimizer", ("sgd", "adam"))
  if "step_buckets" in c:
    _choice(config, "client.step_buckets", ("pow2", "pow2_static", "none"))
  require(c.learning_rate > 0, "client.learning_rate", "> 0", c.learning_rate)
  require(c.batch_size >= 1, "client.batch_size", ">= 1", c.batch_size)
  require(c.num_epochs >= 0, "client.num_epochs", ">= 0 (0: use client.num_steps)", c.num_epochs)
  require(c.num_epochs > 0 or c.num_steps >= 1, "client.num_steps", ">= 1 when client.num_epochs is 0", c.num_steps)
  require(c.prox_mu >= 0, "client.prox_mu", ">= 0", c.prox_mu)
  s = config.server
  _choice(config, "server.optimizer", ("sgd", "adam", "yogi", "adagrad"))
  require(s.learning_rate > 0, "server.learning_rate", "> 0", s.learning_rate)
  require(s.tau > 0, "server.tau", "> 0", s.tau)
  require(config.clients_per_step >= 1, "clients_per_step", ">= 1", config.clients_per_step)
  _choice(config, "fast_path", ("auto", "lowrank", "off"))
  require(config.lowrank_width >= 0, "lowrank_width", ">= 0 (0: automatic)", config.lowrank_width)
  require(config.num_devices >= 0, "num_devices", ">= 0 (0: no sharding)", config.num_devices)
  import jax
  host_threads = config.get("host_threads", 1)
  require(isinstance(host_threads, int) and not isinstance(host_threads, bool) and host_threads >= 1,
          "host_threads", "an int >= 1 (1: each round is one program)", host_threads)
  if host_threads > 1:
    require(config.algorithm in FEDAVG_FAMILY, "host_threads",
            f"1 for algorithm {config.algorithm!r} (host threads run the rounds of {FEDAVG_FAMILY})",
            host_threads)
    require(config.num_devices <= 1, "host_threads", "1 with num_devices > 1 (the cohort is sharded instead)",
            host_threads)
    require(jax.process_count() == 1, "host_threads", "1 in a multi-process run", host_threads)
    stacked = config.get("num_seeds", 1) > 1 or bool(config.get("sweep") and config.sweep.get("field"))
    require(not stacked, "host_threads", "1 with config.num_seeds > 1 or config.sweep (their rounds run "
            "vmapped in one program)", host_threads)
  require(config.num_devices <= jax.device_count(), "num_devices",
          f"<= the {jax.device_count()} devices present", config.num_devices)
  require(config.cohort_size >= 0, "cohort_size", ">= 0 (0: all clients)", config.cohort_size)
  if data is not None:
    n = data.num_clients
    require(config.cohort_size <= n, "cohort_size", f"<= the number of clients ({n})", config.cohort_size)
    cohort = config.cohort_size or n
    n_dev = config.num_devices or (jax.device_count() if jax.process_count() > 1 else 1)
    if n_dev > 1:
      require(cohort % n_dev == 0, "cohort_size", f"a multiple of the {n_dev} devices it is sharded over", cohort)


def validate_config(config, data=None) -> None:
  """Raises ValueError naming the first bad field; ``data`` enables the data-dependent checks."""
  for check in CHECKS:
    check(config, data)


from fedjax_health import input_validation  # noqa: E402,F401  (registers the input checks)
