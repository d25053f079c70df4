import importlib.util
import os

import pytest

from fedjax_health import plugins, simulation
from fedjax_health.config_validation import validate_config
from fedjax_health.data import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def heart_config(algorithm):
  spec = importlib.util.spec_from_file_location("heart_disease_hetero",
                                                os.path.join(ROOT, "configs", "heart_disease_hetero.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("")
  config.algorithm = algorithm
  config.seed = 0
  config.eval_every = config.num_rounds
  return config


def final_metrics(algorithm):
  plugins.load_plugins()
  config = heart_config(algorithm)
  validate_config(config)
  data = registry.load_data(config.dataset, seed=0)
  validate_config(config, data)
  [exp] = simulation.ALGORITHMS[algorithm](config, data, simulation.build_model(config, data))
  return simulation.run_experiment(exp, config, lambda s: None, lambda r: None)


@pytest.mark.slow
def test_fedmd_fd_fedproto_beat_local_only_on_heart_disease():
  """Seeded Fed-Heart-Disease (3 hospitals, 3 architectures): collaboration beats training alone."""
  local = final_metrics("hetero_local")["mean_client_accuracy"]
  for method in ("fedmd", "fd", "fedproto"):
    out = final_metrics(method)
    assert out["mean_client_accuracy"] > local, (method, out["mean_client_accuracy"], local)
    fedavg_bytes = 4 * 905  # the MLP 32-13 shared by every hospital (fedavg's reference model)
    if method == "fd":  # K x K logits + K counts: under 1% of FedAvg's upload
      assert out["bytes_up_per_client"] < 0.01 * fedavg_bytes
    if method == "fedproto":  # K x 13 prototypes + K counts
      assert out["bytes_up_per_client"] < 0.05 * fedavg_bytes
