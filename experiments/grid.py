"""One (dataset, method, seed) cell of an experiment grid: load its config, run it, cache its row.

Shared by ``experiments/heterogeneity.py`` (clustered / personalised FL) and
``experiments/heterogeneity_models.py`` (heterogeneous models): each cell's final metrics are
written to ``out_dir/<dataset>/<method>/seed<k>.json`` and reused when the script is rerun.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(config_file: str, method: str, seed: int):
  """Returns ``configs/<config_file>``'s full config set to ``method`` and ``seed``, evaluated once at the end."""
  spec = importlib.util.spec_from_file_location(config_file[:-3], os.path.join(ROOT, "configs", config_file))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("")
  config.algorithm = method
  config.seed = seed
  config.eval_every = config.num_rounds  # evaluate once, at the end
  return config


def run_cell(config_file: str, dataset: str, method: str, seed: int, out_dir: str,
             row_of: Callable[[dict], dict]) -> tuple[dict, bool]:
  """Returns (row, cached): the cell's cached row, or runs it and writes ``row_of(final metrics)``."""
  path = os.path.join(out_dir, dataset, method, f"seed{seed}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f), True
  from fedjax_health import plugins, simulation
  from fedjax_health.config_validation import validate_config
  from fedjax_health.data import registry
  plugins.load_plugins()
  config = load_config(config_file, method, seed)
  validate_config(config)
  data = registry.load_data(config.dataset, seed=config.seed)
  validate_config(config, data)
  model = simulation.build_model(config, data)
  t0 = time.time()
  [exp] = simulation.ALGORITHMS[method](config, data, model)
  final = simulation.run_experiment(exp, config, lambda s: None, lambda r: None)
  row = {"dataset": dataset, "method": method, "seed": seed, "wall_s": round(time.time() - t0, 2), **row_of(final)}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(row, f)
  return row, False
