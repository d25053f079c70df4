"""The simulation loop: build everything from a config, run rounds, evaluate, write outputs.

``run(config, workdir)`` validates the whole config before anything is compiled, then runs
``num_rounds`` compiled rounds, evaluating every ``eval_every`` rounds, and writes to ``workdir``:
``config.json``, ``metrics.jsonl`` (one JSON object per evaluated round), ``summary.json`` and
``learning_curves.png``. Algorithms are looked up by name in ``ALGORITHMS``; each builder returns
an ``Experiment``. Baselines that train several independent models (``local``: one per site) are
``Experiment`` lists run one after the other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from fedjax_health import checkpointing
from fedjax_health import client as client_lib
from fedjax_health import distributed
from fedjax_health import divergence
from fedjax_health import metrics as metrics_lib
from fedjax_health import models
from fedjax_health import plugins
from fedjax_health import progress
from fedjax_health import resources
from fedjax_health import tensorboard
from fedjax_health import workdir as workdir_lib
from fedjax_health.config_validation import FEDAVG_FAMILY, validate_config
from fedjax_health.data import registry as data_registry
from fedjax_health.data.federated import BatchPlanSpec, FederatedData

Params = Any


@dataclasses.dataclass
class Experiment:
  """One compiled federated training run.

  ``round_fn(state, train, rng) -> (state, metrics)`` with ``train`` the device data;
  ``evaluate(state) -> dict`` host-side metrics of the current state.
  """

  name: str
  init_state: Any
  round_fn: Callable
  train: dict
  evaluate: Callable[[Any], dict]
  params_of: Callable[[Any], Params] = lambda s: s.params
  round_path: str = ""  # how the round trains clients, when it matters ("plain" or "lowrank")
  # The same round with its client map on host threads (config.host_threads > 1): a Python function
  # calling jitted stages, run instead of ``round_fn`` when set.
  host_round_fn: Callable | None = None


ALGORITHMS: dict[str, Callable[[ml_collections.ConfigDict, FederatedData, models.Model], list[Experiment]]] = {}


def register_algorithm(name: str):
  """Decorator: registers ``builder(config, data, model) -> list[Experiment]`` under ``name``."""

  def deco(fn):
    ALGORITHMS[name] = fn
    return fn

  return deco


def build_plan(config, client_sizes: np.ndarray) -> BatchPlanSpec:
  c = config.client
  buckets = c.get("step_buckets", "pow2")  # clients train only their own steps (see step_buckets.py)
  if c.num_epochs > 0:
    return BatchPlanSpec.create(client_sizes, c.batch_size, num_epochs=c.num_epochs, step_buckets=buckets)
  return BatchPlanSpec.create(client_sizes, c.batch_size, num_epochs=None, num_steps=c.num_steps,
                              step_buckets=buckets)


def build_model(config, data: FederatedData) -> models.Model:
  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  return models.get_model(config.model.name, data.num_classes, data.input_shape, **kwargs)


def make_global_evaluate(model: models.Model, data: FederatedData):
  """Returns ``evaluate(params) -> metrics`` on every client's test split."""
  evaluator = metrics_lib.make_evaluator(model.apply, data.test.num_clients, data.num_classes)
  test = metrics_lib.device_eval_data(data.test)
  return lambda params: evaluator(params, test)


def _to_json(v):
  if isinstance(v, (np.ndarray, jax.Array)):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return v


def run_experiment(exp: Experiment, config, log: Callable[[str], None], write_row: Callable[[dict], None],
                   workdir: str | None = None) -> dict:
  """Runs ``config.num_rounds`` rounds of ``exp`` (resuming from a checkpoint); returns the final evaluation."""
  # The round key travels as raw key data so that it can be a replicated global array too.
  limit = config.get("divergence_loss_limit", float("inf"))
  if exp.host_round_fn is not None:  # config.host_threads > 1 (validated: one process, no mesh)
    host_round = divergence.with_finite_flag(exp.host_round_fn, exp.params_of, limit)
    round_fn = lambda s, t, k: host_round(s, t, jax.random.wrap_key_data(k))
  else:
    exp_round = divergence.with_finite_flag(exp.round_fn, exp.params_of, limit)
    round_fn = jax.jit(lambda s, t, k: exp_round(s, t, jax.random.wrap_key_data(k)), donate_argnums=(0,))
  state, start, ckpt = exp.init_state, 0, None
  train = exp.train
  rng = jax.random.key_data(jax.random.key(config.seed + 1))
  local = lambda s: s
  if distributed.is_multiprocess():
    mesh = client_lib.make_client_mesh(None)
    state, train, rng = distributed.replicate((state, train, rng), mesh)
    local = distributed.to_local
  if workdir is not None and config.checkpoint_every > 0:
    # Multi-process: the state is replicated, so process 0 alone saves it and, on resume, restores
    # it and broadcasts it to the others (no shared filesystem needed).
    multi = distributed.is_multiprocess()
    if not multi or distributed.is_chief():
      ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints", exp.name), process_local=multi)
    last = ckpt.latest_round() if ckpt is not None else None
    if multi:
      last = int(distributed.broadcast_from_chief(np.int64(-1 if last is None else last)))
      last = None if last < 0 else last
    if last is not None and config.resume:
      if last > config.num_rounds:
        raise checkpointing.CheckpointMismatchError(
            f"checkpoint of {exp.name} is at round {last} > config.num_rounds={config.num_rounds}")
      restored, last = ckpt.restore_latest(last, local(state), log) if ckpt is not None else (local(state), last)
      if multi:
        last = int(distributed.broadcast_from_chief(np.int64(last)))
        restored = distributed.replicate(distributed.broadcast_from_chief(restored), mesh)
      state, start = restored, last
      log(f"[{exp.name}] resumed from the checkpoint of round {last}")
  if exp.round_path:
    log(f"[{exp.name}] client training path: {exp.round_path}")
  last_eval, t0 = {}, time.time()
  guard = divergence.Guard(exp.name, config, log, local)
  bar = progress.RoundProgress(exp.name, config.num_rounds, start, log)
  for r in range(start + 1, config.num_rounds + 1):
    state, round_metrics = round_fn(state, train, rng)
    round_metrics = guard.observe(r, round_metrics)
    bar.round_done(r, round_metrics)
    if r % config.eval_every == 0 or r == config.num_rounds:
      guard.check()  # raises before a diverged round's row is written (config.on_divergence="stop")
      row = {"experiment": exp.name, "round": r, "time_s": round(time.time() - t0, 3)}
      row.update({k: _to_json(v) for k, v in local(round_metrics).items()})
      train_done = bar.clock()
      last_eval = exp.evaluate(local(state))
      row.update(last_eval)
      write_row(row)
      bar.evaluated(r, row, train_done)
    if ckpt is not None and (r % config.checkpoint_every == 0 or r == config.num_rounds) and guard.check():
      ckpt.save(r, local(state))
  bar.close()
  if not last_eval:  # resumed at the final round: evaluate the restored state
    last_eval = exp.evaluate(local(state))
  if ckpt is not None:
    ckpt.close()
  if workdir is not None:
    checkpointing.save_params_npz(os.path.join(workdir, f"final_params_{exp.name}.npz"),
                                  exp.params_of(local(state)))
  return last_eval


def plot_curves(rows: list[dict], path: str, keys=("accuracy", "mean_client_accuracy", "train_loss")) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
  names = sorted({r["experiment"] for r in rows})
  for ax, key in zip(axes, keys):
    for name in names:
      pts = [(r["round"], r[key]) for r in rows if r["experiment"] == name and key in r]
      if pts:
        ax.plot(*zip(*pts), label=name, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("round")
    ax.set_title(key)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_table(summary: dict) -> str:
  """Returns a plain-text table of the final metrics of each experiment."""
  cols = ["accuracy", "mean_client_accuracy", "worst_client_accuracy", "loss", "auc"]
  width = max([28] + [len(name) + 2 for name in summary["experiments"]])
  lines = [f"{'experiment':<{width}}" + "".join(f"{c:>24}" for c in cols)]
  for name, m in summary["experiments"].items():
    lines.append(f"{name:<{width}}" + "".join(
        f"{m[c]:>24.4f}" if isinstance(m.get(c), float) else f"{'-':>24}" for c in cols))
  return "\n".join(lines)


MODES: dict[str, Callable] = {}


def register_mode(name: str):
  """Decorator: registers ``runner(config, workdir, log) -> summary`` for ``config.mode == name``."""

  def deco(fn):
    MODES[name] = fn
    return fn

  return deco


def run(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Runs ``config`` in its mode (default ``train``); returns the summary dict."""
  plugins.load_plugins()
  mode = config.get("mode", "train")
  if mode not in MODES:
    raise ValueError(f"config.mode must be one of {sorted(MODES)}, got {mode!r}")
  return MODES[mode](config, workdir, log)


@register_mode("train")
def run_training(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Validates ``config``, runs the simulation, writes outputs to ``workdir``; returns the summary."""
  validate_config(config)
  from fedjax_health import sweep  # a plugin module (config.sweep)
  if config.get("num_seeds", 1) > 1 or sweep.active(config):  # k seeds / swept values as one vmapped program
    from fedjax_health import stacked_seeds
    return stacked_seeds.run_training(config, workdir, log)
  data = data_registry.load_data(config.dataset, seed=config.seed)
  validate_config(config, data)  # the checks that need the data (cohort vs population, ...)
  model = build_model(config, data)
  streaming = config.algorithm in FEDAVG_FAMILY
  resources.check_round_fits(config, data, model, stacked=not streaming)
  if distributed.is_multiprocess() and not distributed.is_chief():
    # Every process computes the same replicated results; only process 0 writes, logs and checkpoints.
    workdir, log = tempfile.mkdtemp(prefix=f"fedjax_health_p{jax.process_index()}_"), (lambda s: None)
  workdir_lib.prepare(workdir, config)  # refuses a workdir of another config (config.overwrite: clears it)
  os.makedirs(workdir, exist_ok=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  resuming = config.checkpoint_every > 0 and config.resume
  if config.checkpoint_every > 0:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not config.resume and os.path.isdir(ckpt_dir):
      shutil.rmtree(ckpt_dir)  # asked to start over
    checkpointing.check_or_write_config(ckpt_dir, config)  # refuses a mismatched checkpoint first
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  experiments = ALGORITHMS[config.algorithm](config, data, model)
  # On resume, rows already written are kept; rounds recomputed after the last checkpoint are
  # identical (deterministic rounds), so they are not written twice.
  rows: list[dict] = []
  if resuming:
    rows = workdir_lib.read_metrics(metrics_path, log)  # drops a last line cut by a kill
  seen = {(r["experiment"], r["round"]) for r in rows}
  board = tensorboard.RunBoard(workdir, replay=rows)  # workdir/tb: event files for TensorBoard
  with open(metrics_path, "a" if resuming else "w") as mf:

    def write_row(row):
      if (row["experiment"], row["round"]) in seen:
        return
      rows.append(row)
      mf.write(json.dumps(row) + "\n")
      mf.flush()
      board.write_row(row)

    log(f"dataset={data.name} clients={data.num_clients} train_examples={data.train.num_examples} "
        f"model={config.model.name} algorithm={config.algorithm} rounds={config.num_rounds} "
        f"devices={jax.device_count()} backend={jax.default_backend()}")
    t0 = time.time()
    finals = {exp.name: run_experiment(exp, config, log, write_row, workdir) for exp in experiments}
  summary = {
      "algorithm": config.algorithm,
      "dataset": data.name,
      "num_rounds": config.num_rounds,
      "seed": config.seed,
      "wall_time_s": round(time.time() - t0, 2),
      "experiments": finals,
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  plot_curves(rows, os.path.join(workdir, "learning_curves.png"))
  tensorboard.finish_training(board, rows, summary, workdir)
  log("\n" + format_table(summary))
  return summary

