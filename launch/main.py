"""Runs any simulation config: ``python -m launch.main --config=configs/<name>.py --workdir=DIR``.

Override any field on the command line, e.g. ``--config.num_rounds=5``; pick a config's small
variant with ``--config=configs/<name>.py:smoke``. Across processes (one per host, or several on
one host): add ``--num_processes=N --process_id=i --coordinator_address=HOST0:PORT`` to every
process's command line; the cohort is sharded over all processes' devices.

Errors (a bad config field, file or variant, bad data, divergence, a refused workdir) print one
line naming the field or file and exit with status 1 (2 for command-line usage errors); add
``--traceback`` for the full traceback.
"""

import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_health import config_file, distributed, progress, simulation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, summary.json, plots.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "Multi-process runs: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-process runs: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-process runs: this process's index.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an error, print the full traceback, not one line.")
flags.mark_flags_as_required(["config", "workdir"])


def fail(error: BaseException, show_traceback: bool, status: int = 1):
  """Prints ``error`` as one line (the traceback too with --traceback) and exits with ``status``."""
  if show_traceback:
    traceback.print_exception(error)
  known = isinstance(error, (ValueError, OSError, RuntimeError, flags.Error, app.UsageError))
  kind = "" if known else f"{type(error).__name__}: "
  message = " ".join(str(error).split("\n")[0].split()) or type(error).__name__
  hint = "" if show_traceback else " (rerun with --traceback for details)"
  print(f"error: {kind}{message}{hint if not known else ''}", file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """Checks the --config file, variant and overrides, then parses the flags; errors print one line."""
  show = any(a in ("--traceback", "--traceback=true", "--traceback=True", "--traceback=1") for a in argv)
  try:
    config_file.check_command_line(argv[1:])
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e, show, status=2)
  except Exception as e:  # config_flags raises AttributeError/IOError/... for what slipped past the checks
    fail(e, show)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    simulation.run(_CONFIG.value, _WORKDIR.value, log=progress.Console())  # a progress bar on a terminal
  except Exception as e:  # a validated error (or a bug) as one line; --traceback for the rest
    fail(e, _TRACEBACK.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
