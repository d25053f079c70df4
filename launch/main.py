"""Runs any simulation config: ``python -m launch.main --config=configs/<name>.py --workdir=DIR``.

Override any field on the command line, e.g. ``--config.num_rounds=5``; pick a config's small
variant with ``--config=configs/<name>.py:smoke``. Across processes (one per host, or several on
one host): add ``--num_processes=N --process_id=i --coordinator_address=HOST0:PORT`` to every
process's command line; the cohort is sharded over all processes' devices.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_health import distributed, progress, simulation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, summary.json, plots.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "Multi-process runs: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-process runs: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-process runs: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  simulation.run(_CONFIG.value, _WORKDIR.value, log=progress.Console())  # a progress bar on a terminal


if __name__ == "__main__":
  app.run(main)
