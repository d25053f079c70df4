"""Attacks x defences on health data: accuracy, backdoor success, detection rates; docs/security.md.

Three federations, each first trained honestly to near convergence (FedAvg, per seed), then
attacked for ``ATTACK_ROUNDS`` rounds after ``WARMUP`` honest rounds under every defence:
  * ``breastmnist_device``: BreastMNIST over 60 clinics (Dirichlet 1.0), 15 sampled per round,
    a fixed 10% of clinics malicious (cross-device, ``configs/breastmnist_attack.py``);
  * ``breastmnist_silo``: BreastMNIST over 10 clinics (Dirichlet 0.5), all every round, 1 malicious;
  * ``heart_silo``: Fed-Heart-Disease, 4 hospitals, Hungarian malicious (``configs/heart_disease_attack.py``).
Attacks: label flipping, backdoor (black-box, + PGD, + PGD + model replacement), edge-case
backdoor (black-box, + PGD), sign flip, Gaussian, ALIE, IPM, Fang et al. (the variant against
Krum for Krum/Multi-Krum/Bulyan, against trimmed mean otherwise). Defences: FedAvg, norm
bounding, weak DP, Krum, Multi-Krum, median, trimmed mean, RFA, Bulyan, Auror clustering,
autoencoder detection, Fang's LRR, client-side sanitisation (data attacks only), pruning
(the FedAvg run's model with dormant units pruned on server data).

Every cell of a federation runs in ONE compiled program: attack and defence are runtime indices
into ``lax.switch`` over the library's own attack/defence functions (compiling ~400 programs
would take longer than running them on 2 CPUs); seeds are ``vmap``-ed. A cross-check reruns one
cell per federation with the config-driven ``attack_defense`` builder and asserts the same model.
The edge-case tail (30% least dense inputs of the source class) is held out of the honest clients
in every cell, so all cells share the data.

  nice -n 10 .venv/bin/python experiments/security.py            # all, ~15 min on 2 shared cores
  .venv/bin/python experiments/security.py --settings=heart_silo --seeds=0 --attacks=none,backdoor+pgd+repl
  .venv/bin/python experiments/security.py --report_only         # tables/plots from results/security/
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fedjax_health import client as client_lib  # noqa: E402
from fedjax_health import metrics as metrics_lib  # noqa: E402
from fedjax_health import simulation  # noqa: E402
from fedjax_health.aggregators import base as agg_base  # noqa: E402
from fedjax_health.aggregators import detection  # noqa: E402
from fedjax_health.algorithms import fedavg as fedavg_lib  # noqa: E402
from fedjax_health.algorithms.registry import build_fedavg_algorithm  # noqa: E402
from fedjax_health.attacks import attack_defense as ad  # noqa: E402
from fedjax_health.attacks import defenses, model_poisoning as mp, poisoning as po  # noqa: E402
from fedjax_health.data import registry as data_registry  # noqa: E402

WARMUP = 3  # honest rounds of the attack phase (the autoencoder's warm-up)
ATTACK_ROUNDS = 10
EDGE_QUANTILE = 0.7
SANITIZE_MIN_LABEL_PROB = 0.2  # drop examples whose label the global model gives < 20%
UPDATE_ATTACKS = ("none", "sign_flip", "gaussian", "alie", "ipm", "fang_trimmed_mean", "fang_krum")
DATA_MODES = ("none", "backdoor", "edge_case", "label_flip")
DETECTORS = ("none", "clustering", "autoencoder", "lrr")
ATTACKS = {  # name -> knobs
    "none": {},
    "label_flip": {"data": 3},
    "backdoor": {"data": 1},
    "backdoor+pgd": {"data": 1, "pgd": 1},
    "backdoor+pgd+repl": {"data": 1, "pgd": 1, "replace": 1},
    "edge_case": {"data": 2},
    "edge_case+pgd": {"data": 2, "pgd": 1},
    "sign_flip": {"upd": 1},
    "gaussian": {"upd": 2},
    "alie": {"upd": 3},
    "ipm": {"upd": 4},
    "fang": {"upd": 5},
}
DATA_ATTACKS = ("label_flip", "backdoor", "edge_case")
RULES = ("mean", "norm_bound", "weak_dp", "krum", "multi_krum", "median", "trimmed_mean", "geometric_median", "bulyan")
DEFENSES = RULES + ("clustering", "autoencoder", "lrr", "sanitize", "pruning")
PRUNE_FRACTION = 0.5


@dataclasses.dataclass
class Setting:
  config_file: str
  overrides: dict
  num_byzantine: int
  trim_fraction: float
  pretrain_rounds: int
  label: str


SETTINGS = {
    "breastmnist_device": Setting("breastmnist_attack.py", {}, 2, 0.2, 40,
                                  "BreastMNIST, cross-device: 60 clinics, 15 per round, 6 malicious"),
    "breastmnist_silo": Setting("breastmnist_attack.py", {"dataset.num_clients": 10, "dataset.alpha": 0.5,
                                                          "cohort_size": 0, "client.num_epochs": 1},
                                1, 0.1, 30, "BreastMNIST, cross-silo: 10 clinics, all per round, 1 malicious"),
    "heart_silo": Setting("heart_disease_attack.py", {}, 1, 0.25, 20,
                          "Fed-Heart-Disease, cross-silo: 4 hospitals, Hungarian malicious"),
}


def load_config(setting: Setting):
  spec = importlib.util.spec_from_file_location(setting.config_file[:-3], os.path.join(ROOT, "configs", setting.config_file))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("")
  for key, value in setting.overrides.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  config.attack.start_round = WARMUP
  config.defense.min_label_prob = SANITIZE_MIN_LABEL_PROB
  return config


# ----------------------------------------------------------------------------------------------
# One federation: data, pre-training, and the switchable attack/defence program.


@dataclasses.dataclass
class Federation:
  name: str
  setting: Setting
  config: object
  data: object
  model: object
  malicious: np.ndarray  # bool [num_clients]
  pool: np.ndarray
  x_backdoor: np.ndarray
  x_edge: np.ndarray
  max_norm: float = 0.0
  num_params: int = 0


def prepare(name: str) -> Federation:
  setting = SETTINGS[name]
  config = load_config(setting)
  a = config.attack
  data = data_registry.load_data(config.dataset, seed=0)
  source = 1 - a.target
  data, pool, x_edge = po.split_edge_cases(data, source, EDGE_QUANTILE, a.edge_k)
  if data.server_val is None:
    data = ad.carve_server_val(data, config.defense.server_val_fraction, seed=0)
  model = simulation.build_model(config, data)
  trig = ad.build_trigger(a)
  x_backdoor = po.triggered_inputs(data.test.x, data.test.y, trig, a.target)
  malicious = po.fixed_malicious_set(data.num_clients, a.fraction, tuple(a.clients) or None, a.seed)
  return Federation(name, setting, config, data, model, malicious, pool, x_backdoor, x_edge)


def pretrain(fed: Federation, seeds) -> tuple[object, float]:
  """Returns (params stacked over seeds after honest FedAvg, mean honest update norm at the end)."""
  alg = build_fedavg_algorithm(fed.config, fed.data.train, fed.model)
  train = fedavg_lib.device_train_data(fed.data.train)
  params = jax.vmap(fed.model.init)(jnp.stack([jax.random.key(s) for s in seeds]))
  states = jax.vmap(alg.init)(params)
  step = jax.jit(jax.vmap(alg.round_fn, in_axes=(0, None, 0)))
  rngs = jnp.stack([jax.random.key(1000 + s) for s in seeds])
  norms = []
  for _ in range(fed.setting.pretrain_rounds):
    states, m = step(states, train, rngs)
    norms.append(np.asarray(m["mean_update_norm"]))
  return states.params, float(np.mean(norms[-5:]))


def defense_knobs(fed: Federation, defense: str) -> dict | None:
  """Returns the rule/detector/sanitise indices of ``defense`` (None if impossible for the cohort)."""
  rule = defense if defense in RULES else "mean"
  det = defense if defense in DETECTORS else "none"
  rules = available_rules(fed)
  if rule not in rules:
    return None
  return {"rule": rules.index(rule), "det": DETECTORS.index(det), "sanitize": int(defense == "sanitize")}


def cohort_of(fed: Federation) -> int:
  return min(fed.config.cohort_size or fed.data.num_clients, fed.data.num_clients)


def rule_config(fed: Federation, rule: str):
  d = ad.defense_config()
  d.aggregator = rule
  d.num_byzantine = fed.setting.num_byzantine
  d.trim_fraction = fed.setting.trim_fraction
  d.max_norm = fed.max_norm
  d.noise_std = 0.5 * fed.max_norm / np.sqrt(fed.num_params)  # noise norm ~ half an honest update
  return d


def available_rules(fed: Federation) -> list[str]:
  out = []
  for rule in RULES:
    try:
      ad.build_rule(rule_config(fed, rule), cohort_of(fed))
      out.append(rule)
    except ValueError:
      pass
  return out


def switchable_aggregator(fed: Federation, knobs: dict) -> agg_base.Aggregator:
  """Returns the aggregator whose attack, detector and rule are picked by the traced ``knobs``."""
  d = rule_config(fed, "mean")
  attacks = [None, mp.sign_flip(5.0), mp.gaussian(30.0 * fed.max_norm / np.sqrt(fed.num_params)), mp.alie(),
             mp.ipm(0.5), mp.fang_trimmed_mean(), mp.fang_krum(None)]
  replacement = mp.model_replacement()
  nonfinite = agg_base.reject_nonfinite()
  sv = fed.data.server_val
  autoencoder = detection.autoencoder_detection(d.ae_dim, d.ae_hidden, warmup_rounds=WARMUP)
  detectors = [None, detection.clustering_detection(d.cluster_features, d.cluster_separation), autoencoder,
               detection.loss_rejection(fed.model.apply, sv["x"], sv["y"], fed.setting.num_byzantine)]
  rules = [ad.build_rule(rule_config(fed, r), cohort_of(fed)) for r in available_rules(fed)]
  empty = agg_base.EmptyState()

  def apply(updates, weights, state, rng, ctx):
    keys = jax.random.split(rng, 4)

    def attack_branch(t):
      def branch(ops):
        u, w = ops
        if t is None:
          return u, w
        u, w, _, _ = t.apply(u, w, empty, keys[0], ctx)
        return u, w
      return branch

    updates, weights = jax.lax.switch(knobs["upd"], [attack_branch(t) for t in attacks], (updates, weights))
    updates = jax.lax.cond(knobs["replace"] > 0, lambda u: replacement.apply(u, weights, empty, keys[1], ctx)[0],
                           lambda u: u, updates)
    updates, weights, _, nf = nonfinite.apply(updates, weights, empty, keys[1], ctx)

    def detector_branch(t):
      def branch(ops):
        w, st = ops
        if t is None:
          return w, jnp.zeros(w.shape, bool), st
        if t is autoencoder:
          _, w, st, info = t.apply(updates, w, st, keys[2], ctx)
        else:
          _, w, _, info = t.apply(updates, w, empty, keys[2], ctx)
        return w, info["rejected"], st
      return branch

    weights, rej_det, state = jax.lax.switch(knobs["det"], [detector_branch(t) for t in detectors], (weights, state))

    def rule_branch(r):
      def branch(ops):
        u, w = ops
        agg, _, info = r.apply(u, w, r.init(None), keys[3], ctx)
        return agg, info.get("rejected", jnp.zeros(w.shape, bool))
      return branch

    agg, rej_rule = jax.lax.switch(knobs["rule"], [rule_branch(r) for r in rules], (updates, weights))
    return agg, state, {"rejected": nf["rejected"] | rej_det | rej_rule, "num_nonfinite": nf["num_nonfinite"]}

  return detection.track_rejections(agg_base.Aggregator(autoencoder.init, apply), fed.data.num_clients)


def switchable_algorithm(fed: Federation, knobs: dict):
  a, model = fed.config.attack, fed.model
  data_fns = [lambda x, y, m, k, ctx: (x, y), po.backdoor(ad.build_trigger(a), a.target, a.poison_fraction),
              po.edge_case(fed.pool, a.target, a.poison_fraction), po.label_flip(fed.data.num_classes)]

  def data_transform(x, y, m, k, ctx):
    return jax.lax.switch(knobs["data"], data_fns, x, y, m, k, ctx)

  pgd = mp.pgd_projection(fed.max_norm)

  def projection(p, anchor, ctx):
    return jax.lax.cond(knobs["pgd"] > 0, lambda: pgd(p, anchor, ctx), lambda: p)

  plain = client_lib.make_grad_fn(model.example_losses)
  clean = defenses.sanitizing_grad_fn(model.example_losses, fed.config.defense.min_label_prob)

  def grad_fn(params, anchor, x, y, mask, rng):
    return jax.lax.cond(knobs["sanitize"] > 0, lambda: clean(params, anchor, x, y, mask, rng),
                        lambda: plain(params, anchor, x, y, mask, rng))

  ctx_fn = po.attacker_ctx_fn(fed.data.num_clients, clients=tuple(np.flatnonzero(fed.malicious).tolist()),
                              start_round=WARMUP)
  return build_fedavg_algorithm(fed.config, fed.data.train, model, aggregator=switchable_aggregator(fed, knobs),
                                client_ctx_fn=ctx_fn, data_transform=data_transform, projection=projection,
                                grad_fn=grad_fn)


ZERO_KNOBS = {"data": 0, "pgd": 0, "replace": 0, "upd": 0, "det": 0, "rule": 0, "sanitize": 0}


def cell_knobs(fed, attack: str, defense: str) -> dict | None:
  dk = defense_knobs(fed, "mean" if defense == "pruning" else defense)
  if dk is None:
    return None
  if defense == "sanitize" and attack != "none" and attack not in DATA_ATTACKS:
    return None  # sanitisation defends honest code on poisoned data, not a model-poisoning client
  knobs = dict(ZERO_KNOBS, **ATTACKS[attack], **dk)
  if attack == "fang" and defense in ("krum", "multi_krum", "bulyan"):
    knobs["upd"] = UPDATE_ATTACKS.index("fang_krum")
  return {k: jnp.asarray(v, jnp.int32) for k, v in knobs.items()}


# ----------------------------------------------------------------------------------------------
# Running the grid.


def run_federation(name: str, seeds, attacks, defenses_, log) -> dict:
  t0 = time.time()
  fed = prepare(name)
  params, fed.max_norm = pretrain(fed, seeds)
  fed.num_params = int(sum(np.prod(p.shape[1:]) for p in jax.tree.leaves(params)))
  log(f"[{name}] pre-trained {fed.setting.pretrain_rounds} rounds x {len(seeds)} seeds in {time.time() - t0:.0f}s; "
      f"honest update norm {fed.max_norm:.3f} (norm bound and PGD radius)")
  train = fedavg_lib.device_train_data(fed.data.train)
  init = jax.vmap(switchable_algorithm(fed, {k: jnp.asarray(v) for k, v in ZERO_KNOBS.items()}).init)(params)
  rngs = jnp.stack([jax.random.key(s + 1) for s in seeds])

  @jax.jit
  def run_cell(states, knobs):
    step = jax.vmap(lambda st, r: switchable_algorithm(fed, knobs).round_fn(st, train, r)[0], in_axes=(0, 0))
    return jax.lax.fori_loop(0, WARMUP + ATTACK_ROUNDS, lambda i, st: step(st, rngs), states)

  evaluator = metrics_lib.make_evaluator(fed.model.apply, fed.data.test.num_clients, fed.data.num_classes)
  test = metrics_lib.device_eval_data(fed.data.test)
  asr = jax.jit(lambda p, x: po.attack_success_rate(fed.model.apply, p, x, fed.config.attack.target))
  holdout = jnp.asarray(fed.data.server_val["x"])
  prune = jax.jit(lambda p: defenses.prune_dormant_units(fed.model, p, holdout, PRUNE_FRACTION)[0])
  xb, xe = jnp.asarray(fed.x_backdoor), jnp.asarray(fed.x_edge)

  def evaluate(p):
    m = evaluator(p, test)
    return {"accuracy": m["accuracy"], "worst_client_accuracy": m["worst_client_accuracy"],
            "asr_backdoor": float(asr(p, xb)), "asr_edge": float(asr(p, xe))}

  clean_eval = [evaluate(jax.tree.map(lambda l: l[i], params)) for i in range(len(seeds))]
  cells = {}
  t1 = time.time()
  for attack in attacks:
    for defense in defenses_:
      knobs = cell_knobs(fed, attack, defense)
      if knobs is None:
        continue
      states = run_cell(init, knobs)
      per_seed = []
      for i in range(len(seeds)):
        p = jax.tree.map(lambda l: l[i], states.params)
        m = evaluate(prune(p) if defense == "pruning" else p)
        stats = jax.tree.map(lambda l: l[i], states.agg_state[1])
        m.update(detection.detection_rates(stats))
        sampled, rejected = np.asarray(stats.sampled), np.asarray(stats.rejected)
        m["rejection_rate_per_client"] = np.where(sampled > 0, rejected / np.maximum(sampled, 1), np.nan).tolist()
        per_seed.append(m)
      cells[f"{attack}|{defense}"] = per_seed
    log(f"[{name}] {attack:>18}: {sum(k.startswith(attack + '|') for k in cells)} defences done ({time.time() - t1:.0f}s)")
  labels = np.asarray(fed.data.train.y)
  sizes = fed.data.train.client_sizes
  global_p = np.bincount(labels, minlength=fed.data.num_classes) / len(labels)
  skew = [0.5 * float(np.abs(np.bincount(fed.data.train.client(c)["y"], minlength=fed.data.num_classes) / max(n, 1)
                             - global_p).sum()) for c, n in enumerate(sizes)]
  return {"setting": name, "label": fed.setting.label, "seeds": list(seeds), "max_norm": fed.max_norm,
          "rules": available_rules(fed), "malicious": np.flatnonzero(fed.malicious).tolist(), "label_skew": skew,
          "client_ids": list(fed.data.train.client_ids or []), "pretrained": clean_eval, "cells": cells,
          "num_backdoor_inputs": int(len(fed.x_backdoor)), "num_edge_inputs": int(len(fed.x_edge)),
          "wall_time_s": round(time.time() - t0, 1), "_fed": fed, "_params": params, "_run_cell": run_cell,
          "_init": init}


def cross_check(res: dict, attack: str = "backdoor+pgd+repl", defense: str = "median") -> float:
  """Reruns one cell, seed 0, with the config-driven ``attack_defense`` builder; returns max |diff|."""
  fed = res["_fed"]
  config = fed.config
  config.attack.kind = "backdoor"
  config.attack.pgd_radius = fed.max_norm
  config.attack.replacement = True
  config.attack.clients = tuple(res["malicious"])
  config.defense = rule_config(fed, defense)
  p0 = jax.tree.map(lambda l: l[0], res["_params"])
  exp = ad.build_experiment(config, fed.data, fed.model, init_params=p0)
  state, rng = exp.init_state, jax.random.key(res["seeds"][0] + 1)
  step = jax.jit(exp.round_fn)
  for _ in range(WARMUP + ATTACK_ROUNDS):
    state, _ = step(state, exp.train, rng)
  states = res["_run_cell"](res["_init"], cell_knobs(fed, attack, defense))
  ours = jax.tree.map(lambda l: l[0], states.params)
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(state.params)))


# ----------------------------------------------------------------------------------------------
# Report.


def mean_of(per_seed, key):
  v = np.array([m[key] for m in per_seed], np.float64)
  return float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan")


def asr_key(attack: str) -> str | None:
  if attack.startswith("backdoor"):
    return "asr_backdoor"
  if attack.startswith("edge_case"):
    return "asr_edge"
  return None


def table_markdown(res: dict) -> str:
  cells = res["cells"]
  attacks = list(dict.fromkeys(k.split("|")[0] for k in cells))
  defs = [d for d in DEFENSES if any(k.endswith("|" + d) for k in cells)]
  lines = ["| attack \\ defence | " + " | ".join(defs) + " |", "|---" * (len(defs) + 1) + "|"]
  pre = res["pretrained"]
  lines.append(f"| *pre-trained model* | {mean_of(pre, 'accuracy'):.2f} (ASR backdoor {mean_of(pre, 'asr_backdoor'):.2f}, "
               f"edge {mean_of(pre, 'asr_edge'):.2f}) |" + " |" * (len(defs) - 1))
  for a in attacks:
    row = [a]
    for d in defs:
      per = cells.get(f"{a}|{d}")
      if per is None:
        row.append("n/a")
        continue
      acc = mean_of(per, "accuracy")
      key = asr_key(a)
      row.append(f"{acc:.2f} / {mean_of(per, key):.2f}" if key else f"{acc:.2f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def detection_markdown(res: dict) -> str:
  cells = res["cells"]
  attacks = list(dict.fromkeys(k.split("|")[0] for k in cells))
  dets = [d for d in ("clustering", "autoencoder", "lrr", "krum", "multi_krum", "bulyan") if f"none|{d}" in cells]
  lines = ["| attack | " + " | ".join(dets) + " |", "|---" * (len(dets) + 1) + "|"]
  for a in attacks:
    row = ["none (attackers honest)" if a == "none" else a]
    for d in dets:
      per = cells.get(f"{a}|{d}")
      row.append("n/a" if per is None else f"{mean_of(per, 'tpr'):.2f} / {mean_of(per, 'fpr'):.2f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def honest_fpr_by_skew(res: dict, defense: str, attack: str = "none") -> tuple[float, float]:
  """Returns (rejection rate of the most label-skewed quarter of honest clients, of the least)."""
  per = res["cells"].get(f"{attack}|{defense}")
  if per is None:
    return float("nan"), float("nan")
  skew = np.array(res["label_skew"])
  honest = np.setdiff1d(np.arange(len(skew)), res["malicious"])
  rates = np.nanmean(np.array([m["rejection_rate_per_client"] for m in per], np.float64), axis=0)[honest]
  order = np.argsort(skew[honest])
  q = max(1, len(honest) // 4)
  return float(np.nanmean(rates[order[-q:]])), float(np.nanmean(rates[order[:q]]))


def fpr_markdown(res: dict) -> str:
  dets = [d for d in ("clustering", "autoencoder", "lrr", "krum", "multi_krum", "bulyan") if f"none|{d}" in res["cells"]]
  lines = ["| defence | honest FPR, most label-skewed quarter | least skewed quarter |", "|---|---|---|"]
  for d in dets:
    hi, lo = honest_fpr_by_skew(res, d)
    lines.append(f"| {d} | {hi:.2f} | {lo:.2f} |")
  return "\n".join(lines)


def per_client_markdown(res: dict) -> str:
  """Rejection rate of each client without attack (attackers honest), by detector, with label skew."""
  n = len(res["label_skew"])
  dets = [d for d in ("clustering", "autoencoder", "lrr", "krum", "multi_krum", "bulyan") if f"none|{d}" in res["cells"]]
  names = res["client_ids"] or [str(c) for c in range(n)]
  head = [f"{names[c]}{' (attacker)' if c in res['malicious'] else ''}" for c in range(n)]
  lines = ["| | " + " | ".join(head) + " |", "|---" * (n + 1) + "|",
           "| label skew (TV to pooled) | " + " | ".join(f"{v:.2f}" for v in res["label_skew"]) + " |"]
  for d in dets:
    rates = np.nanmean(np.array([m["rejection_rate_per_client"] for m in res["cells"][f"none|{d}"]], np.float64), 0)
    lines.append(f"| {d} | " + " | ".join(f"{v:.2f}" for v in rates) + " |")
  return "\n".join(lines)


def cell(res, attack, defense, key="accuracy"):
  per = res["cells"].get(f"{attack}|{defense}")
  return float("nan") if per is None else mean_of(per, key)


def claims_markdown(results: list[dict]) -> str:
  out = []
  for res in results:
    c = lambda a, d, k="asr_backdoor": cell(res, a, d, k)
    pre = mean_of(res["pretrained"], "asr_backdoor")
    out.append(f"**{res['label']}**")
    out.append(f"- PGD + model replacement against FedAvg near convergence: backdoor ASR {c('backdoor+pgd+repl', 'mean'):.2f} "
               f"(black-box data poisoning {c('backdoor', 'mean'):.2f}, PGD alone {c('backdoor+pgd', 'mean'):.2f}, "
               f"pre-trained model {pre:.2f}); main-task accuracy {c('backdoor+pgd+repl', 'mean', 'accuracy'):.2f} "
               f"(clean FedAvg {c('none', 'mean', 'accuracy'):.2f}).")
    out.append(f"- Norm bounding / weak DP against PGD + replacement: ASR {c('backdoor+pgd+repl', 'norm_bound'):.2f} / "
               f"{c('backdoor+pgd+repl', 'weak_dp'):.2f} (FedAvg {c('backdoor+pgd+repl', 'mean'):.2f}); clean accuracy with "
               f"them {c('none', 'norm_bound', 'accuracy'):.2f} / {c('none', 'weak_dp', 'accuracy'):.2f}.")
    det = [d for d in ("clustering", "autoencoder", "lrr") if f"edge_case+pgd|{d}" in res["cells"]]
    out.append("- Detection TPR, backdoor + PGD + replacement vs edge-case + PGD (vs the attackers behaving honestly): " +
               "; ".join(f"{d} {c('backdoor+pgd+repl', d, 'tpr'):.2f} vs {c('edge_case+pgd', d, 'tpr'):.2f} "
                         f"({c('none', d, 'tpr'):.2f})" for d in det) +
               ". Edge-case ASR under those detectors: " +
               ", ".join(f"{d} {c('edge_case+pgd', d, 'asr_edge'):.2f}" for d in det) +
               f" (FedAvg {c('edge_case+pgd', 'mean', 'asr_edge'):.2f}, pre-trained "
               f"{mean_of(res['pretrained'], 'asr_edge'):.2f}).")
    fpr = []
    for d in ("clustering", "autoencoder", "lrr", "multi_krum", "bulyan"):
      hi, lo = honest_fpr_by_skew(res, d)
      if np.isfinite(hi):
        fpr.append(f"{d} {hi:.2f} vs {lo:.2f}")
    out.append("- Honest clients rejected without any attack, most vs least label-skewed quarter: " + "; ".join(fpr) + ".")
    out.append("")
  return "\n".join(out)


def plot_fpr(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
  for ax, res in zip(axes[0], results):
    skew = np.array(res["label_skew"])
    honest = np.setdiff1d(np.arange(len(skew)), res["malicious"])
    for d, marker in (("autoencoder", "o"), ("lrr", "s"), ("multi_krum", "^"), ("bulyan", "v"), ("clustering", "x")):
      per = res["cells"].get(f"none|{d}")
      if per is None:
        continue
      rates = np.nanmean(np.array([m["rejection_rate_per_client"] for m in per], np.float64), 0)
      ax.scatter(skew[honest], rates[honest], label=d, marker=marker, s=18, alpha=0.7)
    ax.set_xlabel("client label skew (total variation to pooled)")
    ax.set_ylabel("rejection rate, no attack")
    ax.set_title(res["label"], fontsize=8)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(results), 2, figsize=(15, 4.2 * len(results)), squeeze=False)
  for row, res in zip(axes, results):
    cells = res["cells"]
    attacks = list(dict.fromkeys(k.split("|")[0] for k in cells))
    defs = [d for d in DEFENSES if any(k.endswith("|" + d) for k in cells)]
    for ax, (title, key_fn) in zip(row, (("main-task accuracy", lambda a: "accuracy"), ("attack success rate", asr_key))):
      shown = [a for a in attacks if key_fn(a)]
      grid = np.full((len(shown), len(defs)), np.nan)
      for i, a in enumerate(shown):
        for j, d in enumerate(defs):
          if f"{a}|{d}" in cells:
            grid[i, j] = mean_of(cells[f"{a}|{d}"], key_fn(a))
      im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis" if key_fn is not asr_key else "magma_r", aspect="auto")
      ax.set_xticks(range(len(defs)), defs, rotation=45, ha="right", fontsize=7)
      ax.set_yticks(range(len(shown)), shown, fontsize=7)
      for i in range(len(shown)):
        for j in range(len(defs)):
          if np.isfinite(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                    color="white" if (grid[i, j] < 0.5) == (key_fn is not asr_key) else "black")
      ax.set_title(f"{res['label']}: {title}", fontsize=8)
      fig.colorbar(im, ax=ax, fraction=0.03)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


DOC_HEAD = """# Security: backdoor and byzantine attackers vs robust aggregation and detection

Measured by `experiments/security.py` (all numbers below are written by it from
`results/security/*.json`; means over seeds {seeds}; {minutes:.0f} min on 2 shared CPU cores).
Each federation is first trained honestly with FedAvg ({pretrain}), then every cell continues
from that model for {warmup} honest + {attack} attacked rounds: the "near convergence" regime
of the chapter. Accuracy is the main-task test accuracy; ASR (attack success rate) is the share
of triggered test inputs whose true class is not the target (backdoor), or of held-out
edge-case inputs (edge case), classified as the target; cells show `accuracy / ASR` for
targeted attacks and accuracy otherwise. `n/a`: the defence cannot run for the cohort (Krum
needs n > 2f + 2, Bulyan n >= 4f + 3) or does not apply (client-side sanitisation assumes the
attacker runs the honest client code on poisoned data, so only data attacks). Detection tables
give `TPR / FPR` over all participations of the attack phase; the row "none (attackers honest)"
is the rejection rate of the would-be attackers when they behave honestly: a detector's TPR is
only evidence of detection where it exceeds that row.

Reproduce:

    nice -n 10 .venv/bin/python experiments/security.py
    .venv/bin/python experiments/security.py --report_only   # tables and plots from results/

Settings: norm bound and PGD radius = the honest clients' mean update norm at the end of
pre-training; weak DP adds Gaussian noise of total norm half an honest update per round; Krum /
Bulyan / LRR assume f = 2 (cross-device) or 1 (cross-silo); trimmed mean trims 20% / 10% / 25%
per side; Multi-Krum averages n - f; RFA runs 10 smoothed Weiszfeld iterations; the autoencoder
(Li et al. 2020) sees 128 random coordinates and warms up for {warmup} rounds; LRR (Fang et al.)
uses the server's validation data (MedMNIST's val split; 10% of each hospital's training rows for
Fed-Heart-Disease); pruning removes {prune:.0%} of the last hidden layer's units, least active on
that data, from the FedAvg run's model; sanitisation drops training examples whose label the
global model gives probability < {sanitize}. Sign flip sends -5 x the update, Gaussian noise of
norm 30 honest updates, IPM -0.5 x the mean, ALIE Baruch et al.'s z_max, Fang's attack its
Krum variant against Krum / Multi-Krum / Bulyan and its trimmed-mean variant otherwise.
BreastMNIST: a 784-32-2 MLP; backdoor = 3x3 white patch -> "malignant"; edge cases = the 30%
least dense benign images (k-NN), labelled malignant. Fed-Heart-Disease: a 13-16-2 MLP; backdoor
= trestbps and thalach set to +3 (z-scored) -> "disease"; edge cases = the 30% least dense
healthy records, labelled disease. The edge-case tail is held out of every honest client in
every cell, so all cells share data. Cross-check: one cell per federation (backdoor + PGD +
replacement vs median) rerun through the config-driven `attack_defense` builder gives the same
model (max |difference| {check}).
"""


def write_docs(results: list[dict], path: str) -> None:
  r0 = results[0]
  pre = ", ".join(f"{SETTINGS[r['setting']].pretrain_rounds} rounds for {r['setting']}" for r in results)
  text = [DOC_HEAD.format(seeds=",".join(map(str, r0["seeds"])), minutes=sum(r["wall_time_s"] for r in results) / 60,
                          pretrain=pre, warmup=WARMUP, attack=ATTACK_ROUNDS, prune=PRUNE_FRACTION,
                          sanitize=SANITIZE_MIN_LABEL_PROB,
                          check=", ".join(f"{r.get('cross_check_max_abs_diff', float('nan')):.1e}" for r in results))]
  text.append("## The chapter's claims, measured\n")
  text.append(claims_markdown(results))
  text.append(DISCUSSION)
  text.append("![accuracy and ASR heatmaps](img/security_tables.png)\n")
  for res in results:
    text.append(f"## {res['label']}\n")
    text.append("Accuracy / ASR:\n")
    text.append(table_markdown(res) + "\n")
    text.append("Detection (TPR / FPR):\n")
    text.append(detection_markdown(res) + "\n")
    text.append("Honest clients rejected without attack, most vs least label-skewed quarter:\n")
    text.append(fpr_markdown(res) + "\n")
    if len(res["label_skew"]) <= 10:
      text.append("Per client, rejection rate without attack:\n")
      text.append(per_client_markdown(res) + "\n")
  text.append("![honest rejection vs label skew](img/security_fpr_skew.png)\n")
  text.append(API)
  with open(path, "w") as f:
    f.write("\n".join(text))


DISCUSSION = """What the committed run (seeds 0, 1, 2) shows, read against the tables below. BreastMNIST's
test split is small (125 images after the edge-case hold-out): accuracy differences below about
0.03 are within seed noise.

1. **PGD + model replacement succeeds against FedAvg near convergence.** On BreastMNIST the
   backdoor reaches ASR 0.52 (cross-device) and 0.48 (cross-silo) where black-box poisoning
   gets 0.16 / 0.22 and PGD alone 0.10 / 0.20: PGD keeps the malicious update honest-sized, and
   the n_S / n_i boost is what lets 1-2 attackers per round override 14 honest clinics. On
   Fed-Heart-Disease the malicious hospital holds 35% of the training rows, so even black-box
   poisoning reaches ASR 1.00; PGD alone drops to 0.41 and replacement brings it back to 1.00.
2. **Norm bounding and weak DP cut the ASR** of PGD + replacement to 0.10 / 0.12 (BreastMNIST)
   and 0.41 (heart) with no visible accuracy cost: exactly the PGD-alone level, i.e. the bound
   removes the replacement boost but not an attacker who stays inside it. Weak DP at this noise
   level (half an honest update per round) adds nothing over the bound.
3. **Anomaly detection misses the edge-case attacker**: TPR of clustering / autoencoder / LRR falls
   from 0.72 / 0.89 / 0.83 (backdoor + PGD + replacement, cross-device) to 0.00 / 0.08 / 0.16
   (edge case + PGD), and from 1.00 / 1.00 / 0.80 to 0.07 / 0.50 / 0.13 cross-silo. Two caveats
   the numbers also show: the detectors miss the pixel backdoor with PGD alone almost as badly
   (0.00 / 0.42 / 0.20), so the honest-sized update rather than the edge-case data is what hides
   the attacker; and in 10 rounds the edge-case backdoor itself barely succeeds on BreastMNIST
   (ASR <= 0.12 against 0.03-0.06 for the pre-trained model). On Fed-Heart-Disease the
   pre-trained model already calls 85% of the tail healthy records diseased, so the heart
   edge-case rows measure nothing.
4. **Detection removes diverse honest clients.** Without any attack, honest clinics in the most
   label-skewed quarter are rejected more often than the least skewed: LRR 0.21 vs 0.09
   (cross-device) and 0.24 vs 0.04 (cross-silo), Multi-Krum 0.24 vs 0.07 and 0.50 vs 0.00,
   Bulyan 0.37 vs 0.31 and 0.50 vs 0.00, the autoencoder 0.71 vs 0.38 cross-silo (its
   mean-error threshold rejects a fixed share of everyone, 0.30 vs 0.30 cross-device). Krum keeps
   one update per round (FPR ~0.93) and costs 0.05 accuracy cross-device. The autoencoder also
   "detects" the would-be attackers while they are honest (0.67 cross-device; the Hungarian
   hospital 1.00), so its TPR is mostly natural heterogeneity. Auror-style clustering rejects
   almost no honest client but catches only gross outliers (sign flip x5, Gaussian, replacement).
5. Robust rules (median, trimmed mean, RFA, Krum, Bulyan) also cut the replacement backdoor
   (ASR 0.06-0.24 on BreastMNIST, 0.30-0.41 on heart). Pruning half of the dormant hidden units
   removes most of the heart backdoor (1.00 -> 0.26 black-box, 1.00 -> 0.35 PGD + replacement)
   but not BreastMNIST's (0.52 -> 0.52). Client-side sanitisation helps against heart label
   flipping (0.66 -> 0.76 accuracy) and partly against the black-box heart backdoor (1.00 -> 0.78).
6. Untargeted attacks from a converged model, with 10% attackers for 10 rounds, do little: only
   the boosted sign flip hurts FedAvg (0.67 / 0.73 / 0.52 accuracy), which every robust rule
   repairs; ALIE (Baruch's z_max is at most ~0.4 for so few attackers), IPM, Fang's attacks and
   Gaussian noise cost at most 0.04 accuracy (about the seed noise), the largest drops being
   against Krum in the 10-clinic silo (0.04 IPM, 0.06 Fang's Krum attack). Fang et al. and Baruch
   et al. report large damage when attacking from the first round; this grid measures the
   chapter's near-convergence regime.
"""

API = """## Using the pieces

* `fedjax_health/attacks/poisoning.py`: attacker model (`attacker_ctx_fn`: fixed set or per-round
  fraction in [0, 1), attack window) and data poisoning hooks (`label_flip`, `backdoor` with
  `pixel_patch` / `feature_trigger`, `edge_case` + `split_edge_cases`), `attack_success_rate`.
* `fedjax_health/attacks/model_poisoning.py`: `pgd_projection`, `model_replacement`, `sign_flip`,
  `gaussian`, `alie`, `ipm`, `fang_trimmed_mean`, `fang_krum`, `nonfinite` (UpdateTransforms on the
  whole stack, masked by `ctx["client_ctx"]["malicious"]`).
* `fedjax_health/aggregators/robust.py`: `norm_bound`, `weak_dp`, `krum` / `multi_krum`,
  `coordinate_median`, `trimmed_mean`, `geometric_median` (RFA), `bulyan`.
* `fedjax_health/aggregators/detection.py`: `clustering_detection` (Auror), `autoencoder_detection`
  (Li et al.), `loss_rejection` (Fang LRR/ERR), `track_rejections` / `detection_rates`.
* `fedjax_health/attacks/defenses.py`: `sanitizing_grad_fn`, `prune_dormant_units`.
* `fedjax_health/attacks/attack_defense.py`: the `attack_defense` algorithm reading
  `config.attack` / `config.defense`; configs `configs/breastmnist_attack.py`,
  `configs/heart_disease_attack.py` (each with `:smoke`).
"""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--attacks", default=",".join(ATTACKS))
  parser.add_argument("--defenses", default=",".join(DEFENSES))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default=os.path.join(ROOT, "results", "security"))
  parser.add_argument("--report_only", action="store_true")
  parser.add_argument("--docs", default=os.path.join(ROOT, "docs"))
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  log = lambda s: print(s, flush=True)
  names = args.settings.split(",")
  results = []
  for name in names:
    path = os.path.join(args.out, f"{name}.json")
    if not args.report_only:
      res = run_federation(name, [int(s) for s in args.seeds.split(",")], args.attacks.split(","),
                           args.defenses.split(","), log)
      res["cross_check_max_abs_diff"] = cross_check(res)
      log(f"[{name}] cross-check vs attack_defense builder: max |param diff| {res['cross_check_max_abs_diff']:.2e}")
      with open(path, "w") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f)
    with open(path) as f:
      results.append(json.load(f))
  for res in results:
    print(f"\n## {res['label']}\n\n{table_markdown(res)}\n\n{detection_markdown(res)}\n\n{fpr_markdown(res)}")
  if args.docs:
    plot(results, os.path.join(args.docs, "img", "security_tables.png"))
    plot_fpr(results, os.path.join(args.docs, "img", "security_fpr_skew.png"))
    write_docs(results, os.path.join(args.docs, "security.md"))


if __name__ == "__main__":
  main()
