"""Several seeds of one experiment as one compiled program: state and round keys stacked, round vmapped.

``--config.num_seeds=k`` runs seeds ``config.seed, ..., config.seed + k - 1`` of a FedAvg-family or
DP-FedAvg experiment (``SUPPORTED``) with ``jax.vmap`` over a leading seed axis of the server state
and of the round keys; the training data is shared. Seed ``s`` is the same computation as a
separate run with ``config.seed = s`` (model init from ``key(s)``, round keys from ``key(s + 1)``;
tested equal to float rounding), so the k runs cost one compile and one program instead of k.

Outputs in ``workdir``: ``metrics.jsonl`` with one row per seed (experiment ``<name>/seed<s>``) and
one per experiment with the mean and sd over seeds (experiment ``<name>/mean``, fields ``<metric>``
and ``<metric>_sd``) at every evaluated round; ``summary.json`` (``experiments``: mean final metrics,
``experiments_sd``, ``per_seed``: each seed's final metrics); ``learning_curves.png`` (mean +- sd
bands); ``final_params_<name>_seed<s>.npz``; ``tb/`` (TensorBoard: one run per seed and per mean).
With ``config.sweep`` (``fedjax_health/sweep.py``) the members are (value, seed) pairs.

Not supported (named in the error): algorithms with per-client state or host-side steps
(clustered, personalised, attacks), checkpoints, sharding, multi-process runs, and datasets whose
federated split changes with the seed (the MedMNIST/synthetic partitions: run those seeds apart).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_health import checkpointing
from fedjax_health import progress
from fedjax_health.config_validation import FEDAVG_FAMILY, register_check, require

SUPPORTED = ("fedavg", "fedprox", "fedopt", "local", "pooled", "dp_fedavg")


@register_check
def check_num_seeds(config, data=None) -> None:
  """config.num_seeds >= 1; > 1 only where the stacked program is the same as separate runs."""
  del data
  k = config.get("num_seeds", 1)
  require(isinstance(k, int) and k >= 1, "num_seeds", "an integer >= 1", k)
  if k == 1:
    return
  why = f"config.num_seeds={k} (seeds stacked in one vmapped program)"
  require(config.get("mode", "train") == "train", "mode", f"'train' with {why}", config.get("mode"))
  require(config.algorithm in SUPPORTED, "algorithm",
          f"one of {list(SUPPORTED)} with {why}; other algorithms keep per-client state or host-side "
          "steps, run their seeds one by one", config.algorithm)
  require(config.checkpoint_every == 0, "checkpoint_every", f"0 with {why} (stacked runs are not checkpointed)",
          config.checkpoint_every)
  require(config.num_devices <= 1, "num_devices", f"0 or 1 with {why} (no sharding of stacked seeds)",
          config.num_devices)
  require(jax.process_count() == 1, "num_seeds", "1 in a multi-process run", k)


def stack_trees(trees: list):
  """Returns the pytree whose leaves are the trees' leaves stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def seed_slice(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


def _same_tree(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


def mean_sd(dicts: list[dict]) -> tuple[dict, dict]:
  """Returns (mean, population sd) over ``dicts`` of every numeric scalar or equal-length list field."""
  mean, sd = {}, {}
  for key in dicts[0]:
    vals = [d.get(key) for d in dicts]
    try:
      arr = np.asarray(vals, dtype=np.float64)
    except (TypeError, ValueError):
      continue
    if arr.dtype.kind != "f" or arr.shape[0] != len(dicts):
      continue
    m, s = arr.mean(0), arr.std(0)
    mean[key] = m.item() if m.ndim == 0 else m.tolist()
    sd[key] = s.item() if s.ndim == 0 else s.tolist()
  return mean, sd


def member_name(name: str, label: str, seed: int) -> str:
  """The metrics.jsonl experiment of one member: ``<name>/seed<s>`` or ``<name>/<label>/seed<s>``."""
  return f"{name}/{label}/seed{seed}" if label else f"{name}/seed{seed}"


def group_name(name: str, label: str) -> str:
  """The summary key of one swept value (mean over seeds): ``<name>`` or ``<name>[<label>]``."""
  return f"{name}[{label}]" if label else name


def run_stacked(experiments: list, seeds: list[int], config, log: Callable[[str], None],
                write_row: Callable[[dict], None], workdir: str | None = None, labels: list[str] | None = None,
                rebuild: Callable | None = None, hparams: dict | None = None) -> list[dict]:
  """Runs the same experiment built for each member (``experiments[i]`` for ``seeds[i]``) as one vmapped
  program for ``config.num_rounds`` rounds; returns each member's final evaluation.

  ``labels[i]`` names member i's swept value ("" without a sweep); with a sweep, ``rebuild(h)`` returns
  the round function built with ``h`` (config path -> traced scalar) and ``hparams`` holds each
  path's values ``[members]``, vmapped with the state and keys.
  """
  from fedjax_health.simulation import _to_json  # the simulation loop's JSON conversion
  exp0 = experiments[0]
  labels = labels or [""] * len(seeds)
  names = {e.name for e in experiments}
  if len(names) != 1:
    raise ValueError(f"stacked seeds must build the same experiment, got {sorted(names)}")
  if not all(_same_tree(e.train, exp0.train) for e in experiments[1:]):
    raise ValueError(f"config.num_seeds > 1: the training data of {exp0.name!r} differs between seeds "
                     f"(config.dataset.name={config.dataset.name!r} partitions with the seed); run its seeds "
                     "one by one")
  k = len(seeds)
  state = stack_trees([e.init_state for e in experiments])
  keys = jnp.stack([jax.random.key_data(jax.random.key(s + 1)) for s in seeds])
  if rebuild is None:  # no sweep: every member runs exp0's round, no hyperparameter is vmapped
    rebuild, hparams = (lambda h: exp0.round_fn), {}
  hp = {path: jnp.asarray(v, jnp.float32) for path, v in hparams.items()}
  step = jax.jit(jax.vmap(lambda h, s, t, key: rebuild(h)(s, t, jax.random.wrap_key_data(key)),
                          in_axes=(0, 0, None, 0)), donate_argnums=(1,))
  round_fn = lambda s, t, key: step(hp, s, t, key)
  groups = list(dict.fromkeys(labels))  # swept values in order
  what = f"{k} members ({len(groups)} values x seeds {seeds[0]}..{seeds[-1]})" if labels[0] else (
      f"{k} seeds {seeds[0]}..{seeds[-1]}")
  if exp0.round_path:
    log(f"[{exp0.name}] client training path: {exp0.round_path}; {what} in one program")
  finals, t0 = [{} for _ in seeds], time.time()
  bar = progress.RoundProgress(exp0.name, config.num_rounds, 0, log)
  for r in range(1, config.num_rounds + 1):
    state, metrics = round_fn(state, exp0.train, keys)
    bar.round_done(r, metrics)
    if r % config.eval_every == 0 or r == config.num_rounds:
      metrics = jax.device_get(metrics)
      train_done = bar.clock()
      now = time.time()
      rows = []
      for i, s in enumerate(seeds):
        finals[i] = experiments[i].evaluate(seed_slice(state, i))
        row = {"experiment": member_name(exp0.name, labels[i], s), "round": r, "seed": s,
               "time_s": round(now - t0, 3)}
        if labels[i]:
          field, value = labels[i].split("=", 1)
          row[field] = float(value)
        row.update({key: _to_json(v[i]) for key, v in metrics.items()})
        row.update(finals[i])
        rows.append(row)
        write_row(row)
      shown = []
      for g in groups:
        members = [row for row, lab in zip(rows, labels) if lab == g]
        mean, sd = mean_sd(members)
        agg = {"experiment": f"{exp0.name}/{g}/mean" if g else f"{exp0.name}/mean", "round": r,
               "num_seeds": len(members), "time_s": round(now - t0, 3)}
        agg.update({key: v for key, v in mean.items() if key not in ("round", "seed", "time_s")})
        agg.update({f"{key}_sd": v for key, v in sd.items() if key not in ("round", "seed", "time_s")})
        write_row(agg)
        if len(members) > 1:
          shown.append((f"{g + ', ' if g else ''}mean of {len(members)} seeds", agg))
        else:  # one seed: its row (an sd of one value says nothing)
          shown.append((f"{g + ', ' if g else ''}seed {members[0]['seed']}", members[0]))
      bar.evaluated(r, shown[0][1], train_done, groups=shown)
  bar.close()
  if workdir is not None:
    for i, s in enumerate(seeds):
      tag = f"{labels[i]}_seed{s}" if labels[i] else f"seed{s}"
      checkpointing.save_params_npz(os.path.join(workdir, f"final_params_{exp0.name}_{tag}.npz"),
                                    exp0.params_of(seed_slice(state, i)))
  return finals


def plot_mean_sd(rows: list[dict], path: str, keys=("accuracy", "mean_client_accuracy", "train_loss")) -> None:
  """Writes learning curves: the mean over seeds with a +-1 sd band, one line per experiment."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
  agg = [r for r in rows if r["experiment"].endswith("/mean")]
  for ax, key in zip(axes, keys):
    for name in sorted({r["experiment"] for r in agg}):
      pts = [(r["round"], r[key], r.get(f"{key}_sd", 0.0)) for r in agg if r["experiment"] == name and key in r]
      if pts:
        x, m, s = map(np.asarray, zip(*pts))
        ax.plot(x, m, label=f"{name[:-5]} (n={agg[0]['num_seeds']})", marker="." if len(x) < 30 else None)
        ax.fill_between(x, m - s, m + s, alpha=0.25)
    ax.set_xlabel("round")
    ax.set_title(f"{key} (mean +- sd over seeds)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_training(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
  """``simulation.run_training`` for ``config.num_seeds > 1`` or a sweep (``fedjax_health/sweep.py``):
  builds every member, runs them stacked."""
  from fedjax_health.config_validation import validate_config
  from fedjax_health.data import registry as data_registry
  from fedjax_health import simulation
  from fedjax_health import resources
  from fedjax_health import sweep
  from fedjax_health import tensorboard
  from fedjax_health import workdir as workdir_lib
  validate_config(config)
  members = sweep.member_configs(config)
  labels = [lab for lab, _, _, _ in members]
  seeds = [s for _, _, s, _ in members]
  data_by_seed, per_member = {}, []
  for i, (lab, _, s, c) in enumerate(members):
    if s not in data_by_seed:
      data_by_seed[s] = data_registry.load_data(c.dataset, seed=s)
    data = data_by_seed[s]
    try:
      validate_config(c, data)  # each swept value, checked as its own run would be
    except ValueError as e:
      raise ValueError(f"config.sweep.values: the member {lab} fails its own checks: {e}") if lab else e
    model = simulation.build_model(c, data)
    if i == 0:
      first_data, first_model, first_config = data, model, c
      # every member holds its own round's working set at once
      streaming = c.algorithm in FEDAVG_FAMILY
      resources.check_round_fits(c, data, model, stacked=not streaming, members=len(members))
    per_member.append(simulation.ALGORITHMS[c.algorithm](c, data, model))
  rebuilds, hparams = [None] * len(per_member[0]), None
  if sweep.active(config):
    leaves = [sweep.traced_leaves(c, data_by_seed[s]) for _, _, s, c in members]
    hparams = {path: [leaf[path] for leaf in leaves] for path in leaves[0]}

    def make_rebuild(j):
      def rebuild(h):
        # Host-side work of the builder (model init, checks on numbers, device data) runs eagerly;
        # only what reads the swept value `h` is traced into the round.
        tc = sweep.traced_config(first_config, h)
        with jax.ensure_compile_time_eval():
          return simulation.ALGORITHMS[tc.algorithm](tc, first_data, first_model)[j].round_fn
      return rebuild

    rebuilds = [make_rebuild(j) for j in range(len(per_member[0]))]
  workdir_lib.prepare(workdir, config)  # refuses a workdir of another config (config.overwrite: clears it)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  rows: list[dict] = []
  swept = f" sweep {config.sweep.field} over {list(config.sweep['values'])} x" if sweep.active(config) else ""
  uniq_seeds = sorted(set(seeds))
  log(f"dataset={first_data.name} clients={first_data.num_clients} algorithm={config.algorithm} "
      f"rounds={config.num_rounds}{swept} seeds={uniq_seeds[0]}..{uniq_seeds[-1]} (one vmapped program) "
      f"backend={jax.default_backend()}")
  t0 = time.time()
  summary = {
      "algorithm": config.algorithm, "dataset": first_data.name, "num_rounds": config.num_rounds,
      "seed": config.seed, "num_seeds": config.num_seeds, "seeds": uniq_seeds,
      "experiments": {}, "experiments_sd": {}, "per_seed": {},
  }
  board = tensorboard.RunBoard(workdir)  # workdir/tb: one TensorBoard run per member and per mean
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as mf:

    def write_row(row):
      rows.append(row)
      mf.write(json.dumps(row) + "\n")
      mf.flush()
      board.write_row(row)

    for j, exps in enumerate(zip(*per_member)):
      finals = run_stacked(list(exps), seeds, config, log, write_row, workdir, labels, rebuilds[j], hparams)
      for g in dict.fromkeys(labels):
        evals = [f for f, lab in zip(finals, labels) if lab == g]
        key = group_name(exps[0].name, g)
        summary["per_seed"][key] = evals
        summary["experiments"][key], summary["experiments_sd"][key] = mean_sd(evals)
  summary["wall_time_s"] = round(time.time() - t0, 2)
  if sweep.active(config):
    summary["sweep"] = sweep_summary(config, summary["experiments"], summary["per_seed"])
    for key, seeds_out in summary["sweep"]["diverged"].items():
      log(f"warning: {key} diverged (non-finite final loss) for seeds {seeds_out}; it is not a candidate for "
          "the best value")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  plot_mean_sd(rows, os.path.join(workdir, "learning_curves.png"))
  tensorboard.finish_training(board, rows, summary, workdir)
  log("\n" + simulation.format_table(summary) + (f"\n(mean over {len(uniq_seeds)} seeds; sd in summary.json)"
                                                 if len(uniq_seeds) > 1 else f"\n(seed {uniq_seeds[0]})"))
  if "sweep" in summary:
    log(f"best {config.sweep.field} by final {summary['sweep']['by']}: {summary['sweep']['best']}")
  return summary


def sweep_summary(config, experiments: dict, per_seed: dict | None = None) -> dict:
  """The sweep's field, values, members that diverged and, per experiment, the value with the best
  mean final metric (accuracy if reported, ties to the lower loss; else the lowest loss) among values
  where no seed diverged
  (a non-finite final loss: a diverged model can still score a majority-class accuracy)."""
  from fedjax_health import sweep
  field, values = config.sweep.field, [float(v) for v in config.sweep["values"]]
  first = next(iter(experiments.values()))
  by, sign = ("accuracy", 1.0) if "accuracy" in first else ("loss", -1.0)
  seeds = [config.seed + i for i in range(config.get("num_seeds", 1))]
  diverged = {}
  for key, evals in (per_seed or {}).items():
    bad = [s for s, m in zip(seeds, evals) if not np.isfinite(m.get("loss", 0.0))]
    if bad:
      diverged[key] = bad
  best = {}
  for name in dict.fromkeys(k.split("[", 1)[0] for k in experiments):
    keys = [(group_name(name, sweep.label(field, v)), v) for v in values]
    # ties on accuracy go to the lower loss
    scored = [(sign * experiments[k].get(by, float("nan")), -experiments[k].get("loss", 0.0), v)
              for k, v in keys if k not in diverged]
    scored = [t for t in scored if np.isfinite(t[0]) and np.isfinite(t[1])]
    best[name] = max(scored)[2] if scored else None
  return {"field": field, "values": values, "by": by, "diverged": diverged,
          "best": best if len(best) > 1 else next(iter(best.values()))}
