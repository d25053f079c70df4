"""The ``attack_defense`` algorithm: FedAvg under an attack, with a defence, read from a config.

``config.attack`` picks the attacker (who, when, what) and ``config.defense`` the server's rule,
detector and the defences outside the aggregator; ``attack_config()`` / ``defense_config()``
give every field with its default. The round is the engine's FedAvg round with hooks:

  client_ctx_fn   attacker_ctx_fn: which cohort members are malicious this round
  data_transform  data poisoning of malicious batches (label flip, backdoor, edge cases)
  projection      PGD onto the ball around the global model (malicious clients only)
  grad_fn         client-side sanitisation (every client: the data-poisoning threat model)
  aggregator      track_rejections(chain(attack, [replacement], reject_nonfinite, [detector],
                  [norm_bound], rule))

Evaluation adds to the engine's metrics: ``asr`` (backdoor success on triggered/edge-case test
inputs not of the target class), ``detection_tpr``/``detection_fpr`` over all participations so
far, ``rejection_rate_per_client``, and with pruning the pruned model's metrics (the deployed
model) plus ``unpruned_accuracy``/``unpruned_asr``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_health import client as client_lib
from fedjax_health.aggregators import base as agg_base
from fedjax_health.aggregators import detection, robust
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.algorithms.registry import build_fedavg_algorithm
from fedjax_health.attacks import defenses, model_poisoning, poisoning
from fedjax_health.config_validation import register_check, require
from fedjax_health.data.federated import FederatedData
from fedjax_health.simulation import Experiment, make_global_evaluate, register_algorithm

DATA_ATTACKS = ("label_flip", "backdoor", "edge_case")
UPDATE_ATTACKS = ("sign_flip", "gaussian", "alie", "ipm", "fang_trimmed_mean", "fang_krum", "nonfinite")
ATTACKS = ("none",) + DATA_ATTACKS + UPDATE_ATTACKS
TARGETED = ("backdoor", "edge_case")
RULES = ("mean", "norm_bound", "weak_dp", "krum", "multi_krum", "median", "trimmed_mean", "geometric_median", "bulyan")
DETECTORS = ("none", "clustering", "autoencoder", "lrr", "err")


def attack_config() -> ml_collections.ConfigDict:
  """Returns the default ``config.attack`` section (no attack)."""
  a = ml_collections.ConfigDict()
  a.kind = "none"  # none | label_flip | backdoor | edge_case | sign_flip | gaussian | alie | ipm | fang_* | nonfinite
  # Who and when.
  a.fraction = 0.1  # malicious share of the population (fixed set) or of each cohort (per_round)
  a.clients = ()  # explicit fixed malicious client ids (override fraction)
  a.per_round = False
  a.seed = 0  # draws the fixed malicious set
  a.start_round = 0  # honest rounds before (0-based round index at which the attack starts)
  a.stop_round = 0  # 0: never stops
  a.every = 1
  # Data poisoning.
  a.target = 0  # backdoor / edge-case / label-flip target class
  a.source = -1  # label_flip: source class (-1: flip every label y -> K - 1 - y); edge_case: tail class (-1: any non-target)
  a.poison_fraction = 0.5  # share of each malicious batch that is poisoned
  a.trigger = "patch"  # patch (images) | features (tabular)
  a.patch_size = 3
  a.patch_value = 1.0
  a.trigger_features = (2, 5)
  a.trigger_values = (3.0, 3.0)
  a.edge_quantile = 0.7  # edge cases: source-class inputs beyond this quantile of k-NN distance
  a.edge_k = 5
  # Model poisoning (targeted): PGD and model replacement.
  a.pgd_radius = 0.0  # > 0: project onto ||w_i - w|| <= radius after every local step
  a.replacement = False  # scale malicious updates by n_S / (n_i eta), eta the server lr (or replacement_scale)
  a.replacement_scale = 0.0  # 0: n_S / (n_i eta)
  # Untargeted (byzantine) updates.
  a.scale = 1.0  # sign_flip
  a.stddev = 1.0  # gaussian
  a.z = -1.0  # alie: -1 = Baruch et al.'s z_max
  a.epsilon = 0.5  # ipm
  a.fang_b = 2.0
  a.knowledge = "full"  # full | partial
  a.stats_include_attackers = False  # alie/ipm, full knowledge: statistics over every client (not the papers')
  a.alie_ddof = 1  # alie: 1 = sample std (Baruch et al.), 0 = population std
  return a


def defense_config() -> ml_collections.ConfigDict:
  """Returns the default ``config.defense`` section (plain FedAvg, no detector)."""
  d = ml_collections.ConfigDict()
  d.aggregator = "mean"  # mean | norm_bound | weak_dp | krum | multi_krum | median | trimmed_mean | geometric_median | bulyan
  d.num_byzantine = 1  # f assumed by Krum / Bulyan
  d.num_selected = 0  # multi_krum: 0 = n - f
  d.trim_fraction = 0.1  # trimmed_mean: share trimmed from each side
  d.max_norm = 1.0  # norm_bound / weak_dp
  d.noise_std = 1e-3  # weak_dp
  d.gm_iters = 10  # geometric_median (RFA) Weiszfeld iterations
  d.detector = "none"  # none | clustering | autoencoder | lrr | err
  d.num_reject = 1  # lrr / err: clients removed per round
  d.cluster_features = 256
  d.cluster_separation = 6.0
  d.ae_dim = 128
  d.ae_hidden = 16
  d.ae_warmup = 3
  d.ae_factor = 1.0
  d.sanitize = False  # client-side data sanitisation (loss under the global model)
  d.min_label_prob = 0.05
  d.prune_fraction = 0.0  # > 0: evaluate the model with this share of dormant hidden units pruned
  d.server_val_fraction = 0.1  # carved from clients' train data when the dataset has no server split
  return d


# ----------------------------------------------------------------------------------------------
# Validation.


def _cohort(config, data) -> int:
  n = data.num_clients if data is not None else None
  return min(config.cohort_size or n, n) if n is not None else config.cohort_size


def needs_server_val(d) -> bool:
  return d.detector in ("lrr", "err") or d.prune_fraction > 0


@register_check
def check_attack_defense(config, data=None) -> None:
  if config.algorithm != "attack_defense":
    return
  for section, maker in (("attack", "attack_config()"), ("defense", "defense_config()")):
    require(section in config, section, f"a section (see attacks/attack_defense.py: {maker})", None)
  a, d = config.attack, config.defense
  require(a.kind in ATTACKS, "attack.kind", f"one of {ATTACKS}", a.kind)
  require(isinstance(a.fraction, (int, float)) and 0.0 <= a.fraction < 1.0, "attack.fraction", "in [0, 1)", a.fraction)
  require(a.start_round >= 0, "attack.start_round", ">= 0", a.start_round)
  require(a.stop_round >= 0, "attack.stop_round", ">= 0 (0: never stops)", a.stop_round)
  require(a.every >= 1, "attack.every", ">= 1", a.every)
  require(0.0 < a.poison_fraction <= 1.0, "attack.poison_fraction", "in (0, 1]", a.poison_fraction)
  require(a.trigger in ("patch", "features"), "attack.trigger", "'patch' or 'features'", a.trigger)
  require(a.pgd_radius >= 0, "attack.pgd_radius", ">= 0 (0: no PGD)", a.pgd_radius)
  require(a.replacement_scale >= 0, "attack.replacement_scale", ">= 0 (0: n_S / n_i)", a.replacement_scale)
  require(a.knowledge in ("full", "partial"), "attack.knowledge", "'full' or 'partial'", a.knowledge)
  require(a.alie_ddof in (0, 1), "attack.alie_ddof", "0 (population std) or 1 (sample std)", a.alie_ddof)
  require(d.aggregator in RULES, "defense.aggregator", f"one of {RULES}", d.aggregator)
  require(d.detector in DETECTORS, "defense.detector", f"one of {DETECTORS}", d.detector)
  require(0.0 <= d.prune_fraction < 1.0, "defense.prune_fraction", "in [0, 1)", d.prune_fraction)
  require(0.0 < d.server_val_fraction < 1.0, "defense.server_val_fraction", "in (0, 1)", d.server_val_fraction)
  require(not (d.sanitize and a.kind != "none" and (a.kind not in DATA_ATTACKS or a.pgd_radius > 0 or a.replacement)),
          "defense.sanitize", "False with a model-poisoning attack (sanitisation assumes the attacker runs the honest "
          "client code on poisoned data)", d.sanitize)
  require(not (d.prune_fraction > 0 and config.model.name == "logreg"), "defense.prune_fraction",
          "0 for logreg (pruning needs a hidden layer: use mlp or cnn)", d.prune_fraction)
  if data is not None:
    n = data.num_clients
    if a.clients:
      require(all(0 <= c < n for c in a.clients) and len(set(a.clients)) < n, "attack.clients",
              f"distinct ids in [0, {n}) leaving an honest client", tuple(a.clients))
    image = len(data.input_shape) == 3
    if a.kind == "backdoor":
      require(a.trigger == ("patch" if image else "features"), "attack.trigger",
              f"'{'patch' if image else 'features'}' for {'image' if image else 'tabular'} data", a.trigger)
    for field, v in (("target", a.target),):
      require(0 <= v < data.num_classes, f"attack.{field}", f"a class in [0, {data.num_classes})", v)
    check_rule_fields(d)
    cohort = _cohort(config, data)
    try:
      build_rule(d, cohort)
    except ValueError as e:
      used = ", ".join(f"defense.{f}={d[f]!r}" for f in RULE_FIELDS[d.aggregator])
      raise ValueError(f"config.defense.aggregator={d.aggregator!r}{' with ' + used if used else ''} cannot work "
                       f"for cohorts of {cohort} clients (config.cohort_size={config.cohort_size}): {e}") from None


# The config.defense fields each aggregation rule reads (named in its errors).
RULE_FIELDS = {"mean": (), "norm_bound": ("max_norm",), "weak_dp": ("max_norm", "noise_std"),
               "krum": ("num_byzantine",), "multi_krum": ("num_byzantine", "num_selected"), "median": (),
               "trimmed_mean": ("trim_fraction",), "geometric_median": ("gm_iters",), "bulyan": ("num_byzantine",)}


def check_rule_fields(d) -> None:
  """Checks the fields the chosen rule reads, each error naming its field."""
  import math
  fields = RULE_FIELDS.get(d.aggregator, ())
  num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  if "max_norm" in fields:
    require(num(d.max_norm) and d.max_norm > 0, "defense.max_norm", "a finite number > 0", d.max_norm)
  if "noise_std" in fields:
    require(num(d.noise_std) and d.noise_std >= 0, "defense.noise_std", "a finite number >= 0", d.noise_std)
  if "num_byzantine" in fields:
    require(isinstance(d.num_byzantine, int) and d.num_byzantine >= 0, "defense.num_byzantine", "an integer >= 0",
            d.num_byzantine)
  if "num_selected" in fields:
    require(isinstance(d.num_selected, int) and d.num_selected >= 0, "defense.num_selected",
            "an integer >= 0 (0: n - f)", d.num_selected)
  if "trim_fraction" in fields:
    require(num(d.trim_fraction) and 0 <= d.trim_fraction < 0.5, "defense.trim_fraction", "in [0, 0.5)",
            d.trim_fraction)
  if "gm_iters" in fields:
    require(isinstance(d.gm_iters, int) and d.gm_iters >= 1, "defense.gm_iters", "an integer >= 1", d.gm_iters)


# ----------------------------------------------------------------------------------------------
# Building blocks.


def build_rule(d, cohort_size: int) -> agg_base.Aggregator:
  """Returns the final aggregation rule of ``config.defense`` for cohorts of ``cohort_size``."""
  if d.aggregator == "mean":
    return agg_base.weighted_mean()
  if d.aggregator == "norm_bound":
    return agg_base.chain(robust.norm_bound(d.max_norm), agg_base.weighted_mean())
  if d.aggregator == "weak_dp":
    return robust.weak_dp(d.max_norm, d.noise_std)
  if d.aggregator == "krum":
    return robust.krum(d.num_byzantine, cohort_size)
  if d.aggregator == "multi_krum":
    return robust.krum(d.num_byzantine, cohort_size, d.num_selected or cohort_size - d.num_byzantine)
  if d.aggregator == "median":
    return robust.coordinate_median()
  if d.aggregator == "trimmed_mean":
    return robust.trimmed_mean(cohort_size, trim_fraction=d.trim_fraction)
  if d.aggregator == "geometric_median":
    return robust.geometric_median(max_iter=d.gm_iters)
  if d.aggregator == "bulyan":
    return robust.bulyan(d.num_byzantine, cohort_size)
  raise ValueError(f"config.defense.aggregator must be one of {RULES}, got {d.aggregator!r}")


def build_attack_transform(a) -> agg_base.UpdateTransform | None:
  """Returns the UpdateTransform of an untargeted attack (None for data attacks)."""
  if a.kind == "sign_flip":
    return model_poisoning.sign_flip(a.scale)
  if a.kind == "gaussian":
    return model_poisoning.gaussian(a.stddev)
  if a.kind == "alie":
    return model_poisoning.alie(None if a.z < 0 else a.z, a.knowledge, a.stats_include_attackers, a.alie_ddof)
  if a.kind == "ipm":
    return model_poisoning.ipm(a.epsilon, a.knowledge, a.stats_include_attackers)
  if a.kind == "fang_trimmed_mean":
    return model_poisoning.fang_trimmed_mean(a.fang_b, a.knowledge)
  if a.kind == "fang_krum":
    return model_poisoning.fang_krum(None, knowledge=a.knowledge)
  if a.kind == "nonfinite":
    return model_poisoning.nonfinite()
  return None


def build_detector(d, model, server_val) -> agg_base.UpdateTransform | None:
  if d.detector == "clustering":
    return detection.clustering_detection(d.cluster_features, d.cluster_separation)
  if d.detector == "autoencoder":
    return detection.autoencoder_detection(d.ae_dim, d.ae_hidden, warmup_rounds=d.ae_warmup, factor=d.ae_factor)
  if d.detector in ("lrr", "err"):
    return detection.loss_rejection(model.apply, server_val["x"], server_val["y"], d.num_reject,
                                    "loss" if d.detector == "lrr" else "error")
  return None


def carve_server_val(data: FederatedData, fraction: float, seed: int = 0) -> FederatedData:
  """Returns ``data`` with a random ``fraction`` of every client's train rows moved to ``server_val``."""
  rng = np.random.default_rng(seed)
  tr = data.train
  held = np.zeros(tr.num_examples, bool)
  for c in range(tr.num_clients):
    lo, hi = tr.offsets[c], tr.offsets[c + 1]
    k = int(round(fraction * (hi - lo)))
    held[lo + rng.permutation(hi - lo)[:k]] = True
  return dataclasses.replace(data, train=poisoning.drop_examples(tr, ~held),
                             server_val={k: v[held] for k, v in tr.arrays.items()})


@dataclasses.dataclass
class Components:
  """Everything ``attack_defense`` adds to FedAvg, plus the (possibly reshaped) data."""

  data: FederatedData
  client_ctx_fn: object
  data_transform: object
  projection: object
  grad_fn: object
  aggregator: agg_base.Aggregator
  attack_x: np.ndarray | None  # inputs the ASR is measured on (None: untargeted)
  target: int


def build_trigger(a) -> poisoning.Trigger:
  """Returns the backdoor trigger of ``config.attack`` (pixel patch or feature values)."""
  if a.trigger == "patch":
    return poisoning.pixel_patch(a.patch_size, a.patch_value)
  return poisoning.feature_trigger(tuple(a.trigger_features), tuple(a.trigger_values))


def build_components(config, data: FederatedData, model) -> Components:
  """Returns the hooks and aggregator of ``config.attack`` / ``config.defense`` for ``data``."""
  a, d = config.attack, config.defense
  cohort = _cohort(config, data)
  attack_x, transform = None, None
  if a.kind == "edge_case":
    source = a.source if a.source >= 0 else (1 - a.target if data.num_classes == 2 else -1)
    if source < 0:
      raise ValueError("config.attack.source must name the edge-case class when there are more than 2 classes")
    data, pool, attack_x = poisoning.split_edge_cases(data, source, a.edge_quantile, a.edge_k)
    transform = poisoning.edge_case(pool, a.target, a.poison_fraction)
  elif a.kind == "backdoor":
    trig = build_trigger(a)
    transform = poisoning.backdoor(trig, a.target, a.poison_fraction)
    attack_x = poisoning.triggered_inputs(data.test.x, data.test.y, trig, a.target)
  elif a.kind == "label_flip":
    src = None if a.source < 0 else a.source
    transform = poisoning.label_flip(data.num_classes, src, None if src is None else a.target)
    if src is not None:
      attack_x = data.test.x[data.test.y == src]
  if needs_server_val(d) and data.server_val is None:
    data = carve_server_val(data, d.server_val_fraction, config.seed)
  ctx_fn = poisoning.attacker_ctx_fn(data.num_clients, fraction=a.fraction, clients=tuple(a.clients) or None,
                                     per_round=a.per_round, seed=a.seed, start_round=a.start_round,
                                     stop_round=a.stop_round or None, every=a.every)
  projection = model_poisoning.pgd_projection(a.pgd_radius) if a.pgd_radius > 0 else None
  grad_fn = None
  if d.sanitize:
    reg = client_lib.prox_regularizer(config.client.prox_mu) if config.client.prox_mu > 0 else None
    grad_fn = defenses.sanitizing_grad_fn(model.example_losses, d.min_label_prob, reg)
  parts = []
  attack_t = build_attack_transform(a)
  if attack_t is not None:
    parts.append(attack_t)
  if a.replacement:
    # The boost divides by the server learning rate when the server applies the mean by SGD.
    server = config.server
    eta = server.learning_rate if server.optimizer == "sgd" and not server.get("momentum", 0.0) else 1.0
    parts.append(model_poisoning.model_replacement(a.replacement_scale or None, server_learning_rate=eta))
  parts.append(agg_base.reject_nonfinite())
  detector = build_detector(d, model, data.server_val)
  if detector is not None:
    parts.append(detector)
  parts.append(build_rule(d, cohort))
  aggregator = detection.track_rejections(agg_base.chain(*parts), data.num_clients)
  return Components(data, ctx_fn, transform, projection, grad_fn, aggregator, attack_x, a.target)


def make_evaluate(config, comp: Components, model):
  """Returns ``evaluate(state) -> metrics`` with ASR, detection rates and the pruned model."""
  base = make_global_evaluate(model, comp.data)
  d = config.defense
  attack_x = None if comp.attack_x is None else jnp.asarray(comp.attack_x)
  asr_fn = jax.jit(lambda p: poisoning.attack_success_rate(model.apply, p, attack_x, comp.target)) \
      if attack_x is not None and attack_x.shape[0] else None
  holdout = None if comp.data.server_val is None else jnp.asarray(comp.data.server_val["x"])

  def with_asr(params):
    m = base(params)
    m["asr"] = float(asr_fn(params)) if asr_fn is not None else float("nan")
    return m

  def evaluate(state):
    m = with_asr(state.params)
    if d.prune_fraction > 0:
      pruned, _ = defenses.prune_dormant_units(model, state.params, holdout, d.prune_fraction)
      unpruned = m
      m = with_asr(pruned)
      m["unpruned_accuracy"], m["unpruned_asr"] = unpruned["accuracy"], unpruned["asr"]
    stats = state.agg_state[1]
    rates = detection.detection_rates(stats)
    m["detection_tpr"], m["detection_fpr"] = rates["tpr"], rates["fpr"]
    sampled, rejected = np.asarray(stats.sampled), np.asarray(stats.rejected)
    m["rejection_rate_per_client"] = np.where(sampled > 0, rejected / np.maximum(sampled, 1), np.nan).tolist()
    return m

  return evaluate


def build_experiment(config, data: FederatedData, model, init_params=None, name: str | None = None) -> Experiment:
  """Returns the attack/defence Experiment (``init_params``: start from a given model)."""
  comp = build_components(config, data, model)
  alg = build_fedavg_algorithm(config, comp.data.train, model, aggregator=comp.aggregator,
                               client_ctx_fn=comp.client_ctx_fn, data_transform=comp.data_transform,
                               projection=comp.projection, grad_fn=comp.grad_fn)
  params = init_params if init_params is not None else model.init(jax.random.key(config.seed))
  name = name or f"{config.attack.kind}_vs_{config.defense.aggregator}" + (
      f"+{config.defense.detector}" if config.defense.detector != "none" else "")
  return Experiment(name, alg.init(params), alg.round_fn,
                    fedavg_lib.device_train_data(comp.data.train, alg.gram_rows), make_evaluate(config, comp, model))


@register_algorithm("attack_defense")
def build_attack_defense(config, data, model):
  return [build_experiment(config, data, model)]
