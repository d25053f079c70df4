import os
import shutil

import pytest

from fedjax_health import simulation
from fedjax_health.config_base import base_config
from fedjax_health.data import heart_disease


def _cfg(**over):
  config = base_config()
  config.num_rounds = 1
  config.client.num_steps = 2
  for key, value in over.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize("field, value, msg", [
    ("model.name", "resnet", "config.model.name must be one of"),
    ("num_rounds", -1, "config.num_rounds must be >= 1, got -1"),
    ("cohort_size", 5, r"config.cohort_size must be <= the number of clients \(4\)"),
    ("algorithm", "fedsgd", "config.algorithm must be one of"),
    ("dataset.name", "mimic", "config.dataset.name must be one of"),
    ("client.learning_rate", 0.0, "config.client.learning_rate must be > 0"),
    ("client.batch_size", 0, "config.client.batch_size must be >= 1"),
    ("server.optimizer", "rmsprop", "config.server.optimizer must be one of"),
    ("client.prox_mu", -0.1, "config.client.prox_mu must be >= 0"),
    ("clients_per_step", 0, "config.clients_per_step must be >= 1"),
    ("num_devices", 10_000, "config.num_devices must be <="),
    ("dataset.data_dir", "/nonexistent/heart", "config.dataset.data_dir must be an existing path"),
])
def test_bad_config_fails_before_compile_naming_the_field(tmp_path, field, value, msg):
  with pytest.raises(ValueError, match=msg):
    simulation.run(_cfg(**{field: value}), str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl")  # nothing ran


def test_bad_dirichlet_alpha_is_named(tmp_path):
  config = _cfg(**{"dataset.name": "breastmnist", "dataset.alpha": 0.0, "dataset.num_clients": 3})
  with pytest.raises(ValueError, match="config.dataset.alpha must be > 0"):
    simulation.run(config, str(tmp_path))


def test_malformed_csv_row_names_file(tmp_path):
  data_dir = tmp_path / "hd"
  shutil.copytree(heart_disease.default_data_dir(), data_dir)
  with open(data_dir / "processed.hungarian.data", "a") as f:
    f.write("40,1,2,140,289,0,0,172,0,0\n")
  with pytest.raises(ValueError, match=r"processed\.hungarian\.data:295"):
    simulation.run(_cfg(**{"dataset.data_dir": str(data_dir)}), str(tmp_path / "wd"))


def test_missing_data_file_is_named(tmp_path):
  data_dir = tmp_path / "hd"
  shutil.copytree(heart_disease.default_data_dir(), data_dir)
  os.remove(data_dir / "processed.va.data")
  with pytest.raises(FileNotFoundError, match="processed.va.data"):
    simulation.run(_cfg(**{"dataset.data_dir": str(data_dir)}), str(tmp_path / "wd"))


def test_unknown_mode(tmp_path):
  with pytest.raises(ValueError, match="config.mode must be one of"):
    simulation.run(_cfg(mode="serve"), str(tmp_path))
