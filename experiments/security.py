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

  nice -n 19 python experiments/security.py            # all, ~8 min idle / ~15 min on 2 shared cores
  python experiments/security.py --settings=heart_silo --seeds=0 --attacks=none,backdoor+pgd+repl
  python experiments/security.py --report_only         # docs/security.md, README summary, plots from the JSON
  python experiments/security.py --from_raw            # rebuild docs/results/security.json from results/security/

Writes the raw per-federation results (every per-client rejection rate) to ``results/security/``
(not committed) and the small committed ``docs/results/security.json``, from which
``experiments/security_report.py`` renders the generated sections of docs/security.md and README.md.
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
from experiments import report, security_report as sr  # noqa: E402

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
RULES, DEFENSES = sr.RULES, sr.DEFENSES
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
# Results and report (rendering lives in experiments/security_report.py, cheap to import).


def settings_meta(results: list[dict]) -> dict:
  """The knobs the generated prose quotes, as the run used them."""
  return {"warmup": WARMUP, "attack_rounds": ATTACK_ROUNDS, "prune_fraction": PRUNE_FRACTION,
          "sanitize_min_label_prob": SANITIZE_MIN_LABEL_PROB, "edge_quantile": EDGE_QUANTILE,
          "weak_dp_noise_fraction": 0.5, "sign_flip_scale": 5.0, "gaussian_norm_in_honest_updates": 30.0,
          "ipm_epsilon": 0.5,
          "federations": {r["setting"]: {"pretrain_rounds": SETTINGS[r["setting"]].pretrain_rounds,
                                         "num_byzantine": SETTINGS[r["setting"]].num_byzantine,
                                         "trim_fraction": SETTINGS[r["setting"]].trim_fraction,
                                         "max_norm": r["max_norm"], "label": SETTINGS[r["setting"]].label}
                          for r in results}}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--attacks", default=",".join(ATTACKS))
  parser.add_argument("--defenses", default=",".join(DEFENSES))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default=os.path.join(ROOT, "results", "security"),
                      help="raw per-federation JSON (full per-client detail, not committed)")
  parser.add_argument("--results", default=sr.RESULTS, help="the small committed result file")
  parser.add_argument("--report_only", action="store_true",
                      help="rebuild docs/security.md, the README summary and the plots from --results (no runs)")
  parser.add_argument("--from_raw", action="store_true",
                      help="no runs: rebuild --results from the raw files in --out, then the report")
  parser.add_argument("--command", default="", help="the command recorded in --results (default: this one)")
  args = parser.parse_args(argv)
  log = lambda s: print(s, flush=True)
  names = args.settings.split(",")
  for name in names:
    if name not in SETTINGS:
      raise ValueError(f"--settings must be among {sorted(SETTINGS)}, got {name!r}")
  if not args.report_only:
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in names:
      path = os.path.join(args.out, f"{name}.json")
      if not args.from_raw:
        res = run_federation(name, [int(s) for s in args.seeds.split(",")], args.attacks.split(","),
                             args.defenses.split(","), log)
        res["cross_check_max_abs_diff"] = cross_check(res)
        log(f"[{name}] cross-check vs attack_defense builder: max |param diff| {res['cross_check_max_abs_diff']:.2e}")
        with open(path, "w") as f:
          json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f)
      with open(path) as f:
        results.append(json.load(f))
    command = args.command or "nice -n 19 python experiments/security.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith(("--from_raw", "--command")))
    sr.write_results(results, report.provenance(command.strip(), settings=settings_meta(results)), args.results)
  doc = sr.load(args.results)
  for res in doc["federations"]:
    print(f"\n## {res['label']}\n\n{sr.table_markdown(res)}\n\n{sr.detection_markdown(res)}\n\n{sr.fpr_markdown(res)}")
  sr.plot(doc["federations"], os.path.join(ROOT, "docs", "img", "security_tables.png"))
  sr.plot_fpr(doc["federations"], os.path.join(ROOT, "docs", "img", "security_fpr_skew.png"))
  if args.results == sr.RESULTS:
    report.update_all(names=("security_setup", "security_claims", "security_tables", "security_summary"))


if __name__ == "__main__":
  main()
