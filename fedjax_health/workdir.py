"""A run's workdir: refuse one written by another config, recover a metrics file cut mid-line.

A workdir holds one run's outputs (``config.json``, ``metrics.jsonl``, ``summary.json``, plots,
final params, checkpoints). Running a *different* config into it would leave the earlier run's
files beside the new ones, so it is refused unless ``config.overwrite`` is set, which deletes the
earlier outputs first. The same config (up to the fields a resume may change, see
``checkpointing.RESUMABLE_CHANGES``) may rerun or resume in place.
"""

from __future__ import annotations

import json
import os
import shutil

from fedjax_health import checkpointing


class WorkdirConfigError(checkpointing.CheckpointMismatchError):
  """The workdir holds the outputs of a run with another config."""


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def differing_fields(saved: dict, current: dict) -> list[str]:
  """Returns the top-level fields (sections) whose training-relevant values differ."""
  a, b = checkpointing._training_fields(saved), checkpointing._training_fields(current)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def prepare(workdir: str, config) -> None:
  """Refuses ``workdir`` if an earlier run with another config wrote it; with ``config.overwrite``
  deletes that run's outputs (every entry of the directory) instead."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    saved, diff = None, [f"unreadable config.json ({e})"]
  else:
    diff = differing_fields(saved, _config_dict(config))
  if not diff:
    return
  if not config.get("overwrite", False):
    raise WorkdirConfigError(
        f"--workdir={workdir} holds the outputs of an earlier run with a different config (fields differ: "
        f"{diff}); use another --workdir, or --config.overwrite=True to delete those outputs first")
  for name in os.listdir(workdir):
    p = os.path.join(workdir, name)
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    else:
      os.remove(p)


def read_metrics(path: str, log=print) -> list[dict]:
  """Returns the rows of ``metrics.jsonl``; a last line cut mid-write (a killed run) is dropped
  from the file, so that its round is recomputed; a bad line elsewhere is an error naming it."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    raw = f.read()
  lines = raw.split(b"\n")
  rows, good_bytes = [], 0
  for i, line in enumerate(lines):
    if not line.strip():
      good_bytes += len(line) + 1
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or "experiment" not in row or "round" not in row:
        raise ValueError("not a metrics row")
    except ValueError as e:
      if all(not l.strip() for l in lines[i + 1:]):  # the last line: a write cut short
        log(f"{path}: dropping the incomplete last line {i + 1} (the run was interrupted while writing); "
            f"its round is recomputed")
        with open(path, "r+b") as f:
          f.truncate(good_bytes)
        return rows
      raise ValueError(f"{path}:{i + 1}: not a JSON metrics row ({e}); fix or delete the file to resume") from None
    rows.append(row)
    good_bytes += len(line) + 1
  return rows
