"""The ``dp_fedavg`` algorithm: FedAvg with client-level and/or patient-level DP and SecAgg, from ``config.privacy``.

Client (hospital) level, ``privacy.client.mechanism``:
  ``central`` DP-FedAvg (server noise; optionally adaptive clipping), ``local`` (each client
  noises its own update), ``distributed`` (each client adds a share of the noise, summed under
  secure aggregation), or ``none``. Cohorts are drawn by ``poisson`` sampling (every client trains,
  a Bernoulli(q) ``participating`` mask decides who counts; q = 1 is full cross-silo
  participation) or ``fixed``-size sampling (the engine's ``cohort_size`` without replacement).
Patient level, ``privacy.patient``: DP-SGD with Poisson-sampled batches inside every client.
``privacy.secagg``: updates summed under simulated SecAgg+ (``secagg.py``), with random dropouts.

Noise multipliers are calibrated to ``target_epsilon`` at ``privacy.delta`` for the planned
``num_rounds`` (``inf`` = clip without noise, 0 = use the given ``noise_multiplier``). Every
evaluation reports ``epsilon_client`` / ``epsilon_patient`` after the rounds run so far, computed
by dp-accounting for exactly the mechanism the round ran. Aggregation weights are public (unit per
client), never the number of examples a client happened to use.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np

from fedjax_health import client as client_lib
from fedjax_health.aggregators import base as agg_base
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.algorithms.registry import build_fedavg_algorithm
from fedjax_health.config_validation import register_check, require
from fedjax_health.privacy import accounting, dp, dp_sgd, secagg
from fedjax_health.simulation import Experiment, make_global_evaluate, register_algorithm
from fedjax_health.traced import as_number

MECHANISMS = ("none", "central", "local", "distributed")
SAMPLINGS = ("poisson", "fixed")


def privacy_config() -> ml_collections.ConfigDict:
  """Returns the default ``config.privacy`` section (client-level central DP at epsilon 8)."""
  p = ml_collections.ConfigDict()
  p.delta = 1e-5
  p.accountant = "rdp"  # rdp | pld (pld: poisson sampling only)
  p.client = ml_collections.ConfigDict()
  p.client.mechanism = "central"  # none | central | local | distributed (needs secagg)
  p.client.sampling = "poisson"  # poisson (rate below; 1 = all clients each round) | fixed (config.cohort_size)
  p.client.sampling_rate = 1.0
  p.client.clip_norm = 1.0
  p.client.target_epsilon = 8.0  # > 0: calibrate the noise; inf: clip only; 0: use noise_multiplier
  p.client.noise_multiplier = 1.0
  p.client.adaptive = False  # Andrew et al. 2021 quantile clipping (central only); clip_norm is the start
  p.client.target_quantile = 0.5
  p.client.clip_learning_rate = 0.2
  p.client.clipped_count_stddev = 0.0  # 0: expected clients / 20 (the paper's default)
  p.patient = ml_collections.ConfigDict()
  p.patient.enabled = False
  p.patient.clip_norm = 1.0
  p.patient.sampling_rate = 0.05  # Poisson rate per local step; expected batch = q * n_c
  p.patient.target_epsilon = 8.0
  p.patient.noise_multiplier = 1.0
  p.secagg = ml_collections.ConfigDict()
  p.secagg.enabled = False
  p.secagg.num_neighbors = 0  # 0: complete graph (k = m - 1, or m - 2 if that is odd with m odd)
  p.secagg.threshold = 0  # 0: floor(k / 2) + 1
  p.secagg.frac_bits = 0  # 0: the largest safe value
  p.secagg.dropout_rate = 0.0  # per client per round, before sending its masked input
  p.secagg.min_survivor_fraction = 0.8  # distributed noise is sized for this many senders
  return p


def _noise_mode(target_epsilon: float) -> str:
  if target_epsilon == math.inf:
    return "none"
  return "calibrate" if target_epsilon > 0 else "given"


@register_check
def check_privacy(config, data=None) -> None:
  if config.algorithm != "dp_fedavg":
    return
  require("privacy" in config, "privacy", "a section (see privacy/experiment.py: privacy_config())", None)
  p = config.privacy
  require(isinstance(p.delta, float) and 0 < p.delta < 1, "privacy.delta", "in (0, 1)", p.delta)
  require(p.accountant in accounting.ACCOUNTANTS, "privacy.accountant", f"one of {accounting.ACCOUNTANTS}", p.accountant)
  c = p.client
  require(c.mechanism in MECHANISMS, "privacy.client.mechanism", f"one of {MECHANISMS}", c.mechanism)
  require(c.sampling in SAMPLINGS, "privacy.client.sampling", f"one of {SAMPLINGS}", c.sampling)
  require(0 < c.sampling_rate <= 1, "privacy.client.sampling_rate", "in (0, 1]", c.sampling_rate)
  for level in (c, p.patient):
    name = "client" if level is c else "patient"
    require(level.clip_norm > 0, f"privacy.{name}.clip_norm", "> 0", level.clip_norm)
    require(level.target_epsilon >= 0, f"privacy.{name}.target_epsilon", ">= 0 (0: use noise_multiplier; inf: no noise)",
            level.target_epsilon)
    if level.target_epsilon == 0:
      require(level.noise_multiplier > 0, f"privacy.{name}.noise_multiplier", "> 0", level.noise_multiplier)
  if c.sampling == "poisson":
    require(config.cohort_size == 0, "cohort_size", "0 with privacy.client.sampling='poisson' (every client is "
            "in the stacked cohort; the Bernoulli mask decides who counts)", config.cohort_size)
  if c.sampling == "fixed":
    require(p.accountant == "rdp", "privacy.accountant", "'rdp' with fixed-size client sampling", p.accountant)
  if c.adaptive:
    require(c.mechanism == "central" and not p.secagg.enabled, "privacy.client.adaptive",
            "False unless mechanism is 'central' without secagg", c.adaptive)
    require(0 < c.target_quantile < 1, "privacy.client.target_quantile", "in (0, 1)", c.target_quantile)
    require(c.clip_learning_rate > 0, "privacy.client.clip_learning_rate", "> 0", c.clip_learning_rate)
    require(c.clipped_count_stddev >= 0, "privacy.client.clipped_count_stddev", ">= 0", c.clipped_count_stddev)
    require(c.target_epsilon != math.inf, "privacy.client.target_epsilon", "finite with adaptive clipping", c.target_epsilon)
  if c.mechanism == "distributed":
    require(p.secagg.enabled, "privacy.secagg.enabled", "True with mechanism 'distributed'", p.secagg.enabled)
  if p.patient.enabled:
    require(0 < p.patient.sampling_rate <= 1, "privacy.patient.sampling_rate", "in (0, 1]", p.patient.sampling_rate)
    require(config.client.num_epochs == 0, "client.num_epochs", "0 with patient-level DP (steps are Poisson batches; "
            "set client.num_steps)", config.client.num_epochs)
    require(config.num_devices <= 1, "num_devices", "<= 1 with patient-level DP", config.num_devices)
  s = p.secagg
  if s.enabled:
    require(c.sampling == "fixed" or c.sampling_rate == 1, "privacy.secagg.enabled",
            "False with Poisson client sampling below rate 1 (the protocol runs over who takes part)", s.enabled)
    require(0 <= s.dropout_rate < 1, "privacy.secagg.dropout_rate", "in [0, 1)", s.dropout_rate)
    require(0 < s.min_survivor_fraction <= 1, "privacy.secagg.min_survivor_fraction", "in (0, 1]",
            s.min_survivor_fraction)
    require(s.num_neighbors >= 0, "privacy.secagg.num_neighbors", ">= 0 (0: complete graph)", s.num_neighbors)
    require(s.threshold >= 0, "privacy.secagg.threshold", ">= 0 (0: majority)", s.threshold)
    if s.num_neighbors and s.threshold:
      require(s.num_neighbors / 2 < s.threshold <= s.num_neighbors, "privacy.secagg.threshold",
              f"in ({s.num_neighbors / 2}, {s.num_neighbors}]", s.threshold)
  if data is not None and s.enabled:
    m = (config.cohort_size or data.num_clients)
    k = s.num_neighbors or _complete_degree(m)
    require(1 <= k <= m - 1 and not (k % 2 and m % 2), "privacy.secagg.num_neighbors",
            f"in [1, {m - 1}] and even when the cohort ({m}) is odd", s.num_neighbors)


def _complete_degree(m: int) -> int:
  k = m - 1
  return k - 1 if (k % 2 and m % 2) else k


def _resolve_noise(level, make_event, delta, accountant) -> float | None:
  mode = _noise_mode(level.target_epsilon)
  if mode == "none":
    return None
  if mode == "calibrate":
    return accounting.calibrate_noise_multiplier(make_event, float(level.target_epsilon), delta, accountant)
  return as_number(level.noise_multiplier)  # traced: one member of a sweep (fedjax_health/sweep.py)


def build_privacy(config, data) -> dict:
  """Returns the pieces ``dp_fedavg`` needs: noise multipliers, aggregator, grad_fn, plan_fn, ctx_fn, ledger."""
  p, c, pat, sa = config.privacy, config.privacy.client, config.privacy.patient, config.privacy.secagg
  n = data.num_clients
  rounds = config.num_rounds
  sizes = data.train.client_sizes
  q = float(c.sampling_rate)
  m = n if c.sampling == "poisson" else (config.cohort_size or n)
  expected = q * n if c.sampling == "poisson" else float(m)
  out = {"cohort_size": m, "client_noise": None, "patient_noise": None}

  # Client level.
  client_event = None  # no client-level DP
  if c.mechanism != "none":
    kind = "local" if c.mechanism == "local" else c.sampling

    def client_event(z, r=rounds):
      return accounting.client_level_event(z, r, kind, q, n, m)

    z = _resolve_noise(c, client_event, p.delta, p.accountant)
    if z is not None and c.adaptive:
      sigma_b = c.clipped_count_stddev or expected / 20.0
      dp.adaptive_update_noise_multiplier(z, sigma_b)  # raises if the count noise is too small
    out["client_noise"] = z

  transforms = [agg_base.reject_nonfinite()]
  z, C = out["client_noise"], as_number(c.clip_norm)
  if sa.enabled:
    k = sa.num_neighbors or _complete_degree(m)
    t = sa.threshold or k // 2 + 1
    num_shares = max(1, math.floor(sa.min_survivor_fraction * m))
    clip_range = C
    noise_mult = 0.0
    if c.mechanism == "central":
      transforms.append(dp.clip_updates(C))
      noise_mult = z or 0.0
    elif c.mechanism == "distributed":
      if z is not None:
        transforms.append(dp.distributed_gaussian(C, z, num_shares))
        clip_range = C + 6.0 * z * C / math.sqrt(num_shares)
      else:
        transforms.append(dp.clip_updates(C))
    elif c.mechanism == "local":
      if z is not None:
        transforms.append(dp.local_gaussian(C, z))
        clip_range = C + 6.0 * z * C
      else:
        transforms.append(dp.clip_updates(C))
    else:  # no client-level DP: still clip, SecAgg needs bounded inputs
      transforms.append(dp.clip_updates(C))
    denominator = expected if c.mechanism in ("central", "distributed") else None
    aggregator = secagg.secure_mean(k, t, clip_range, frac_bits=sa.frac_bits or None, cohort_size=m,
                                    denominator=denominator,
                                    min_survivors=num_shares if c.mechanism == "distributed" else 1,
                                    central_noise_multiplier=noise_mult, clip_norm=C)
    out["secagg"] = {"num_neighbors": k, "threshold": t, "clip_range": clip_range,
                     "bytes_per_client": None}
  elif c.mechanism == "central":
    if z is None:
      aggregator = dp.clipped_fixed_mean(C, expected)
    elif c.adaptive:
      aggregator = dp.adaptive_clip_gaussian_mean(C, z, expected, c.target_quantile, c.clip_learning_rate,
                                                  c.clipped_count_stddev or None)
    else:
      aggregator = dp.central_gaussian_mean(C, z, expected)
  elif c.mechanism == "local":
    transforms.append(dp.local_gaussian(C, z) if z is not None else dp.clip_updates(C))
    aggregator = dp.public_weighted_mean(np.ones(n))
  else:
    aggregator = dp.public_weighted_mean(np.ones(n))
  out["aggregator"] = agg_base.chain(*transforms, aggregator)

  # Patient level.
  patient_event = None
  if pat.enabled:
    steps = config.client.num_steps
    qp = float(pat.sampling_rate)

    def patient_event(z, r=rounds):
      return accounting.patient_level_event(z, qp, r * steps)

    out["patient_noise"] = _resolve_noise(pat, patient_event, p.delta, p.accountant)
    out["patient_denominator"] = qp * float(np.mean(sizes))
    out["plan_fn"] = dp_sgd.poisson_batch_plan(qp, steps, int(np.max(sizes)))

  z_c, z_p = out["client_noise"], out["patient_noise"]
  out["ledger"] = accounting.PrivacyLedger(
      float(p.delta), p.accountant,
      client_event=(lambda r: client_event(z_c if z_c is not None else 1.0, r)) if client_event else None,
      patient_event=(lambda r: patient_event(z_p if z_p is not None else 1.0, r)) if patient_event else None,
      client_noise=z_c is not None, patient_noise=z_p is not None)

  # Cohort context: who counts this round (Poisson) and who drops out of SecAgg.
  def client_ctx_fn(cohort, round_idx, rng):
    del round_idx
    k_part, k_drop = jax.random.split(rng)
    ctx = {"client_id": cohort}
    if c.sampling == "poisson" and q < 1:
      ctx["participating"] = jax.random.bernoulli(k_part, q, cohort.shape)
    if sa.enabled and sa.dropout_rate > 0:
      ctx["dropped"] = jax.random.bernoulli(k_drop, sa.dropout_rate, cohort.shape)
    return ctx

  out["client_ctx_fn"] = client_ctx_fn
  return out


@register_algorithm("dp_fedavg")
def build_dp_fedavg(config, data, model):
  """Returns the DP-FedAvg experiment configured by ``config.privacy`` (module docstring)."""
  parts = build_privacy(config, data)
  overrides = {"aggregator": parts["aggregator"], "client_ctx_fn": parts["client_ctx_fn"],
               "cohort_size": parts["cohort_size"]}
  if "plan_fn" in parts:
    pat = config.privacy.patient
    reg = client_lib.prox_regularizer(config.client.prox_mu) if config.client.prox_mu > 0 else None
    overrides["grad_fn"] = dp_sgd.dp_sgd_grad_fn(model.example_losses, pat.clip_norm, parts["patient_noise"],
                                                 parts["patient_denominator"], reg, step_slot=True)
    overrides["plan_fn"] = parts["plan_fn"]
  alg = build_fedavg_algorithm(config, data.train, model, **overrides)
  state = alg.init(model.init(jax.random.key(config.seed)))
  evaluate = make_global_evaluate(model, data)
  ledger = parts["ledger"]
  if "secagg" in parts:
    num_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state.params))
    parts["secagg"]["bytes_per_client"] = secagg.bytes_per_client(num_params, parts["secagg"]["num_neighbors"])
  constants = {"noise_multiplier_client": parts["client_noise"] if parts["client_noise"] is not None else 0.0,
               "noise_multiplier_patient": parts["patient_noise"] if parts["patient_noise"] is not None else 0.0}
  if "secagg" in parts:
    constants["secagg_bytes_per_client"] = parts["secagg"]["bytes_per_client"]["total"]
    constants["plain_bytes_per_client"] = parts["secagg"]["bytes_per_client"]["plain"]

  def evaluate_with_privacy(st):
    return {**evaluate(st.params), **ledger.epsilons(int(st.round)), **constants}

  return [Experiment("dp_fedavg", state, alg.round_fn, fedavg_lib.device_train_data(data.train, alg.gram_rows),
                     evaluate_with_privacy)]
