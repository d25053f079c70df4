"""Clustered FL: K cluster models on the server; each client trains, and is judged by, its cluster's.

One compiled round serves all three methods. The server holds the stack of K cluster models
(leaves ``[K, ...]``) and every client's cluster id (per-client state ``[num_clients]``). Each
cohort client picks a cluster, trains that cluster's model locally, and the server aggregates
per cluster.

* multi-center FL (Xie et al. 2021, FeSEM): clients train their current cluster's model; the
  server re-clusters the trained client models by K-means (``aggregators.clustered.
  multicenter_kmeans``: assignment to the nearest centre, per-cluster weighted mean; eq. 1 of the
  chapter, distance pluggable) and stores the new assignments.
* IFCA (Ghosh et al. 2020, "An efficient framework for clustered federated learning"): each
  client evaluates the K models on its round's data, takes the one of lowest loss, trains it;
  the server averages per cluster. The K models start from K different random initialisations.
* CFL (Sattler et al. 2020): start with one cluster; when a cluster's federation has converged
  (``||mean update|| < eps1 * max_i ||update_i||``, a scale-free form of the paper's eps1, and
  ``max_i ||update_i|| > eps2``) but its clients' updates stay large, split it in two by the
  cosine similarity of their updates (``aggregators.clustered.bipartition``); at most one split a
  round, up to ``num_clusters`` clusters.

Partial participation. A client's cluster id is ``-1`` until it first trains (never sampled:
*unassigned*, not "cluster 0"). An unassigned client picks, when it is next sampled, the active
cluster model of lowest loss on its data (``ifca_choose``, IFCA's rule: the only information a
client that did not take part in the clustering has); evaluation does the same with its training
data. When CFL splits a cluster, the members that were absent that round cannot be placed by the
similarity of their updates, so they become unassigned and choose between the active clusters
(the two halves included) the next time they are sampled. ``info["unassigned_clients"]`` counts them.

Evaluation: every client's own cluster model on its own test split, plus the adjusted Rand index
of the clusters against the planted ones where the data has them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_health import client as client_lib
from fedjax_health import metrics as metrics_lib
from fedjax_health import step_buckets
from fedjax_health.aggregators import base as agg_base
from fedjax_health.aggregators import clustered as agg_clustered
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.algorithms import state as state_lib
from fedjax_health.algorithms.personal_eval import example_outputs
from fedjax_health.data.federated import FederatedData, make_batch_plan, sample_cohort

Params = Any
ALGORITHM_NAMES = ("multicenter", "ifca", "cfl")


class ClusteredState(NamedTuple):
  params: Params  # the K cluster models, leaves [K, ...]
  opt_state: Any  # one server optimiser state per cluster (leaves [K, ...])
  agg_state: Any
  clients: dict  # {"cluster": int32 [num_clients]}
  num_active: jax.Array  # clusters in use (CFL grows it; K for the others)
  round: jax.Array


def _take(stacked: Params, k: jax.Array) -> Params:
  return jax.tree.map(lambda c: c[k], stacked)


def cluster_losses(model, stacked: Params, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
  """Returns ``[K]``: the masked mean loss of each cluster model on one client's ``[S, B, ...]`` data."""
  xf = x.reshape((-1,) + x.shape[2:])
  yf, mf = y.reshape(-1), mask.reshape(-1)
  return jax.vmap(lambda p: client_lib.masked_mean(model.example_losses(p, xf, yf), mf))(stacked)


def ifca_choose(example_losses: Callable, cluster_params: Params, x: jax.Array, y: jax.Array,
                mask: jax.Array | None = None, num_active=None) -> tuple[jax.Array, jax.Array]:
  """Returns (cluster index, ``[K]`` losses): IFCA's cluster estimate (Ghosh et al. 2020, Alg. 1).

  The client evaluates every cluster model (leaves ``[K, ...]``) on its examples ``x [N, ...]``,
  ``y [N]`` (``mask [N]`` marks real examples) and picks the one of lowest mean loss; clusters
  ``>= num_active`` are never picked. Pure and jittable; ``example_losses(params, x, y) -> [N]``.
  """
  mask = jnp.ones(y.shape[:1], bool) if mask is None else mask
  losses = jax.vmap(lambda p: client_lib.masked_mean(example_losses(p, x, y), mask))(cluster_params)
  if num_active is not None:
    losses = jnp.where(jnp.arange(losses.shape[0]) < num_active, losses, jnp.inf)
  return jnp.argmin(losses).astype(jnp.int32), losses


def clustered_round(model, *, num_clients: int, cohort_size: int, plan, num_clusters: int,
                    client_opt: optax.GradientTransformation, server_opt: optax.GradientTransformation,
                    aggregator: agg_base.Aggregator, select: str = "stored", clients_per_step: int = 1,
                    client_ctx_fn: Callable = fedavg_lib.default_client_ctx, split_fn: Callable | None = None,
                    reseed_empty: bool = False, sampling_weights=None):
  """Returns ``(init(cluster_params [K, ...], num_active), round_fn(state, train, rng))``.

  Args:
    select: how a client picks the model it trains: ``stored`` (its cluster id from the state:
      multi-center, CFL) or ``min_loss`` (the cluster model of lowest loss on its data: IFCA).
    aggregator: returns one aggregate per cluster (leaves ``[K, ...]``); an ``assignment [cohort]``
      in its info re-assigns clients (multi-center's K-means).
    split_fn: optional ``(centers, cluster_opt_state, cohort_cluster, num_active, updates, weights,
      agg, round) -> (centers, opt_state, cohort_cluster, num_active, info)`` run after the server
      step (CFL's split).
    reseed_empty: a cluster no cohort client chose is reset to the locally trained model of the
      worst-fit client (highest loss under the model it chose; the next worst for a second empty
      cluster, ...), which moves to it: K-means' standard fix for empty clusters. Without it, an
      IFCA model that loses every client in the first round is never trained again.
  """
  if not 1 <= cohort_size <= num_clients:
    raise ValueError(f"cohort_size must be in [1, num_clients={num_clients}], got {cohort_size}")
  agg_clustered.check_num_clusters(num_clusters, num_clients)
  if select not in ("stored", "min_loss"):
    raise ValueError(f"select must be 'stored' or 'min_loss', got {select!r}")
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), client_opt)

  def init(cluster_params, num_active=num_clusters):
    leading = {leaf.shape[0] for leaf in jax.tree.leaves(cluster_params)}
    if leading != {num_clusters}:
      raise ValueError(f"cluster params must have leading dimension num_clusters={num_clusters}, got {leading}")
    unassigned = jnp.full(num_clients, -1, jnp.int32)  # -1: never trained, no cluster yet
    return ClusteredState(cluster_params, jax.vmap(server_opt.init)(cluster_params),
                          aggregator.init(cluster_params), {"cluster": unassigned},
                          jnp.asarray(num_active, jnp.int32), jnp.zeros((), jnp.int32))

  def round_fn(state: ClusteredState, train: dict, rng: jax.Array):
    k_cohort, k_plan, k_clients, k_ctx, k_agg = jax.random.split(jax.random.fold_in(rng, state.round), 5)
    cohort = sample_cohort(k_cohort, num_clients, cohort_size, sampling_weights)
    pos, mask = make_batch_plan(k_plan, train["sizes"][cohort], plan)
    ctx = client_ctx_fn(cohort, state.round, k_ctx)
    stored = state_lib.gather(state.clients, cohort)["cluster"]
    centers = state.params

    def one(pc, length):
      offset, pos_c, mask_c, key, ctx_c, k = pc
      num_keys = pos_c.shape[0]
      pos_c, mask_c = pos_c[:length], mask_c[:length]  # its step bucket: the steps past are masked
      batch = client_lib.gather_client_batches(train["arrays"], offset, pos_c)
      has_data = jnp.any(mask_c)
      choose = lambda: ifca_choose(model.example_losses, centers, batch["x"].reshape((-1,) + batch["x"].shape[2:]),
                                   batch["y"].reshape(-1), mask_c.reshape(-1), state.num_active)[0]
      if select == "min_loss":  # IFCA: every client chooses every round
        k = jnp.where(has_data, choose(), k)
      else:  # stored: only an unassigned client chooses (lax.cond: the others skip the K evaluations)
        k = jax.lax.cond(k < 0, choose, lambda: k)
      k = jnp.maximum(k, 0)  # an unassigned client without data trains (zero steps) cluster 0's model
      start = _take(centers, k)
      fit = client_lib.masked_mean(model.example_losses(start, batch["x"][0], batch["y"][0]), mask_c[0])
      delta, aux = client_lib.local_train(trainer, start, batch["x"], batch["y"], mask_c, key, ctx_c,
                                          num_keys=num_keys)
      aux["cluster"] = k
      aux["fit_loss"] = jnp.where(has_data, fit, -jnp.inf)
      return delta, aux

    per_client = (train["offsets"][cohort], pos, mask, jax.random.split(k_clients, cohort_size), ctx, stored)
    updates, aux = step_buckets.map_clients_by_length(one, per_client, mask, getattr(plan, "step_buckets", "pow2"),
                                                      clients_per_step)
    weights = aux["num_examples"]
    trained = aux["cluster"]
    agg_ctx = {"params": centers, "round": state.round, "client_ctx": {**ctx, "cluster": trained}, "cohort": cohort}
    agg, agg_state, info = aggregator.apply(updates, weights, state.agg_state, k_agg, agg_ctx)
    server_updates, opt_state = jax.vmap(server_opt.update)(jax.tree.map(jnp.negative, agg), state.opt_state, centers)
    centers = optax.apply_updates(centers, server_updates)
    assigned = info.get("assignment", trained)
    num_active = state.num_active
    if reseed_empty:
      centers, assigned, num_reseeded = _reseed_empty(state.params, centers, updates, weights, trained, assigned,
                                                      aux["fit_loss"], num_active, num_clusters)
      info = {**info, "num_reseeded": num_reseeded}
    split_info = {}
    if split_fn is not None:
      centers, opt_state, assigned, num_active, split_info = split_fn(
          centers, opt_state, assigned, num_active, updates, weights, agg, state.round)
    keep = weights > 0  # a client without data this round keeps its cluster
    clients = state_lib.scatter(state.clients, cohort, {"cluster": assigned}, keep)
    if "split_from" in split_info:  # members of a split cluster absent this round become unassigned
      present = jnp.zeros(num_clients, jnp.int32).at[cohort].max(keep.astype(jnp.int32)) > 0
      orphaned = (split_info["split"] > 0) & (state.clients["cluster"] == split_info["split_from"]) & ~present
      clients = {**clients, "cluster": jnp.where(orphaned, -1, clients["cluster"])}
      split_info = {**split_info, "orphaned_by_split": jnp.sum(orphaned)}
    metrics = {
        **metrics_lib.cohort_train_loss(aux["loss"], weights, info.get("rejected")),
        "examples_used": jnp.sum(weights),
        "num_clusters": num_active,
        "clusters_used": jnp.sum(jnp.bincount(assigned, weights=keep.astype(jnp.float32), length=num_clusters) > 0),
        "unassigned_clients": jnp.sum(clients["cluster"] < 0),
    }
    metrics.update({k: v for k, v in {**info, **split_info}.items() if jnp.ndim(v) == 0})
    return ClusteredState(centers, opt_state, agg_state, clients, num_active, state.round + 1), metrics

  return init, round_fn


def _reseed_empty(old_centers, centers, updates, weights, trained, assigned, fit_loss, num_active, num_clusters):
  """Returns (centers, assigned, count): empty active clusters take the worst-fit clients' models."""
  used = jnp.bincount(assigned, weights=(weights > 0).astype(jnp.float32), length=num_clusters) > 0
  empty = ~used & (jnp.arange(num_clusters) < num_active)
  rank = jnp.cumsum(empty) - 1  # r-th empty cluster takes the r-th worst client
  worst = jnp.argsort(-fit_loss)
  client_models = jax.tree.map(lambda c, u: c[trained] + u, old_centers, updates)  # [cohort, ...]
  num_live = jnp.sum(weights > 0)
  for k in range(num_clusters):  # static and small (K); not a loop over clients
    take = empty[k] & (rank[k] < num_live) & (rank[k] < num_clusters)
    i = worst[jnp.clip(rank[k], 0, worst.shape[0] - 1)]
    centers = jax.tree.map(lambda c, m: c.at[k].set(jnp.where(take, m[i], c[k])), centers, client_models)
    assigned = assigned.at[i].set(jnp.where(take, k, assigned[i]))
  return centers, assigned, jnp.sum(empty & (rank < num_live))


def cfl_split(num_clusters: int, eps1: float, eps2: float, warmup_rounds: int, min_size: int = 2) -> Callable:
  """Returns CFL's split step (Sattler et al. 2020, Alg. 1) for ``clustered_round(split_fn=...)``.

  A cluster is a candidate when it has >= ``min_size`` cohort clients with data, the round is
  >= ``warmup_rounds``, fewer than ``num_clusters`` clusters exist, ``||mean update|| < eps1 *
  max ||update_i||`` and ``max ||update_i|| > eps2``. The candidate with the largest max norm is
  bipartitioned by cosine similarity of its clients' updates; the split-off group gets a new
  cluster that starts as a copy of the parent's model (and server optimiser state). Info
  ``split_from``: the parent's index (``clustered_round`` makes its absent members unassigned).
  """
  if not 0.0 < eps1 <= 1.0:
    raise ValueError(f"CFL eps1 (mean/max update norm ratio) must be in (0, 1], got {eps1}")
  if eps2 < 0:
    raise ValueError(f"CFL eps2 (max update norm) must be >= 0, got {eps2}")
  if min_size < 2:
    raise ValueError(f"CFL min_size must be >= 2, got {min_size}")

  def split(centers, opt_state, assigned, num_active, updates, weights, agg, round_idx):
    flat = agg_base.flatten_updates(updates)
    norms = jnp.linalg.norm(flat, axis=1)
    live = weights > 0
    members = (assigned[None, :] == jnp.arange(num_clusters)[:, None]) & live[None, :]  # [K, C]
    max_norm = jnp.max(jnp.where(members, norms[None, :], 0.0), axis=1)
    mean_norm = jnp.linalg.norm(agg_base.flatten_updates(agg), axis=1)
    candidate = ((jnp.arange(num_clusters) < num_active) & (jnp.sum(members, axis=1) >= min_size)
                 & (mean_norm < eps1 * max_norm) & (max_norm > eps2)
                 & (round_idx >= warmup_rounds) & (num_active < num_clusters))
    k = jnp.argmax(jnp.where(candidate, max_norm, -1.0))
    do_split = jnp.any(candidate)
    sim = agg_clustered.cosine_similarity(flat, flat)
    off = agg_clustered.bipartition(sim, members[k]) & do_split
    new_id = jnp.minimum(num_active, num_clusters - 1)
    copy = lambda t: jax.tree.map(lambda a: jnp.where(do_split, a.at[new_id].set(a[k]), a), t)
    info = {"split": do_split.astype(jnp.int32), "split_from": k.astype(jnp.int32), "max_update_norm": jnp.max(max_norm),
            "mean_update_norm_ratio": jnp.max(jnp.where(max_norm > 0, mean_norm / jnp.maximum(max_norm, 1e-12), 0.0))}
    return (copy(centers), copy(opt_state), jnp.where(off, new_id, assigned).astype(jnp.int32),
            num_active + do_split.astype(jnp.int32), info)

  return split


# ----------------------------------------------------------------------------------------------
# Evaluation: each client's cluster model on its own test split; cluster recovery.


def make_cluster_evaluate(model, data: FederatedData):
  """Returns ``evaluate(cluster_params [K, ...], cluster [num_clients], num_active=K) -> metrics``.

  Runs the K models over the whole test set once each and keeps, for every example, the logits
  of its client's cluster (K passes instead of one per client). An unassigned client (cluster
  ``-1``: never sampled, or absent when its cluster split) is judged with the active cluster model
  of lowest loss on its own *training* data (``ifca_choose``'s rule; what it would pick when
  joining), never silently with cluster 0. Adds ``ari`` (adjusted Rand index of those clusters
  against ``data.client_meta["cluster"]`` when it has two or more planted clusters),
  ``clusters_used`` and ``unassigned_clients``.
  """
  test = metrics_lib.device_eval_data(data.test)
  train_cache = []  # the training data goes to the device only if some client is unassigned
  num_clients = data.test.num_clients
  truth = None if data.client_meta is None else data.client_meta.get("cluster")
  if truth is not None and len(np.unique(truth)) < 2:
    truth = None

  @jax.jit
  def effective_clusters(stacked, cluster, num_active, train):
    losses = jax.lax.map(lambda p: model.example_losses(p, train["x"], train["y"]), stacked)  # [K, N]
    per_client = jax.vmap(lambda l: jax.ops.segment_sum(l, train["client"], num_segments=num_clients))(losses)
    counts = jax.ops.segment_sum(jnp.ones_like(train["y"], jnp.float32), train["client"], num_segments=num_clients)
    mean = per_client / jnp.maximum(counts, 1.0)[None, :]
    mean = jnp.where((jnp.arange(stacked_size(stacked)) < num_active)[:, None], mean, jnp.inf)
    return jnp.where(cluster >= 0, cluster, jnp.argmin(mean, axis=0).astype(cluster.dtype))

  @jax.jit
  def outputs(stacked, cluster, test):
    logits = jax.lax.map(lambda p: model.apply(p, test["x"]), stacked)  # [K, N, out]
    mine = cluster[test["client"]]
    chosen = jnp.take_along_axis(logits, mine[None, :, None], axis=0)[0]
    return example_outputs(chosen, test["y"])

  def evaluate(stacked, cluster, num_active=None):
    cluster = jnp.asarray(cluster, jnp.int32)
    num_active = stacked_size(stacked) if num_active is None else num_active
    unassigned = int(jnp.sum(cluster < 0))
    if unassigned:
      if not train_cache:
        train_cache.append(metrics_lib.device_eval_data(data.train))
      cluster = effective_clusters(stacked, cluster, jnp.asarray(num_active), train_cache[0])
    out = metrics_lib.summarize(outputs(stacked, cluster, test), test, data.test.num_clients, data.num_classes)
    cluster = np.asarray(cluster)
    out["clusters_used"] = int(len(np.unique(cluster)))
    out["unassigned_clients"] = unassigned
    if truth is not None:
      out["ari"] = agg_clustered.adjusted_rand_index(truth, cluster)
    return out

  return evaluate


def stacked_size(stacked: Params) -> int:
  """Returns K, the leading dimension of a stack of cluster models."""
  return int(jax.tree.leaves(stacked)[0].shape[0])


_WIRING = ("add_config", "check_config", "build_clustered_experiment", "build_clustered")  # wiring names


def __getattr__(name):  # the config wiring moved to clustered_experiment; old imports keep working
  if name in _WIRING:
    from fedjax_health.algorithms import clustered_experiment  # pylint: disable=import-outside-toplevel
    return getattr(clustered_experiment, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
