import pytest

from fedjax_health import resources, simulation
from fedjax_health.config_base import base_config


def _synthetic_mlp():
  config = base_config()
  config.num_rounds = 1
  config.dataset.name = "synthetic"
  config.dataset.num_clients = 20
  config.dataset.samples_per_client = 20
  config.model.name = "mlp"
  return config


def test_estimate_grows_with_width_and_stack_not_cohort_when_streaming():
  a = resources.estimate_round_bytes(10**6, 0, cohort=10_000, width=1, batch_bytes=0, stacked=False)
  b = resources.estimate_round_bytes(10**6, 0, cohort=100, width=1, batch_bytes=0, stacked=False)
  assert a == b == 24 * 10**6
  assert resources.estimate_round_bytes(10**6, 0, 100, 10, 0, False) == 10 * a
  assert resources.estimate_round_bytes(10**6, 0, 100, 1, 0, True) == a + 16 * 10**8


def test_cohort_that_cannot_fit_fails_before_compiling(tmp_path):
  config = _synthetic_mlp()
  config.model.hidden = (20_000, 20_000)  # ~400M params: one client's working set alone is ~10 GiB
  config.clients_per_step = 20
  with pytest.raises(ValueError, match=r"estimated to need .* GiB .*lower config.clients_per_step"):
    simulation.run(config, str(tmp_path))


def test_lowrank_chunk_that_cannot_fit_fails_before_compiling(tmp_path):
  config = _synthetic_mlp()
  config.lowrank_width = 10**12  # clients per low-rank chunk: no machine holds their factors
  with pytest.raises(ValueError, match=r"low-rank chunk .*lower config.lowrank_width"):
    simulation.run(config, str(tmp_path))


def test_members_of_one_program_multiply_the_working_set_not_the_data(tmp_path):
  a = resources.estimate_round_bytes(10**6, 5, cohort=100, width=2, batch_bytes=0, stacked=True)
  assert resources.estimate_round_bytes(10**6, 5, 100, 2, 0, True, members=3) == 5 + 3 * (a - 5)
  # A sweep whose members together cannot fit is refused before compiling, naming the sweep; each
  # member alone fits (~100 MB).
  config = _synthetic_mlp()
  config.model.hidden = (2000, 2000)
  k = resources.available_bytes() // (24 * 4 * 10**6) + 2
  config.sweep.field, config.sweep.values = "client.learning_rate", tuple(1e-4 * (i + 1) for i in range(k))
  with pytest.raises(ValueError, match=r"estimated to need .* members in one program: config.num_seeds x "
                                       r"config.sweep.values.*fewer seeds or sweep values"):
    simulation.run(config, str(tmp_path))


def test_host_threads_that_cannot_fit_fail_before_compiling(monkeypatch):
  """Each host thread's part holds its own working set and first-layer buffer: a budget that fits the
  one-program round but not two parts is refused, naming config.host_threads."""
  from fedjax_health.data import registry as data_registry
  config = _synthetic_mlp()
  data = data_registry.load_data(config.dataset, seed=config.seed)
  model = simulation.build_model(config, data)
  monkeypatch.setattr(resources, "available_bytes", lambda: 10**12)
  one = resources.check_round_fits(config, data, model)
  monkeypatch.setattr(resources, "available_bytes", lambda: one + 1)
  resources.check_round_fits(config, data, model)
  config.host_threads = 2
  with pytest.raises(ValueError, match=r"on 2 host threads is estimated to need .*lower config.host_threads"):
    resources.check_round_fits(config, data, model)
