"""Personalised FL: every client ends with its own model, judged on its own test split.

One compiled round serves all methods: sample a cohort, gather the cohort's rows of the
per-client state (``state.py``), run ``client_update`` over the cohort with ``map_clients``,
aggregate what clients share, step the server optimiser, scatter the personal rows back.

* FedPer (Arivazhagan et al. 2019): shared representation, personal head. Parameters whose path
  matches ``personal_layers`` (default ``head``) never leave the client: the server's model and
  the aggregate hold only the other layers.
* LG-FedAvg (Liang et al. 2020, "Think locally, act globally"): personal representation
  (``body``), shared head; the same mechanism with the other pattern.
* local only: every layer personal (nothing is shared), the no-collaboration reference.
* APFL (Deng et al. 2020): each client keeps a local model v and a mixing weight alpha; per step
  w <- w - eta grad f(w), v <- v - eta grad_v f(alpha v + (1 - alpha) w), alpha <- alpha - eta_alpha
  grad_alpha f(...) projected to [0, 1]; the personal model is alpha v + (1 - alpha) w. With alpha
  fixed at 0 it is FedAvg, at 1 local training.
* Ditto (Li et al. 2021): FedAvg for w plus a personal v trained on f(v) + lambda/2 ||v - w_t||^2.
* Data interpolation (Mansour et al. 2020, "Three approaches for personalization", eq. 2 of the
  chapter): client k trains on lambda D_k + (1 - lambda) C, C the union of all clients' data, for
  every lambda of a grid, and keeps the lambda with the lowest loss on a held-out part of its own
  training data. Training starts from the FedAvg model of the rounds so far (``finetune_epochs``
  local epochs per lambda); from scratch, a small client's model would get only its own few
  steps. The C term is an unbiased estimate of the federation's average gradient: in simulation
  a batch drawn uniformly from all clients' training examples (a real deployment sums the other
  clients' gradients at the client's model with secure aggregation).
* Local fine-tuning: FedAvg, then every client fine-tunes the global model on its own data.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from fedjax_health import client as client_lib
from fedjax_health import metrics as metrics_lib
from fedjax_health import step_buckets
from fedjax_health.aggregators import base as agg_base
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.algorithms import state as state_lib
from fedjax_health.data.federated import make_batch_plan, sample_cohort

Params = Any
PyTree = Any
ALGORITHM_NAMES = ("fedper", "lg_fedavg", "local_only", "apfl", "ditto", "interpolation", "finetune")
DEFAULT_PERSONAL_LAYERS = {"fedper": "^head/", "lg_fedavg": "^body", "local_only": ".*"}


class PersonalState(NamedTuple):
  params: Params  # what the server holds: shared layers (FedPer, LG) or the global model (APFL, Ditto)
  opt_state: Any
  agg_state: Any
  clients: PyTree  # per-client state, leaves [num_clients, ...]
  round: jax.Array


def check_unit_interval(value: float, name: str) -> None:
  """Raises ValueError unless ``0 <= value <= 1`` (mixing weights such as alpha and lambda)."""
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")


# ----------------------------------------------------------------------------------------------
# Splitting parameters into shared and personal layers.


def personal_mask(params: Params, pattern: str) -> dict[str, bool]:
  """Returns {'layer/.../leaf': is_personal} for ``re.search(pattern, path)``; errors if none match."""
  flat = traverse_util.flatten_dict(params, sep="/")
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"personal_layers {pattern!r} is not a valid regular expression: {e}") from None
  mask = {path: bool(regex.search(path)) for path in flat}
  if not any(mask.values()):
    raise ValueError(f"personal_layers {pattern!r} matches no parameter; parameters are {sorted(flat)}")
  return mask


def split_params(params: Params, mask: dict[str, bool]) -> tuple[Params, Params]:
  """Returns (shared, personal) sub-dicts of ``params`` by the flat-path ``mask``."""
  flat = traverse_util.flatten_dict(params, sep="/")
  shared = {k: v for k, v in flat.items() if not mask[k]}
  personal = {k: v for k, v in flat.items() if mask[k]}
  return traverse_util.unflatten_dict(shared, sep="/"), traverse_util.unflatten_dict(personal, sep="/")


def merge_params(shared: Params, personal: Params) -> Params:
  """Returns the full parameter dict from its shared and personal parts."""
  flat = dict(traverse_util.flatten_dict(shared, sep="/"))
  flat.update(traverse_util.flatten_dict(personal, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------------------------
# The round shared by all personalised methods.

ClientUpdate = Callable[..., tuple[Params, PyTree, dict]]


def personalized_round(*, num_clients: int, cohort_size: int, plan, client_update: ClientUpdate,
                       server_opt: optax.GradientTransformation, aggregator: agg_base.Aggregator | None = None,
                       clients_per_step: int = 1, client_ctx_fn: Callable = fedavg_lib.default_client_ctx,
                       sampling_weights=None):
  """Returns ``(init(shared_params, client_states), round_fn(state, train, rng))``.

  ``client_update(shared, personal, batch, mask, rng, ctx) -> (shared_update, new_personal,
  aux)`` runs on one client (``batch = {"x", "y"}`` of ``[steps, batch, ...]``); ``aux`` needs
  ``loss`` and ``num_examples``. The PRNG keys are split exactly as in ``fedavg.fedavg``, so a
  method whose shared part is FedAvg reproduces FedAvg's global model (up to float rounding).
  """
  if not 1 <= cohort_size <= num_clients:
    raise ValueError(f"cohort_size must be in [1, num_clients={num_clients}], got {cohort_size}")
  aggregator = aggregator or agg_base.chain(agg_base.reject_nonfinite(), agg_base.weighted_mean())

  def init(shared, clients):
    if state_lib.num_clients_of(clients) != num_clients:
      raise ValueError(f"client state has {state_lib.num_clients_of(clients)} rows for {num_clients} clients")
    return PersonalState(shared, server_opt.init(shared), aggregator.init(shared), clients, jnp.zeros((), jnp.int32))

  def round_fn(state: PersonalState, train: dict, rng: jax.Array):
    k_cohort, k_plan, k_clients, k_ctx, k_agg = jax.random.split(jax.random.fold_in(rng, state.round), 5)
    cohort = sample_cohort(k_cohort, num_clients, cohort_size, sampling_weights)
    pos, mask = make_batch_plan(k_plan, train["sizes"][cohort], plan)
    ctx = client_ctx_fn(cohort, state.round, k_ctx)
    personal = state_lib.gather(state.clients, cohort)
    per_client = (train["offsets"][cohort], pos, mask, jax.random.split(k_clients, cohort_size), ctx, personal)

    def one(pc, length):
      offset, pos_c, mask_c, key, ctx_c, pers = pc
      pos_c, mask_c = pos_c[:length], mask_c[:length]  # its step bucket: the steps past are masked
      batch = client_lib.gather_client_batches(train["arrays"], offset, pos_c)
      return client_update(state.params, pers, batch, mask_c, key, ctx_c)

    buckets = getattr(plan, "step_buckets", "pow2")
    updates, new_personal, aux = step_buckets.map_clients_by_length(one, per_client, mask, buckets, clients_per_step)
    weights = aux["num_examples"]
    agg_ctx = {"params": state.params, "round": state.round, "client_ctx": ctx, "cohort": cohort}
    agg, agg_state, info = aggregator.apply(updates, weights, state.agg_state, k_agg, agg_ctx)
    server_updates, opt_state = server_opt.update(jax.tree.map(jnp.negative, agg), state.opt_state, state.params)
    params = optax.apply_updates(state.params, server_updates)
    keep = ~info["rejected"] if "rejected" in info else None
    clients = state_lib.scatter(state.clients, cohort, new_personal, keep)
    metrics = {**metrics_lib.cohort_train_loss(aux["loss"], weights, info.get("rejected")),
               "examples_used": jnp.sum(weights)}
    metrics.update({k: jnp.mean(v) for k, v in aux.items() if k.startswith("mean_")})
    metrics.update({k: v for k, v in info.items() if jnp.ndim(v) == 0})
    return PersonalState(params, opt_state, agg_state, clients, state.round + 1), metrics

  return init, round_fn


# ----------------------------------------------------------------------------------------------
# Client updates of each method.


def partial_update(model, client_opt, mask: dict[str, bool]) -> ClientUpdate:
  """FedPer / LG-FedAvg / local only: train shared + personal layers, upload the shared delta."""
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), client_opt)

  def update(shared, personal, batch, mask_c, key, ctx):
    delta, aux = client_lib.local_train(trainer, merge_params(shared, personal), batch["x"], batch["y"],
                                        mask_c, key, ctx)
    d_shared, d_personal = split_params(delta, mask)
    return d_shared, client_lib.tree_add(personal, d_personal), aux

  return update


def _masked_loss(example_losses):
  return lambda p, x, y, m: client_lib.masked_mean(example_losses(p, x, y), m)


def apfl_update(model, client_opt, alpha_lr: float, adapt_alpha: bool) -> ClientUpdate:
  """APFL (Deng et al. 2020, Alg. 1): joint local steps on (w, v, alpha); upload the w delta."""
  loss = _masked_loss(model.example_losses)
  w_grad = jax.value_and_grad(loss)

  def mixed_loss(v, a, w, x, y, m):
    return loss(jax.tree.map(lambda vi, wi: a * vi + (1.0 - a) * wi, v, w), x, y, m)

  p_grad = jax.value_and_grad(mixed_loss, argnums=(0, 1))

  def grad_fn(p, anchor, x, y, m, rng):
    del anchor, rng
    _, gw = w_grad(p["w"], x, y, m)
    lp, (gv, ga) = p_grad(p["v"], p["alpha"], jax.lax.stop_gradient(p["w"]), x, y, m)
    return {"w": gw, "v": gv, "alpha": ga}, lp

  alpha_opt = optax.sgd(alpha_lr) if adapt_alpha else optax.set_to_zero()
  opt = optax.multi_transform({"model": client_opt, "alpha": alpha_opt},
                              lambda p: {"w": "model", "v": "model", "alpha": "alpha"})
  project = lambda p, anchor, ctx: {**p, "alpha": jnp.clip(p["alpha"], 0.0, 1.0)}
  trainer = client_lib.ClientTrainer(grad_fn, opt, projection=project)

  def update(shared, personal, batch, mask_c, key, ctx):
    joint = {"w": shared, "v": personal["v"], "alpha": personal["alpha"]}
    delta, aux = client_lib.local_train(trainer, joint, batch["x"], batch["y"], mask_c, key, ctx)
    new = client_lib.tree_add(joint, delta)
    aux["mean_alpha"] = new["alpha"]
    return delta["w"], {"v": new["v"], "alpha": new["alpha"]}, aux

  return update


def ditto_update(model, client_opt, lam: float) -> ClientUpdate:
  """Ditto (Li et al. 2021, Alg. 1): w by FedAvg, v on f(v) + lam/2 ||v - w_t||^2, same batches."""
  loss = _masked_loss(model.example_losses)
  vg = jax.value_and_grad(loss)

  def grad_fn(p, anchor, x, y, m, rng):
    del rng
    _, gw = vg(p["w"], x, y, m)
    lv, gv = vg(p["v"], x, y, m)
    gv = jax.tree.map(lambda g, v, w: g + lam * (v - w), gv, p["v"], anchor["w"])
    return {"w": gw, "v": gv}, lv

  trainer = client_lib.ClientTrainer(grad_fn, client_opt)

  def update(shared, personal, batch, mask_c, key, ctx):
    joint = {"w": shared, "v": personal}
    delta, aux = client_lib.local_train(trainer, joint, batch["x"], batch["y"], mask_c, key, ctx)
    return delta["w"], client_lib.tree_add(personal, delta["v"]), aux

  return update


_WIRING = ("add_config", "check_config", "_common", "_client_opt", "build_partial", "build_apfl_experiment",
           "build_partial_from_config",
           "build_apfl", "build_ditto", "build_interpolation", "build_finetune")


def __getattr__(name):  # the config wiring moved to personalized_experiment; old imports keep working
  if name in _WIRING:
    from fedjax_health.algorithms import personalized_experiment  # pylint: disable=import-outside-toplevel
    return getattr(personalized_experiment, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
