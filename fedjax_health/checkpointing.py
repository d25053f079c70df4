"""Checkpoint and exact resume of a simulation with orbax.

The whole server state (a pytree) is saved every ``config.checkpoint_every`` rounds under
``workdir/checkpoints/<experiment>/``. A round's randomness is ``fold_in(key(seed + 1), round)``, so
the state alone determines the rest of the run: a run killed after round k and restarted from
its last checkpoint ends bitwise-equal to the uninterrupted run.

Multi-process runs: the state is replicated, so process 0 alone saves it (``process_local``: no
cross-process barriers) and, on restart, restores it and broadcasts it to the other processes. The config that wrote the
checkpoints is stored beside them; resuming with a config that would train differently is refused
before anything is overwritten.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

# Fields that may change between the run that wrote a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = ("num_rounds", "eval_every", "checkpoint_every", "resume", "overwrite", "on_divergence",
                     "divergence_loss_limit")


class CheckpointMismatchError(ValueError):
  """The checkpoint on disk does not belong to this config or this state structure."""


def _training_fields(config_dict: dict) -> dict:
  return {k: v for k, v in config_dict.items() if k not in RESUMABLE_CHANGES}


def check_or_write_config(directory: str, config) -> None:
  """Writes ``config.json`` into a new checkpoint directory, or checks it matches an existing one."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    a, b = _training_fields(saved), _training_fields(current)
    if a != b:
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      raise CheckpointMismatchError(
          f"checkpoints in {directory} were written by a different config (fields differ: {diff}); "
          f"use another --workdir, or --config.resume=False --config.overwrite=True to start over")
    return
  with open(path, "w") as f:
    json.dump(current, f, indent=2)


class CheckpointCorruptError(ValueError):
  """A checkpoint's files cannot be read (truncated or damaged)."""


def _first_line(e: Exception, limit: int = 200) -> str:
  line = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return line if len(line) <= limit else line[:limit] + "..."


class Checkpointer:
  """Saves and restores one experiment's server state by round number."""

  def __init__(self, directory: str, max_to_keep: int = 2, process_local: bool = False):
    """``process_local``: in a multi-process run, only this process touches ``directory`` (it
    saves host-local copies of replicated state, with no cross-process barriers)."""
    self.directory = os.path.abspath(directory)
    kwargs = {"create": True}
    if process_local:
      os.makedirs(self.directory, exist_ok=True)  # orbax refuses create=True with active_processes
      kwargs["create"] = False
      pid = jax.process_index()
      kwargs["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=pid, active_processes={pid})
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, **kwargs)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler())

  def latest_round(self) -> int | None:
    return self.manager.latest_step()

  def save(self, round_idx: int, state: Any) -> None:
    self.manager.save(round_idx, args=ocp.args.StandardSave(state))
    self.manager.wait_until_finished()

  def restore(self, round_idx: int, like: Any) -> Any:
    """Returns the state saved at ``round_idx``, checked against the structure of ``like``.

    Raises ``CheckpointMismatchError`` when the saved arrays differ from ``like``'s and
    ``CheckpointCorruptError`` when they match but cannot be read (a truncated or damaged file)."""
    where = f"checkpoint of round {round_idx} in {self.directory}"
    try:
      saved = jax.tree.leaves(self.manager.item_metadata(round_idx).tree)
      saved = sorted((tuple(m.shape), str(np.dtype(m.dtype))) for m in saved)
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      raise CheckpointCorruptError(f"{where} is corrupt: its metadata cannot be read ({_first_line(e)})") from None
    wanted = sorted((tuple(np.shape(x)), str(np.asarray(x).dtype)) for x in jax.tree.leaves(like))
    if saved != wanted:
      raise CheckpointMismatchError(f"{where} does not match this run's state: it holds arrays {saved}, "
                                    f"this run's state has {wanted}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      restored = self.manager.restore(round_idx, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise CheckpointCorruptError(f"{where} is corrupt: a data file cannot be read ({_first_line(e)})") from None
    want = jax.tree.structure(like)
    if jax.tree.structure(restored) != want:
      raise CheckpointMismatchError(f"{where} has a different state structure")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(like)):
      if np.shape(a) != np.shape(b) or np.asarray(a).dtype != np.asarray(b).dtype:
        raise CheckpointMismatchError(
            f"{where} has a leaf {np.shape(a)} {np.asarray(a).dtype}, "
            f"this run expects {np.shape(b)} {np.asarray(b).dtype}")
    return restored

  def restore_latest(self, last: int, like: Any, log=print) -> tuple[Any, int]:
    """Returns (state, round) of the newest readable checkpoint at or before round ``last``.

    A corrupt checkpoint is reported (naming its round) and the previous kept one is tried."""
    steps = sorted((s for s in self.manager.all_steps() if s <= last), reverse=True)
    for i, step in enumerate(steps):
      try:
        return self.restore(step, like), step
      except CheckpointCorruptError as e:
        if i + 1 < len(steps):
          log(f"WARNING: {e}; falling back to the checkpoint of round {steps[i + 1]}")
        else:
          raise CheckpointCorruptError(
              f"{e}; no earlier kept checkpoint is readable (rounds tried: {steps}). Delete "
              f"{self.directory} or set --config.resume=False to start over") from None
    raise CheckpointCorruptError(f"no checkpoint at or before round {last} in {self.directory}")

  def close(self) -> None:
    self.manager.close()


def save_params_npz(path: str, params: Any) -> None:
  """Writes params as a flat .npz (keys are the pytree paths), for users and exactness checks."""
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(path, **flat)
