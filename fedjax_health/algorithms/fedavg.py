"""FedAvg, FedProx and FedOpt as one compiled round over the whole cohort.

FedAvg (McMahan et al. 2017): clients run local SGD from the global model; the server averages
their updates weighted by examples used. FedProx (Li et al. 2020) adds ``mu/2 ||w - w_t||^2`` to
the local loss. FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization"): the server treats
the negated aggregate as a pseudo-gradient for an optax optimiser (FedAdam, FedYogi, FedAdagrad);
server SGD with learning rate 1 is exactly FedAvg.

``round_fn(state, train, rng) -> (state, metrics)`` is a pure function of the server state, the
device-resident flat training data (``train = {"arrays", "offsets", "sizes"}``) and a PRNG key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_health import client as client_lib
from fedjax_health.aggregators import base as agg_base
from fedjax_health.data.federated import BatchPlanSpec, make_batch_plan, sample_cohort

Params = Any


class ServerState(NamedTuple):
  params: Params
  opt_state: Any
  agg_state: Any
  round: jax.Array


def server_optimizer(name: str, learning_rate: float = 1.0, b1: float = 0.9, b2: float = 0.99,
                     tau: float = 1e-3, momentum: float = 0.0) -> optax.GradientTransformation:
  """Returns the server optimiser of FedOpt: ``sgd`` (lr 1 = FedAvg), ``adam``, ``yogi``, ``adagrad``.

  ``tau`` is the adaptivity (epsilon) of Reddi et al.; adagrad starts its accumulator at tau^2.
  """
  if learning_rate <= 0:
    raise ValueError(f"server learning_rate must be > 0, got {learning_rate}")
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=tau)
  if name == "yogi":
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=tau)
  if name == "adagrad":
    return optax.adagrad(learning_rate, initial_accumulator_value=tau ** 2, eps=tau)
  raise ValueError(f"server optimizer must be one of sgd, adam, yogi, adagrad; got {name!r}")


def client_optimizer(name: str, learning_rate: float, momentum: float = 0.0) -> optax.GradientTransformation:
  """Returns the local optimiser: ``sgd`` (optionally with momentum) or ``adam``."""
  if learning_rate <= 0:
    raise ValueError(f"client learning_rate must be > 0, got {learning_rate}")
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"client optimizer must be one of sgd, adam; got {name!r}")


@dataclasses.dataclass(frozen=True)
class FederatedAlgorithm:
  """``init(params) -> ServerState``; ``round_fn(state, train, rng) -> (state, metrics)``."""

  init: Callable[[Params], ServerState]
  round_fn: Callable[..., tuple[ServerState, dict]]
  trainer: client_lib.ClientTrainer
  plan: BatchPlanSpec
  cohort_size: int


def default_client_ctx(cohort: jax.Array, round_idx: jax.Array, rng: jax.Array) -> dict:
  del round_idx, rng
  return {"client_id": cohort}


def fedavg(model, *, num_clients: int, cohort_size: int, plan: BatchPlanSpec,
           client_opt: optax.GradientTransformation, server_opt: optax.GradientTransformation | None = None,
           aggregator: agg_base.Aggregator | None = None, prox_mu: float = 0.0,
           clients_per_step: int = 1, mesh=None, grad_fn=None, projection=None, data_transform=None,
           client_ctx_fn: Callable = default_client_ctx, sampling_weights=None, unroll: int | bool = 1,
           map_unroll: int | bool = 1,
           plan_fn: Callable | None = None) -> FederatedAlgorithm:
  """Returns the FedAvg/FedProx/FedOpt algorithm for ``model``.

  Args:
    num_clients, cohort_size: population and clients per round (sampled without replacement,
      uniformly or proportionally to ``sampling_weights``).
    plan: local data plan (batch size, epochs or steps) from ``BatchPlanSpec.create``.
    client_opt, server_opt: local optimiser; server optimiser (default SGD lr 1 = FedAvg).
    aggregator: a stacked-update Aggregator (robust, clustered, DP, ...). Default (None): FedAvg's
      weighted mean with non-finite updates rejected, computed *streaming* (a running sum over
      chunks of clients, never the ``[cohort, params]`` stack), so memory is bounded by the chunk.
    prox_mu: FedProx's proximal coefficient (0 = FedAvg).
    clients_per_step: width of the cohort map (1 = scan, cohort = full vmap).
    mesh: optional ``'clients'`` mesh to shard the cohort across devices.
    grad_fn, projection, data_transform: client hooks (see ``client.py``).
    client_ctx_fn: ``(cohort, round, rng) -> per-client pytree [cohort, ...]`` passed to hooks and
      to the aggregator as ``ctx["client_ctx"]``.
    unroll: unroll of the local-step scan (True: fully; CNNs on CPU, see ``ClientTrainer``).
    map_unroll: unroll of the streaming map over client chunks (True for small conv cohorts on CPU).
    plan_fn: optional ``(rng, sizes[C]) -> (pos, mask)`` replacing ``make_batch_plan(rng, sizes, plan)``
      (e.g. Poisson-sampled batches for DP-SGD).
  """
  if not 1 <= cohort_size <= num_clients:
    raise ValueError(f"cohort_size must be in [1, num_clients={num_clients}], got {cohort_size}")
  server_opt = server_opt or optax.sgd(1.0)
  streaming = aggregator is None
  if streaming:
    aggregator = agg_base.Aggregator(lambda params: (), None)
  if grad_fn is None:
    grad_fn = client_lib.make_grad_fn(model.example_losses,
                                      client_lib.prox_regularizer(prox_mu) if prox_mu > 0 else None)
  trainer = client_lib.ClientTrainer(grad_fn, client_opt, projection, data_transform, unroll)

  def init(params):
    return ServerState(params, server_opt.init(params), aggregator.init(params), jnp.zeros((), jnp.int32))

  def client_fn(shared, per_client):
    params, arrays = shared
    offset, pos, mask, key, ctx = per_client
    batch = client_lib.gather_client_batches(arrays, offset, pos)
    return client_lib.local_train(trainer, params, batch["x"], batch["y"], mask, key, ctx)

  def contribution_fn(shared, per_client):
    delta, aux = client_fn(shared, per_client)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(d)) for d in jax.tree.leaves(delta)]))
    w = jnp.where(finite, aux["num_examples"], 0.0)
    delta = jax.tree.map(lambda d: jnp.where(finite, d, 0.0), delta)
    norm = jnp.sqrt(client_lib.tree_sq_norm(delta))
    aux = dict(aux, num_examples=w)
    return (jax.tree.map(lambda d: d * w, delta), w), (aux, norm, finite)

  def _streaming_weighted_mean(shared, per_client):
    if mesh is None:
      (total, total_w), (aux, norms, finite) = client_lib.map_sum_clients(
          lambda pc: contribution_fn(shared, pc), per_client, clients_per_step, unroll=map_unroll)
    else:
      (total, total_w), (aux, norms, finite) = client_lib.map_sum_clients_sharded(
          contribution_fn, shared, per_client, clients_per_step, mesh, map_unroll)
    agg = jax.tree.map(lambda t: t / jnp.maximum(total_w, 1e-12), total)
    return agg, aux, norms, {"rejected": ~finite, "num_nonfinite": jnp.sum(~finite)}

  def round_fn(state: ServerState, train: dict, rng: jax.Array):
    k_cohort, k_plan, k_clients, k_ctx, k_agg = jax.random.split(jax.random.fold_in(rng, state.round), 5)
    cohort = sample_cohort(k_cohort, num_clients, cohort_size, sampling_weights)
    if plan_fn is None:
      pos, mask = make_batch_plan(k_plan, train["sizes"][cohort], plan)
    else:
      pos, mask = plan_fn(k_plan, train["sizes"][cohort])
    ctx = client_ctx_fn(cohort, state.round, k_ctx)
    per_client = (train["offsets"][cohort], pos, mask, jax.random.split(k_clients, cohort_size), ctx)
    shared = (state.params, train["arrays"])
    if streaming:
      agg, aux, norms, info = _streaming_weighted_mean(shared, per_client)
      agg_state, weights = state.agg_state, aux["num_examples"]
    else:
      if mesh is None:
        updates, aux = client_lib.map_clients(lambda pc: client_fn(shared, pc), per_client, clients_per_step)
      else:
        updates, aux = client_lib.map_clients_sharded(client_fn, shared, per_client, clients_per_step, mesh)
      weights = aux["num_examples"]
      norms = agg_base.client_norms(updates)
      agg_ctx = {"params": state.params, "round": state.round, "client_ctx": ctx, "cohort": cohort}
      agg, agg_state, info = aggregator.apply(updates, weights, state.agg_state, k_agg, agg_ctx)
    pseudo_grad = jax.tree.map(jnp.negative, agg)
    server_updates, opt_state = server_opt.update(pseudo_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, server_updates)
    metrics = {
        "train_loss": jnp.sum(aux["loss"] * weights) / jnp.maximum(jnp.sum(weights), 1.0),
        "examples_used": jnp.sum(weights),
        "mean_update_norm": jnp.mean(norms),
        "aggregate_norm": jnp.sqrt(client_lib.tree_sq_norm(agg)),
    }
    metrics.update({k: v for k, v in info.items() if jnp.ndim(v) == 0})
    if "rejected" in info:
      metrics["num_rejected"] = jnp.sum(info["rejected"])
    return ServerState(params, opt_state, agg_state, state.round + 1), metrics

  return FederatedAlgorithm(init, round_fn, trainer, plan, cohort_size)


def device_train_data(dataset) -> dict:
  """Returns the device pytree ``{"arrays", "offsets", "sizes"}`` that ``round_fn`` reads."""
  return {
      "arrays": {k: jnp.asarray(v) for k, v in dataset.arrays.items()},
      "offsets": jnp.asarray(dataset.offsets, jnp.int32),
      "sizes": jnp.asarray(dataset.client_sizes, jnp.int32),
  }
