import json
import os

import jax
import numpy as np
import pytest

from configs import heart_disease_dp, heart_disease_fedavg, synthetic_1000_clients
from fedjax_health import simulation
from fedjax_health import stacked_seeds


def _params(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("module,seeds", [(heart_disease_fedavg, (3, 4)),
                                          pytest.param(heart_disease_dp, (1, 2), marks=pytest.mark.slow)])
def test_stacked_seed_equals_separate_run(tmp_path, module, seeds):
  config = module.get_config("smoke")
  config.seed, config.num_seeds = seeds[0], len(seeds)
  summary = simulation.run(config, str(tmp_path / "stacked"), log=lambda s: None)
  name = config.algorithm
  assert summary["seeds"] == list(seeds) and len(summary["per_seed"][name]) == len(seeds)
  for s in seeds[1:]:  # a seed other than config.seed: catches a wrong seed offset or key
    single = module.get_config("smoke")
    single.seed = s
    one = simulation.run(single, str(tmp_path / f"seed{s}"), log=lambda s: None)
    i = seeds.index(s)
    for key in ("accuracy", "loss", "auc", "mean_client_accuracy"):
      np.testing.assert_allclose(summary["per_seed"][name][i][key], one["experiments"][name][key], rtol=1e-5, atol=1e-6)
    a = _params(tmp_path / "stacked" / f"final_params_{name}_seed{s}.npz")
    b = _params(tmp_path / f"seed{s}" / f"final_params_{name}.npz")
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
  accs = [m["accuracy"] for m in summary["per_seed"][name]]
  np.testing.assert_allclose(summary["experiments"][name]["accuracy"], np.mean(accs))
  np.testing.assert_allclose(summary["experiments_sd"][name]["accuracy"], np.std(accs))
  with open(tmp_path / "stacked" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  experiments = {r["experiment"] for r in rows}
  assert experiments == {f"{name}/seed{s}" for s in seeds} | {f"{name}/mean"}
  assert os.path.exists(tmp_path / "stacked" / "learning_curves.png")


@pytest.mark.parametrize("field,value,message", [
    ("num_seeds", 0, "config.num_seeds must be an integer >= 1"),
    ("algorithm", "ifca", "config.algorithm must be one of"),
    ("checkpoint_every", 2, "config.checkpoint_every must be 0 with config.num_seeds=2"),
])
def test_bad_num_seeds_settings_fail_naming_the_field(tmp_path, field, value, message):
  config = heart_disease_fedavg.get_config("smoke")
  config.num_seeds = 2
  setattr(config, field, value)
  with pytest.raises(ValueError, match=message):
    simulation.run(config, str(tmp_path), log=lambda s: None)


def test_seed_dependent_split_is_refused(tmp_path):
  config = synthetic_1000_clients.get_config("smoke")
  config.num_seeds = 2
  with pytest.raises(ValueError, match="differs between seeds"):
    simulation.run(config, str(tmp_path), log=lambda s: None)


def test_mean_sd_over_dicts():
  mean, sd = stacked_seeds.mean_sd([{"a": 1.0, "b": [1.0, 2.0], "n": "x"}, {"a": 3.0, "b": [3.0, 6.0], "n": "y"}])
  assert mean == {"a": 2.0, "b": [2.0, 4.0]} and sd == {"a": 1.0, "b": [1.0, 2.0]}
  stacked = stacked_seeds.stack_trees([{"w": np.zeros(2)}, {"w": np.ones(2)}])
  np.testing.assert_array_equal(stacked_seeds.seed_slice(stacked, 1)["w"], np.ones(2))
  assert jax.tree.leaves(stacked)[0].shape == (2, 2)
