"""Runs any simulation config: ``python -m launch.main --config=configs/<name>.py --workdir=DIR``.

Override any field on the command line, e.g. ``--config.num_rounds=5``; pick a config's small
variant with ``--config=configs/<name>.py:smoke``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_health import simulation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, summary.json, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  simulation.run(_CONFIG.value, _WORKDIR.value, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
  app.run(main)
