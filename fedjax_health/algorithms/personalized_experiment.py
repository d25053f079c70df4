"""Wiring of personalised FL: ``config.personalization``, its checks, and the ``fedper``,
``lg_fedavg``, ``local_only``, ``apfl``, ``ditto``, ``interpolation`` and ``finetune`` algorithms
registered for the launcher (listed in ``fedjax_health/plugins.py``).

The methods themselves (parameter splits, the personalised round, the APFL / Ditto / partial
client updates) are pure functions in ``fedjax_health.algorithms.personalized``, importable
without the simulation or config machinery.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_health import config_validation
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.algorithms import registry as fedavg_registry
from fedjax_health.algorithms import state as state_lib
from fedjax_health.algorithms.personal_eval import (make_finetune, make_personal_evaluate, make_validation_choice,
                                                    split_validation)
from fedjax_health.algorithms.personalized import (ALGORITHM_NAMES, DEFAULT_PERSONAL_LAYERS, apfl_update,
                                                   check_unit_interval, ditto_update, merge_params, partial_update,
                                                   personal_mask, personalized_round, split_params)
from fedjax_health.data.federated import FederatedData, FederatedDataset
from fedjax_health.simulation import Experiment, build_plan, register_algorithm


# ----------------------------------------------------------------------------------------------
# Config sections, checks and builders.


def add_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds ``config.personalization`` with its defaults; returns ``config``."""
  config.personalization = ml_collections.ConfigDict(dict(
      personal_layers="",  # regex on 'layer/param' paths; "" = method default (fedper: head, lg_fedavg: body)
      apfl_alpha=0.25,  # initial (or fixed) mixing weight of the local model
      apfl_adapt_alpha=True,  # learn alpha per client (Deng et al.); False keeps it fixed
      apfl_alpha_lr=0.01,
      ditto_lambda=0.1,  # proximal strength pulling the personal model to the global one
      interpolation_lambdas=(0.0, 0.25, 0.5, 0.75, 1.0),  # weight of the client's own data; picked per client
      val_fraction=0.2,  # interpolation: share of each client's train split held out to pick lambda
      finetune_epochs=1,  # finetune, interpolation: local epochs from the global model before evaluation
  ))
  return config


@config_validation.register_check
def check_config(config, data=None) -> None:
  """Validates ``config.personalization`` for the personalised algorithms."""
  if config.algorithm not in ALGORITHM_NAMES:
    return
  require = config_validation.require
  require("personalization" in config, "personalization", "a section (personalized.add_config)", None)
  p = config.personalization
  require(0.0 <= p.apfl_alpha <= 1.0, "personalization.apfl_alpha", "in [0, 1]", p.apfl_alpha)
  require(p.apfl_alpha_lr > 0, "personalization.apfl_alpha_lr", "> 0", p.apfl_alpha_lr)
  require(p.ditto_lambda >= 0, "personalization.ditto_lambda", ">= 0", p.ditto_lambda)
  lams = tuple(p.interpolation_lambdas)
  require(len(lams) >= 1 and all(0.0 <= l <= 1.0 for l in lams), "personalization.interpolation_lambdas",
          "a non-empty list of values in [0, 1]", lams)
  require(0.0 < p.val_fraction < 1.0, "personalization.val_fraction", "in (0, 1)", p.val_fraction)
  require(p.finetune_epochs >= 1, "personalization.finetune_epochs", ">= 1", p.finetune_epochs)
  require(config.num_devices <= 1, "num_devices", f"<= 1 for {config.algorithm} (no sharded cohort map)",
          config.num_devices)
  try:
    re.compile(p.personal_layers)
  except re.error as e:
    raise ValueError(f"config.personalization.personal_layers must be a regular expression, got "
                     f"{p.personal_layers!r} ({e})") from None


def _common(config, train_ds: FederatedDataset):
  s = config.server
  n = train_ds.num_clients
  return dict(num_clients=n, cohort_size=min(config.cohort_size or n, n),
              plan=build_plan(config, train_ds.client_sizes),
              server_opt=fedavg_lib.server_optimizer(s.optimizer, s.learning_rate, s.b1, s.b2, s.tau, s.momentum),
              clients_per_step=config.clients_per_step)


def _client_opt(config):
  c = config.client
  return fedavg_lib.client_optimizer(c.optimizer, c.learning_rate, c.momentum)


def build_partial(config, data: FederatedData, model, pattern: str, name: str) -> Experiment:
  """Returns the FedPer / LG-FedAvg / local-only experiment with ``pattern`` personal."""
  params = model.init(jax.random.key(config.seed))
  mask = personal_mask(params, pattern)
  shared, personal = split_params(params, mask)
  kw = _common(config, data.train)
  init, round_fn = personalized_round(client_update=partial_update(model, _client_opt(config), mask), **kw)
  state = init(shared, state_lib.broadcast_to_clients(personal, data.num_clients))
  evaluate = make_personal_evaluate(model, data, config.clients_per_step)
  full = lambda st: jax.vmap(lambda pers: merge_params(st.params, pers))(st.clients)
  return Experiment(name, state, round_fn, fedavg_lib.device_train_data(data.train), lambda st: evaluate(full(st)))


def build_apfl_experiment(config, data: FederatedData, model, alpha: float, adapt_alpha: bool,
                          alpha_lr: float = 0.01, name: str = "apfl") -> Experiment:
  """Returns APFL with initial mixing ``alpha`` (learned per client unless ``adapt_alpha`` is False)."""
  check_unit_interval(alpha, "APFL alpha")
  if alpha_lr <= 0:
    raise ValueError(f"APFL alpha_lr must be > 0, got {alpha_lr}")
  params = model.init(jax.random.key(config.seed))
  kw = _common(config, data.train)
  update = apfl_update(model, _client_opt(config), alpha_lr, adapt_alpha)
  init, round_fn = personalized_round(client_update=update, **kw)
  personal = {"v": params, "alpha": jnp.asarray(alpha, jnp.float32)}
  state = init(params, state_lib.broadcast_to_clients(personal, data.num_clients))
  evaluate = make_personal_evaluate(model, data, config.clients_per_step)

  def mixed(st):
    a, v = st.clients["alpha"], st.clients["v"]
    return jax.tree.map(lambda vi, w: a.reshape((-1,) + (1,) * (vi.ndim - 1)) * vi + (1 - a.reshape(
        (-1,) + (1,) * (vi.ndim - 1))) * w[None], v, st.params)

  def ev(st):
    out = evaluate(mixed(st))
    out["mean_alpha"] = float(jnp.mean(st.clients["alpha"]))
    return out

  return Experiment(name, state, round_fn, fedavg_lib.device_train_data(data.train), ev)


@register_algorithm("fedper")
@register_algorithm("lg_fedavg")
@register_algorithm("local_only")
def build_partial_from_config(config, data, model):
  pattern = config.personalization.personal_layers or DEFAULT_PERSONAL_LAYERS[config.algorithm]
  return [build_partial(config, data, model, pattern, config.algorithm)]


@register_algorithm("apfl")
def build_apfl(config, data, model):
  p = config.personalization
  return [build_apfl_experiment(config, data, model, p.apfl_alpha, p.apfl_adapt_alpha, p.apfl_alpha_lr)]


@register_algorithm("ditto")
def build_ditto(config, data, model):
  lam = config.personalization.ditto_lambda
  if lam < 0:
    raise ValueError(f"ditto lambda must be >= 0, got {lam}")
  params = model.init(jax.random.key(config.seed))
  init, round_fn = personalized_round(client_update=ditto_update(model, _client_opt(config), lam),
                                      **_common(config, data.train))
  state = init(params, state_lib.broadcast_to_clients(params, data.num_clients))
  evaluate = make_personal_evaluate(model, data, config.clients_per_step)
  return [Experiment("ditto", state, round_fn, fedavg_lib.device_train_data(data.train),
                     lambda st: evaluate(st.clients))]


@register_algorithm("interpolation")
def build_interpolation(config, data, model):
  p = config.personalization
  lambdas = tuple(float(l) for l in p.interpolation_lambdas)
  for lam in lambdas:
    check_unit_interval(lam, "interpolation lambda")
  fit, val = split_validation(data.train, p.val_fraction, seed=config.seed)
  alg = fedavg_registry.build_fedavg_algorithm(config, fit, model)
  state = alg.init(model.init(jax.random.key(config.seed)))
  grid_fn = make_finetune(model, fit, _client_opt(config), config.client.batch_size, p.finetune_epochs,
                          config.clients_per_step, lambdas)
  evaluate = make_personal_evaluate(model, data, config.clients_per_step)
  choose = make_validation_choice(model, val, len(lambdas), config.clients_per_step)
  lam_arr = np.asarray(lambdas)
  key = jax.random.key(config.seed + 2)

  def ev(st):
    grid = grid_fn(st.params, jax.random.fold_in(key, st.round))
    pick = choose(grid)
    chosen = jax.tree.map(lambda g: jnp.take_along_axis(g, pick.reshape((-1, 1) + (1,) * (g.ndim - 2)), axis=1)[:, 0],
                          grid)
    out = evaluate(chosen)
    out["mean_lambda"] = float(np.mean(lam_arr[np.asarray(pick)]))
    return out

  return [Experiment("interpolation", state, alg.round_fn, fedavg_lib.device_train_data(fit), ev)]


@register_algorithm("finetune")
def build_finetune(config, data, model):
  p = config.personalization
  alg = fedavg_registry.build_fedavg_algorithm(config, data.train, model)
  state = alg.init(model.init(jax.random.key(config.seed)))
  finetune = make_finetune(model, data.train, _client_opt(config), config.client.batch_size, p.finetune_epochs,
                           config.clients_per_step)
  evaluate = make_personal_evaluate(model, data, config.clients_per_step)
  key = jax.random.key(config.seed + 2)
  return [Experiment("finetune", state, alg.round_fn,
                     fedavg_lib.device_train_data(data.train, alg.gram_rows),
                     lambda st: evaluate(finetune(st.params, jax.random.fold_in(key, st.round))))]
