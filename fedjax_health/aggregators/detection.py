"""Detection of malicious updates: clustering (Auror), autoencoder anomaly scores, LRR/ERR.

Context (``fedjax_health.context``): ``loss_rejection`` reads ``ctx["params"]`` (the global
params the updates apply to), ``track_rejections`` reads ``ctx["cohort"]`` (client ids) and, when
present, ``ctx["client_ctx"]["malicious"]``; the other detectors read no context.

Each detector is an ``UpdateTransform`` that sets the weight of the clients it flags to 0 and
reports them as ``info["rejected"] [cohort]``; chain it before any aggregator (the robust rules
treat weight-0 clients as absent). ``track_rejections`` wraps a whole aggregator and keeps, in
its state, how often each client was sampled and rejected, and how many malicious and honest
participations were rejected: the detection true/false positive rates, including the false
positives on honest but non-IID clients.

* ``clustering_detection``: Auror (Shen et al. 2016, "Auror: defending against poisoning attacks
  in collaborative deep learning systems"): on each candidate feature (the update coordinates
  that vary most across clients), split the clients into two clusters (exact 1-D 2-means); a
  feature is *indicative* when its two cluster centres are far apart relative to the spread
  inside the clusters; a client in the minority cluster of more than ``vote_threshold`` of the
  indicative features is flagged.
* ``autoencoder_detection``: Li et al. 2020 ("Learning to detect malicious clients for robust
  federated learning"): an autoencoder on low-dimensional surrogates of the updates (a fixed
  random subset of coordinates, scaled by the round's median norm), trained on the updates it
  accepts; a client whose reconstruction error exceeds ``factor`` times the round's mean error
  (their dynamic threshold) is flagged.
* ``loss_rejection``: Fang et al. 2020's LRR and ERR ("Local model poisoning attacks to
  byzantine-robust FL", Section 5): with a validation set on the server, the impact of each
  client is the increase of the validation loss (LRR) or error rate (ERR) that including its
  update causes; the ``num_reject`` clients with the largest impact are removed.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_health import context
from fedjax_health.aggregators.base import Aggregator, EmptyState, UpdateTransform, flatten_updates, unflatten_like
from fedjax_health.models import per_example_loss, predict_labels


def _empty_init(params):
  del params
  return EmptyState()


def _drop(weights, rejected):
  return jnp.where(rejected, 0.0, weights)


# ----------------------------------------------------------------------------------------------
# Auror-style clustering.


def two_means_1d(values: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (in_low_cluster bool [C], centre gap, within-cluster std) of the exact 1-D 2-means.

  The optimal 2-means partition of points on a line is a threshold between consecutive sorted
  values; all ``n - 1`` splits are scored with prefix sums and the least squared error is kept.
  """
  c = values.shape[0]
  n = jnp.sum(valid)
  order = jnp.argsort(jnp.where(valid, values, jnp.inf))
  v = jnp.where(jnp.arange(c) < n, values[order], 0.0)
  csum, csq = jnp.cumsum(v), jnp.cumsum(v * v)
  t = jnp.arange(1, c + 1).astype(values.dtype)  # size of the low cluster
  tot, tot_sq = csum[-1], csq[-1]
  nf = n.astype(values.dtype)
  right = jnp.maximum(nf - t, 1.0)
  sse = (csq - csum ** 2 / t) + ((tot_sq - csq) - (tot - csum) ** 2 / right)
  possible = t < nf
  best = jnp.argmin(jnp.where(possible, sse, jnp.inf))
  low_size = best + 1
  gap = (tot - csum[best]) / jnp.maximum(nf - low_size, 1.0) - csum[best] / low_size
  within = jnp.sqrt(jnp.maximum(sse[best], 0.0) / jnp.maximum(nf, 1.0))
  rank = jnp.zeros(c, jnp.int32).at[order].set(jnp.arange(c, dtype=jnp.int32))
  in_low = valid & (rank < low_size)
  ok = n >= 2
  return in_low & ok, jnp.where(ok, gap, 0.0), within


def clustering_detection(num_features: int = 256, separation: float = 6.0, vote_threshold: float = 0.5,
                         min_indicative: float = 0.1) -> UpdateTransform:
  """Returns the Auror-style detector (Shen et al. 2016).

  Args:
    num_features: candidate features: the coordinates with the largest variance across the
      valid clients.
    separation: a feature is indicative when ``gap / within-cluster std > separation``.
    vote_threshold: a client in the minority cluster of more than this fraction of the
      indicative features is rejected.
    min_indicative: nobody is rejected unless at least this fraction of the candidate features
      is indicative (a poisoning campaign shifts many features; a lone heavy-tailed coordinate
      of honest noise does not).
  """
  if num_features < 1:
    raise ValueError(f"clustering_detection num_features must be >= 1, got {num_features}")
  if not separation > 0:
    raise ValueError(f"clustering_detection separation must be > 0, got {separation}")
  if not 0.0 <= vote_threshold < 1.0:
    raise ValueError(f"clustering_detection vote_threshold must be in [0, 1), got {vote_threshold}")
  if not 0.0 <= min_indicative <= 1.0:
    raise ValueError(f"clustering_detection min_indicative must be in [0, 1], got {min_indicative}")

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    valid = weights > 0
    flat = flatten_updates(updates)
    w = valid.astype(flat.dtype)[:, None]
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(flat * w, 0) / n
    var = jnp.sum(jnp.square(flat - mean) * w, 0) / n
    _, idx = jax.lax.top_k(var, min(num_features, flat.shape[1]))
    in_low, gap, within = jax.vmap(lambda col: two_means_1d(col, valid), in_axes=1, out_axes=(1, 0, 0))(flat[:, idx])
    low_count = jnp.sum(in_low, axis=0)
    minority = jnp.where((2 * low_count <= jnp.sum(valid))[None, :], in_low, valid[:, None] & ~in_low)
    indicative = gap > separation * jnp.maximum(within, 1e-12)
    votes = jnp.sum(minority & indicative[None, :], axis=1)
    num_ind = jnp.sum(indicative)
    enough = (num_ind > 0) & (num_ind >= min_indicative * idx.shape[0])
    rejected = valid & enough & (votes > vote_threshold * num_ind)
    info = {"rejected": rejected, "num_indicative_features": num_ind}
    return updates, _drop(weights, rejected), state, info

  return UpdateTransform(_empty_init, apply)


# ----------------------------------------------------------------------------------------------
# Autoencoder anomaly detection.


class AutoencoderState(NamedTuple):
  coords: jax.Array  # [dim] fixed random coordinates of the flat update (the surrogate)
  params: Any
  opt_state: Any
  rounds: jax.Array


def _ae_init(key, dim, hidden):
  k1, k2 = jax.random.split(key)
  return {"enc": {"w": jax.random.normal(k1, (dim, hidden)) / jnp.sqrt(dim), "b": jnp.zeros(hidden)},
          "dec": {"w": jax.random.normal(k2, (hidden, dim)) / jnp.sqrt(hidden), "b": jnp.zeros(dim)}}


def autoencoder_reconstruct(params, z: jax.Array) -> jax.Array:
  """Returns the autoencoder's reconstruction of the rows of ``z``."""
  h = jnp.tanh(z @ params["enc"]["w"] + params["enc"]["b"])
  return h @ params["dec"]["w"] + params["dec"]["b"]


def autoencoder_errors(params, z: jax.Array) -> jax.Array:
  """Returns the mean squared reconstruction error of each row of ``z``."""
  return jnp.mean(jnp.square(autoencoder_reconstruct(params, z) - z), axis=1)


def autoencoder_detection(dim: int = 128, hidden: int = 16, learning_rate: float = 1e-2, steps_per_round: int = 20,
                          warmup_rounds: int = 3, factor: float = 1.0, seed: int = 0) -> UpdateTransform:
  """Returns Li et al.'s (2020) autoencoder detector (a plain autoencoder, online-trained).

  Args:
    dim: surrogate size (random coordinates of the update; all of them if the model is smaller).
    hidden: bottleneck width.
    learning_rate, steps_per_round: Adam steps per round on the accepted clients' surrogates.
    warmup_rounds: rounds in which the autoencoder only trains and rejects nobody.
    factor: reject when the error exceeds ``factor *`` the round's mean error (Li et al.: 1).
  """
  for name, v, low in (("dim", dim, 1), ("hidden", hidden, 1), ("steps_per_round", steps_per_round, 1),
                       ("warmup_rounds", warmup_rounds, 0)):
    if v < low:
      raise ValueError(f"autoencoder_detection {name} must be >= {low}, got {v}")
  if not factor > 0 or not learning_rate > 0:
    raise ValueError(f"autoencoder_detection factor and learning_rate must be > 0, got {factor}, {learning_rate}")
  opt = optax.adam(learning_rate)

  def init(params):
    size = int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))
    d = min(dim, size)
    coords = np.sort(np.random.default_rng(seed).choice(size, d, replace=False)).astype(np.int32)
    ae = _ae_init(jax.random.key(seed), d, hidden)
    return AutoencoderState(jnp.asarray(coords), ae, opt.init(ae), jnp.zeros((), jnp.int32))

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    valid = weights > 0
    z = flatten_updates(updates)[:, state.coords]
    norms = jnp.linalg.norm(z, axis=1)
    scale = jnp.nanmedian(jnp.where(valid, norms, jnp.nan))
    z = z / jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)
    err = autoencoder_errors(state.params, z)
    mean_err = jnp.sum(jnp.where(valid, err, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    rejected = valid & (err > factor * mean_err) & (state.rounds >= warmup_rounds)
    keep = (valid & ~rejected).astype(z.dtype)

    def loss(p):
      return jnp.sum(autoencoder_errors(p, z) * keep) / jnp.maximum(jnp.sum(keep), 1.0)

    def step(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, s), _ = jax.lax.scan(step, (state.params, state.opt_state), None, length=steps_per_round)
    info = {"rejected": rejected, "ae_mean_error": mean_err}
    return updates, _drop(weights, rejected), AutoencoderState(state.coords, p, s, state.rounds + 1), info

  return UpdateTransform(init, apply)


# ----------------------------------------------------------------------------------------------
# Fang et al.'s LRR / ERR with a server validation set.


def loss_rejection(apply_fn: Callable, val_x, val_y, num_reject: int, metric: str = "loss") -> UpdateTransform:
  """Returns Fang et al.'s (2020) loss-based (``metric="loss"``, LRR) or error-rate-based
  (``"error"``, ERR) rejection.

  The impact of client ``i`` is ``metric(w + mean) - metric(w + mean without i)`` on the server's
  validation set (``w`` the global params, means weighted by examples, i.e. FedAvg with server
  lr 1); the ``num_reject`` valid clients with the largest impact are rejected (at most
  ``n - 1``).
  """
  if metric not in ("loss", "error"):
    raise ValueError(f"loss_rejection metric must be 'loss' (LRR) or 'error' (ERR), got {metric!r}")
  if num_reject < 0:
    raise ValueError(f"loss_rejection num_reject must be >= 0, got {num_reject}")
  vx, vy = jnp.asarray(val_x), jnp.asarray(val_y)
  if vx.shape[0] < 1:
    raise ValueError("loss_rejection needs a non-empty server validation set")

  def evaluate(params):
    logits = apply_fn(params, vx)
    if metric == "loss":
      return jnp.mean(per_example_loss(logits, vy))
    return jnp.mean((predict_labels(logits) != vy).astype(jnp.float32))

  def apply(updates, weights, state, rng, ctx):
    del rng
    valid = weights > 0
    flat = flatten_updates(updates)
    w = jnp.where(valid, weights, 0.0)
    total = jnp.sum(w)
    full = (w @ flat) / jnp.maximum(total, 1e-12)
    loo = ((w @ flat)[None, :] - w[:, None] * flat) / jnp.maximum(total - w, 1e-12)[:, None]
    params = context.require(ctx, "params", f"loss_rejection ({metric})")
    add = lambda delta: jax.tree.map(lambda p, d: p + d.astype(p.dtype), params, unflatten_like(delta, updates))
    with_all = evaluate(add(full))
    without = jax.lax.map(lambda d: evaluate(add(d)), loo)
    impact = jnp.where(valid, with_all - without, -jnp.inf)
    k = jnp.minimum(num_reject, jnp.maximum(jnp.sum(valid) - 1, 0))
    rank = jnp.zeros(impact.shape[0], jnp.int32).at[jnp.argsort(-impact)].set(jnp.arange(impact.shape[0], dtype=jnp.int32))
    rejected = valid & (rank < k)
    return updates, _drop(weights, rejected), state, {"rejected": rejected, f"val_{metric}": with_all}

  return UpdateTransform(_empty_init, apply)


# ----------------------------------------------------------------------------------------------
# Detection rates.


class RejectionStats(NamedTuple):
  sampled: jax.Array  # [num_clients] rounds in which the client sent a (non-empty) update
  rejected: jax.Array  # [num_clients] rounds in which it was rejected
  malicious_sent: jax.Array  # participations while attacking
  malicious_rejected: jax.Array
  honest_sent: jax.Array
  honest_rejected: jax.Array


def track_rejections(aggregator: Aggregator, num_clients: int) -> Aggregator:
  """Returns ``aggregator`` that also counts rejections per client and per role in its state.

  Its state is ``(inner_state, RejectionStats)``; a client counts as sent when its weight is
  positive, as malicious when ``ctx["client_ctx"]["malicious"]`` (absent: honest), as rejected when
  the inner ``info["rejected"]`` says so. Adds the round's ``tp``/``fp`` counts to ``info``.
  """
  if num_clients < 1:
    raise ValueError(f"track_rejections num_clients must be >= 1, got {num_clients}")

  def init(params):  # distinct buffers: the round donates its state
    z = lambda: jnp.zeros(num_clients, jnp.int32)
    s = lambda: jnp.zeros((), jnp.int32)
    return aggregator.init(params), RejectionStats(z(), z(), s(), s(), s(), s())

  def apply(updates, weights, state, rng, ctx):
    inner, st = state
    agg, inner, info = aggregator.apply(updates, weights, inner, rng, ctx)
    sent = weights > 0
    rej = jnp.asarray(info.get("rejected", jnp.zeros_like(sent)), bool) & sent
    mal = jnp.asarray(((ctx or {}).get("client_ctx") or {}).get("malicious", jnp.zeros_like(sent)), bool) & sent
    cohort = context.require(ctx, "cohort", "track_rejections")
    st = RejectionStats(st.sampled.at[cohort].add(sent.astype(jnp.int32)),
                        st.rejected.at[cohort].add(rej.astype(jnp.int32)),
                        st.malicious_sent + jnp.sum(mal), st.malicious_rejected + jnp.sum(rej & mal),
                        st.honest_sent + jnp.sum(sent & ~mal), st.honest_rejected + jnp.sum(rej & ~mal))
    info = dict(info, detect_tp=jnp.sum(rej & mal), detect_fp=jnp.sum(rej & ~mal))
    return agg, (inner, st), info

  return Aggregator(init, apply)


def detection_rates(stats: RejectionStats) -> dict:
  """Returns ``{"tpr", "fpr"}`` over all participations so far (NaN where undefined)."""
  s = jax.device_get(stats)
  tpr = float(s.malicious_rejected) / float(s.malicious_sent) if s.malicious_sent else float("nan")
  fpr = float(s.honest_rejected) / float(s.honest_sent) if s.honest_sent else float("nan")
  return {"tpr": tpr, "fpr": fpr}
