"""Clustered aggregation: K-means over client weights, per-cluster means, similarity bipartition.

* ``multicenter_kmeans``: the server step of multi-center FL (Xie et al. 2021, "Multi-center
  federated learning: clients clustering for better personalization", FeSEM). It minimises
  ``sum_i p_i min_k d(W_i, W^(k))`` with ``d = ||.||^2`` (pluggable) by alternating assignment of
  each client model ``W_i`` to its nearest centre and the per-cluster weighted mean (K-means,
  eq. 1 of the chapter), warm-started from the previous round's centres (K-means++ in round 0).
* ``per_cluster_mean``: weighted mean of the updates of the clients of each cluster, with the
  cluster of every client given in ``ctx["client_ctx"]["cluster"]`` (IFCA, CFL).
* ``bipartition``: CFL's split of one cluster into two by cosine similarity of updates (Sattler
  et al. 2020, Algorithm "optimal bipartition": merge the most similar pairs until two groups
  remain, i.e. single linkage = cut the weakest edge of the maximum spanning tree).
* ``adjusted_rand_index``: cluster recovery against planted clusters (Hubert & Arabie 1985).

Clustered aggregators return a *stack* of K aggregates (leaves ``[K, ...]``) and see the K cluster
models as ``ctx["params"]`` (leaves ``[K, ...]``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_health import context
from fedjax_health.aggregators.base import Aggregator, EmptyState, flatten_updates, unflatten_like

Distance = Callable[[jax.Array, jax.Array], jax.Array]


def squared_l2(points: jax.Array, centers: jax.Array) -> jax.Array:
  """Returns ``[n, K]`` squared Euclidean distances between rows of points and centres."""
  return jnp.sum(jnp.square(points[:, None, :] - centers[None, :, :]), axis=-1)


def cosine_distance(points: jax.Array, centers: jax.Array) -> jax.Array:
  """Returns ``[n, K]`` ``1 - cos(points_i, centers_k)`` (0 for a zero vector against anything)."""
  return 1.0 - cosine_similarity(points, centers)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Returns ``[n, m]`` cosine similarities of the rows of ``a`` and ``b``."""
  na = jnp.linalg.norm(a, axis=1, keepdims=True)
  nb = jnp.linalg.norm(b, axis=1, keepdims=True)
  return (a / jnp.maximum(na, 1e-12)) @ (b / jnp.maximum(nb, 1e-12)).T


DISTANCES: dict[str, Distance] = {"l2": squared_l2, "cosine": cosine_distance}


def get_distance(distance: str | Distance) -> Distance:
  """Returns the distance named ``distance`` (``l2`` or ``cosine``) or ``distance`` itself."""
  if callable(distance):
    return distance
  if distance not in DISTANCES:
    raise ValueError(f"distance must be one of {sorted(DISTANCES)} or a callable, got {distance!r}")
  return DISTANCES[distance]


def check_num_clusters(num_clusters: int, num_clients: int | None = None) -> None:
  """Raises ValueError unless ``1 <= num_clusters <= num_clients``."""
  if not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
    raise ValueError(f"num_clusters must be an integer >= 1, got {num_clusters!r}")
  if num_clients is not None and num_clusters > num_clients:
    raise ValueError(f"num_clusters ({num_clusters}) must be <= the number of clients ({num_clients})")


# ----------------------------------------------------------------------------------------------
# K-means over client weights.


def kmeans_step(points: jax.Array, weights: jax.Array, centers: jax.Array, distance: str | Distance = "l2"):
  """Returns (assignment [n], new centres [K, P], objective) of one Lloyd step.

  Assignment: ``argmin_k d(x_i, c_k)`` (lowest index on ties); update: the ``weights``-weighted
  mean of each cluster's points; a cluster with zero total weight keeps its centre. The objective
  ``sum_i w_i min_k d(x_i, c_k)`` is measured at the input centres.
  """
  dist = get_distance(distance)(points, centers)
  assign = jnp.argmin(dist, axis=1).astype(jnp.int32)
  onehot = jax.nn.one_hot(assign, centers.shape[0], dtype=points.dtype) * weights[:, None].astype(points.dtype)
  totals = jnp.sum(onehot, axis=0)
  means = (onehot.T @ points) / jnp.maximum(totals, 1e-12)[:, None]
  new = jnp.where((totals > 0)[:, None], means, centers)
  objective = jnp.sum(weights * jnp.take_along_axis(dist, assign[:, None], axis=1)[:, 0])
  return assign, new, objective


def kmeans(points: jax.Array, weights: jax.Array, init_centers: jax.Array, num_iters: int,
           distance: str | Distance = "l2"):
  """Returns (assignment, centres, objective) after ``num_iters`` Lloyd steps from ``init_centers``.

  The returned assignment and objective are those of the returned centres.
  """
  if num_iters < 1:
    raise ValueError(f"kmeans num_iters must be >= 1, got {num_iters}")
  centers = jax.lax.fori_loop(0, num_iters, lambda _, c: kmeans_step(points, weights, c, distance)[1],
                              init_centers)
  dist = get_distance(distance)(points, centers)
  assign = jnp.argmin(dist, axis=1).astype(jnp.int32)
  objective = jnp.sum(weights * jnp.min(dist, axis=1))
  return assign, centers, objective


def kmeans_plusplus_init(rng: jax.Array, points: jax.Array, weights: jax.Array, num_clusters: int,
                         distance: str | Distance = "l2") -> jax.Array:
  """Returns ``[K, P]`` K-means++ seeds (Arthur & Vassilvitskii 2007) among points of weight > 0.

  The first seed is drawn proportionally to ``weights``, each next one proportionally to
  ``weight * distance to the nearest seed``; if every point coincides with a seed, by weight.
  """
  dist = get_distance(distance)
  w = jnp.maximum(weights.astype(jnp.float32), 0.0)
  w = jnp.where(jnp.sum(w) > 0, w, jnp.ones_like(w))
  keys = jax.random.split(rng, num_clusters)

  def body(k, carry):
    centers, d_min = carry
    p = jnp.where(k == 0, w, w * d_min)
    p = jnp.where(jnp.sum(p) > 0, p, w)
    i = jax.random.choice(keys[k], points.shape[0], p=p / jnp.sum(p))
    centers = centers.at[k].set(points[i])
    d_min = jnp.minimum(d_min, jnp.maximum(dist(points, points[i][None])[:, 0], 0.0))
    return centers, d_min

  init = (jnp.zeros((num_clusters, points.shape[1]), points.dtype), jnp.full(points.shape[0], jnp.inf))
  return jax.lax.fori_loop(0, num_clusters, body, init)[0]


# ----------------------------------------------------------------------------------------------
# Aggregators returning one aggregate per cluster.


def _cluster_weights(assign: jax.Array, weights: jax.Array, num_clusters: int) -> jax.Array:
  """Returns ``[K, n]`` normalised weights: row k averages the clients assigned to k."""
  onehot = jax.nn.one_hot(assign, num_clusters, dtype=jnp.float32).T * weights[None, :]
  return onehot / jnp.maximum(jnp.sum(onehot, axis=1, keepdims=True), 1e-12)


def per_cluster_weighted_mean(updates, weights: jax.Array, assign: jax.Array, num_clusters: int):
  """Returns leaves ``[K, ...]``: the weighted mean update of each cluster (0 for an empty one)."""
  mix = _cluster_weights(assign, weights, num_clusters)
  return jax.tree.map(lambda u: jnp.tensordot(mix.astype(u.dtype), u, axes=(1, 0)), updates)


def per_cluster_mean(num_clusters: int) -> Aggregator:
  """Returns the Aggregator averaging updates within clusters (IFCA, CFL: Ghosh et al. 2020).

  ``ctx["client_ctx"]["cluster"] [cohort]`` names the cluster model each client trained; the
  aggregate has leaves ``[num_clusters, ...]``; info ``cluster_weight [K]`` (examples per cluster).
  """
  check_num_clusters(num_clusters)

  def init(params):
    del params
    return EmptyState()

  def apply(updates, weights, state, rng, ctx):
    del rng
    assign = context.client_array(ctx, "cluster", "per_cluster_mean")
    agg = per_cluster_weighted_mean(updates, weights, assign, num_clusters)
    info = {"cluster_weight": jax.ops.segment_sum(weights, assign, num_segments=num_clusters)}
    return agg, state, info

  return Aggregator(init, apply)


class KMeansState(NamedTuple):
  initialized: jax.Array  # bool: False until the first round seeded the centres


def multicenter_kmeans(num_clusters: int, distance: str | Distance = "l2", num_iters: int = 5,
                       num_restarts: int = 5) -> Aggregator:
  """Returns multi-center FL's server step (Xie et al. 2021): K-means over client weights.

  Client i trained the cluster model ``ctx["params"][s_i]`` (``s = ctx["client_ctx"]["cluster"]``)
  into ``W_i = W^(s_i) + update_i``. The server runs ``num_iters`` Lloyd steps on the flattened
  ``W_i`` weighted by ``p_i`` (examples used), started from the current centres (in the first
  round, when all centres are still equal, from the best of ``num_restarts`` K-means++ seedings,
  as scikit-learn's ``n_init``), and returns for each cluster the
  move of its centre ``W^(k)_new - W^(k)`` (leaves ``[K, ...]``). Info: ``assignment [cohort]``
  (new cluster of every client), ``kmeans_objective`` (eq. 1, at the new centres),
  ``cluster_weight [K]``.
  """
  check_num_clusters(num_clusters)
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  if num_restarts < 1:
    raise ValueError(f"num_restarts must be >= 1, got {num_restarts}")
  get_distance(distance)

  def init(params):
    del params
    return KMeansState(jnp.zeros((), bool))

  def seeded(points, weights, key):
    seeds = kmeans_plusplus_init(key, points, weights, num_clusters, distance)
    return kmeans(points, weights, seeds, num_iters, distance)

  def apply(updates, weights, state, rng, ctx):
    context.require_rng(rng, "multicenter_kmeans (K-means++ seeding)")
    centers = context.require(ctx, "params", "multicenter_kmeans (the K cluster models, leaves [K, ...])")
    start = context.client_array(ctx, "cluster", "multicenter_kmeans")
    flat_centers = flatten_updates(centers)  # [K, P]
    client_models = flatten_updates(updates) + jnp.take(flat_centers, start, axis=0)
    warm = kmeans(client_models, weights, flat_centers, num_iters, distance)
    cold = jax.vmap(lambda k: seeded(client_models, weights, k))(jax.random.split(rng, num_restarts))
    best = jnp.argmin(cold[2])
    assign, new_centers, objective = jax.tree.map(lambda w, c: jnp.where(state.initialized, w, c[best]), warm, cold)
    agg = unflatten_like(new_centers - flat_centers, centers)
    info = {"assignment": assign, "kmeans_objective": objective,
            "cluster_weight": jax.ops.segment_sum(weights, assign, num_segments=num_clusters)}
    return agg, KMeansState(jnp.ones((), bool)), info

  return Aggregator(init, apply)


# ----------------------------------------------------------------------------------------------
# CFL's bipartition.


def bipartition(similarity: jax.Array, members: jax.Array) -> jax.Array:
  """Returns bool ``[n]``: the members that split off from ``members`` into a second group.

  Sattler et al.'s optimal bipartition (merge the most similar pairs until two groups remain)
  equals cutting the weakest edge of the maximum spanning tree of ``similarity`` restricted to
  ``members`` (Prim's algorithm, static shapes). The group without the first member splits off.
  Fewer than two members: nothing splits off.
  """
  n = similarity.shape[0]
  idx = jnp.arange(n)
  members = members.astype(bool)
  root = jnp.argmax(members)
  neg = -jnp.inf
  sim = jnp.where(members[:, None] & members[None, :], similarity, neg)

  def body(_, carry):
    in_tree, best, parent, par, edge = carry
    cand = jnp.where(in_tree | ~members, neg, best)
    j = jnp.argmax(cand)
    valid = members[j] & ~in_tree[j]
    in_tree = in_tree.at[j].set(in_tree[j] | valid)
    par = par.at[j].set(jnp.where(valid, parent[j], par[j]))
    edge = edge.at[j].set(jnp.where(valid, best[j], edge[j]))
    better = valid & ~in_tree & members & (sim[j] > best)
    best = jnp.where(better, sim[j], best)
    parent = jnp.where(better, j, parent)
    return in_tree, best, parent, par, edge

  init = (idx == root, sim[root], jnp.full(n, root), idx, jnp.full(n, jnp.inf))
  in_tree, _, _, par, edge = jax.lax.fori_loop(0, n - 1, body, init)
  edge = jnp.where(members & in_tree & (idx != root), edge, jnp.inf)
  cut = jnp.argmin(edge)  # the node whose link to its parent is the weakest tree edge
  below = idx == cut

  def climb(_, carry):
    anc, below = carry
    anc = par[anc]
    return anc, below | (anc == cut)

  _, below = jax.lax.fori_loop(0, n, climb, (idx, below))
  return below & members & (jnp.sum(members) >= 2)


# ----------------------------------------------------------------------------------------------
# Cluster recovery.


def adjusted_rand_index(labels_true, labels_pred) -> float:
  """Returns the adjusted Rand index of two labelings (Hubert & Arabie 1985).

  ``(sum_ij C(n_ij, 2) - E) / (max - E)`` over the contingency table, ``E = sum_i C(a_i, 2)
  sum_j C(b_j, 2) / C(n, 2)``, ``max = (sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2``; 1.0 when the
  maximum equals the expectation (e.g. both labelings trivial), as scikit-learn.
  """
  t = np.asarray(labels_true).reshape(-1)
  p = np.asarray(labels_pred).reshape(-1)
  if t.shape != p.shape:
    raise ValueError(f"labelings differ in length: {t.shape[0]} vs {p.shape[0]}")
  _, ti = np.unique(t, return_inverse=True)
  _, pi = np.unique(p, return_inverse=True)
  table = np.zeros((ti.max(initial=-1) + 1, pi.max(initial=-1) + 1), np.int64)
  np.add.at(table, (ti, pi), 1)
  # Exact integer arithmetic: 2 C(m, 2) = m (m - 1), scaled by n (n - 1) to clear the fraction.
  pairs2 = lambda m: int(np.sum(m * (m - 1)))
  index2, a2, b2 = pairs2(table), pairs2(table.sum(1)), pairs2(table.sum(0))
  total2 = t.shape[0] * (t.shape[0] - 1)
  numerator = index2 * total2 - a2 * b2
  denominator = (a2 + b2) // 2 * total2 - a2 * b2
  if denominator == 0:
    return 1.0
  return float(numerator / denominator)
