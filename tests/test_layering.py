"""Pure transform modules import without the simulation, checkpointing or config machinery."""

import json
import subprocess
import sys

PURE_MODULES = [
    "fedjax_health.context",
    "fedjax_health.aggregators",
    "fedjax_health.aggregators.base",
    "fedjax_health.aggregators.robust",
    "fedjax_health.aggregators.detection",
    "fedjax_health.aggregators.clustered",
    "fedjax_health.privacy.dp",
    "fedjax_health.privacy.dp_sgd",
    "fedjax_health.privacy.accounting",
    "fedjax_health.privacy.secagg",
    "fedjax_health.attacks.model_poisoning",
    "fedjax_health.attacks.poisoning",
    "fedjax_health.attacks.defenses",
    "fedjax_health.attacks.inversion",
    "fedjax_health.attacks.inversion_objective",
    "fedjax_health.attacks.inversion_metrics",
    "fedjax_health.algorithms.fedavg",
    "fedjax_health.algorithms.state",
    "fedjax_health.algorithms.personal_eval",
    "fedjax_health.algorithms.clustered",
    "fedjax_health.algorithms.personalized",
    "fedjax_health.data.shifts",
    "fedjax_health.data.partition",
    "fedjax_health.client",
    "fedjax_health.metrics",
    "fedjax_health.algorithms.fedopt",
    "fedjax_health.heterogeneous.transforms",
    "fedjax_health.heterogeneous.groups",
    "fedjax_health.heterogeneous.rounds",
    "fedjax_health.heterogeneous.public_data",
    "fedjax_health.transfer.ftl",
    "fedjax_health.transfer.fixed_point",
    "fedjax_health.transfer.paillier",
    "fedjax_health.transfer.secret_sharing",
]
FORBIDDEN = ["fedjax_health.simulation", "fedjax_health.checkpointing", "fedjax_health.config_validation",
             "fedjax_health.plugins", "orbax", "ml_collections"]

_SCRIPT = """
import importlib, json, sys
forbidden = json.loads(sys.argv[1])
leaks = {}
for module in json.loads(sys.argv[2]):
  importlib.import_module(module)
  bad = sorted(n for n in sys.modules for f in forbidden if n == f or n.startswith(f + "."))
  if bad and not leaks:
    leaks[module] = bad  # the first module that loads any of them is the culprit
print(json.dumps({"leaks": leaks, "loaded": sorted(sys.modules)}))
"""


def test_pure_transform_modules_load_no_simulation_checkpointing_or_config_machinery():
  # A fresh interpreter: imports made earlier by the test session would hide a leak.
  out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(FORBIDDEN), json.dumps(PURE_MODULES)],
                       check=True, capture_output=True, text=True)
  result = json.loads(out.stdout)
  assert set(PURE_MODULES) <= set(result["loaded"])
  assert not result["leaks"], f"a pure module loads wiring/config machinery: {result['leaks']}"


def test_old_import_paths_of_the_wiring_still_work():
  from fedjax_health.algorithms import clustered, clustered_experiment, personalized, personalized_experiment
  from fedjax_health.data import shifts, shifts_registry
  assert clustered.add_config is clustered_experiment.add_config
  assert personalized.build_apfl_experiment is personalized_experiment.build_apfl_experiment
  assert shifts.check_clustered_dataset is shifts_registry.check_clustered_dataset
  from fedjax_health import plugins
  assert {"fedjax_health.algorithms.clustered_experiment", "fedjax_health.algorithms.personalized_experiment",
          "fedjax_health.data.shifts_registry"} <= set(plugins.PLUGIN_MODULES)


def test_runs_without_privacy_do_not_load_dp_accounting():
  """dp-accounting pulls in scipy (1-2 s per process): the simulation, every plugin and the
  accounting module itself load it only when an epsilon is computed."""
  script = """
import importlib, sys
from fedjax_health import plugins, simulation
from fedjax_health.privacy import accounting
for name in plugins.PLUGIN_MODULES:
  importlib.import_module(name)
assert "dp_accounting" not in sys.modules, "dp_accounting loaded at import"
event = accounting.client_level_event(1.0, 10, sampling_rate=0.1)
assert "dp_accounting" in sys.modules and accounting.compute_epsilon(event, 1e-5) > 0
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
