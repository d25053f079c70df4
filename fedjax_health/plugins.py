"""Modules that register algorithms, aggregators, modes or config checks when imported.

``simulation`` imports each of these before it looks a name up, so a config string can name
anything they register. Add your module here (one line) instead of importing it from the core.
"""

import importlib

PLUGIN_MODULES = [
    "fedjax_health.algorithms.registry",
    "fedjax_health.algorithms.clustered_experiment",
    "fedjax_health.algorithms.personalized_experiment",
    "fedjax_health.data.shifts_registry",
    "fedjax_health.privacy.experiment",
    "fedjax_health.attacks.inversion_run",
    "fedjax_health.attacks.attack_defense",
    "fedjax_health.transfer.experiment",
    "fedjax_health.stacked_seeds",
    "fedjax_health.sweep",
    "fedjax_health.algorithms.fedopt_checks",
    "fedjax_health.heterogeneous.algorithms",
]


def load_plugins() -> None:
  for name in PLUGIN_MODULES:
    importlib.import_module(name)
