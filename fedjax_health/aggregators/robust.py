"""Byzantine-robust aggregation: norm bounding, weak DP, Krum, median, trimmed mean, RFA, Bulyan.

All rules see the stacked updates ``[cohort, ...]``. A client with weight 0 (no data, or dropped
by an earlier transform such as ``reject_nonfinite`` or a detector) counts as absent: it is
never selected, never a neighbour, and never a coordinate value. Distance-based rules (Krum,
Bulyan) report the clients they did not select as ``info["rejected"]``; coordinate-wise rules
(median, trimmed mean) drop values, not clients, and report nothing.

Each factory checks, at construction, that the rule can work for the cohort it will see
(``cohort_size``): Krum needs ``n > 2f + 2``, Bulyan ``n >= 4f + 3``, trimmed mean ``2k < n``.
The same condition is checked again when the rule is traced on a stack (a stack smaller than the
requirement is a ValueError naming it), and at run time on the *valid* count (clients of weight
> 0), which only the traced computation knows. There the documented fallback is: the rule's sizes
are recomputed from the valid count and clipped to what is possible (Krum's neighbour count to
``[1, n - 1]``; Bulyan's ``theta = n - 2f`` and ``beta = theta - 2f`` to ``>= 1``; trimmed mean's
``k`` to ``(n - 1) // 2``), and ``info["condition_holds"]`` is False for that round, so a run
logs every round in which the guarantee did not hold.

References: Sun et al. 2019 ("Can you really backdoor federated learning?": norm bounding, weak
DP); Blanchard et al. 2017 (Krum, Multi-Krum); Yin et al. 2018 (coordinate median, trimmed
mean); Pillutla et al. 2022 (RFA, smoothed Weiszfeld geometric median); El Mhamdi et al. 2018
(Bulyan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_health import context
from fedjax_health.aggregators.base import (Aggregator, EmptyState, UpdateTransform, client_norms,
                                            flatten_updates, unflatten_like, weighted_mean)


def _empty_init(params):
  del params
  return EmptyState()


def _bcast(w, leaf):
  return w.reshape(w.shape + (1,) * (leaf.ndim - 1))


def _check_int(name: str, value, low: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_cohort(cohort_size) -> None:
  _check_int("cohort_size", cohort_size, 1)


def _check_stack(rule: str, updates, needed: int, condition: str) -> None:
  """Raises ValueError when the stack's cohort dimension is below what ``rule`` needs (trace time)."""
  c = jax.tree.leaves(updates)[0].shape[0]
  if c < needed:
    raise ValueError(f"{rule} got a stack of {c} client updates but needs {condition} (at least {needed} "
                     f"clients); the cohort at run time is smaller than the cohort_size it was built for")


def pairwise_sq_dists(flat: jax.Array) -> jax.Array:
  """Returns ``[C, C]`` squared Euclidean distances between the rows of ``flat [C, D]``.

  Uses the Gram matrix of the centred rows (memory ``C^2``, not ``C^2 D``); centring first keeps
  the float32 cancellation error small when updates are close to each other.
  """
  x = flat - jnp.mean(flat, axis=0, keepdims=True)
  sq = jnp.sum(x * x, axis=1)
  d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
  d = jnp.maximum(0.5 * (d + d.T), 0.0)  # exactly symmetric, so mutual-neighbour ties are exact
  return d * (1.0 - jnp.eye(flat.shape[0], dtype=d.dtype))


def krum_scores(sq_dists: jax.Array, valid: jax.Array, num_byzantine) -> jax.Array:
  """Returns Krum's score of each client: sum of squared distances to its ``n - f - 2`` nearest.

  ``n`` counts the valid clients only (so it may be traced); invalid clients score ``+inf``.
  The neighbour count is clipped to ``[1, n - 1]`` so that tiny cohorts still get a score.
  """
  c = sq_dists.shape[0]
  n = jnp.sum(valid)
  k = jnp.clip(n - num_byzantine - 2, 1, jnp.maximum(n - 1, 1))
  others = valid[None, :] & valid[:, None] & ~jnp.eye(c, dtype=bool)
  d = jnp.sort(jnp.where(others, sq_dists, jnp.inf), axis=1)
  take = jnp.arange(c)[None, :] < k
  score = jnp.sum(jnp.where(take & jnp.isfinite(d), d, 0.0), axis=1)
  return jnp.where(valid, score, jnp.inf)


def _order(scores: jax.Array, sq_dists: jax.Array, valid: jax.Array) -> jax.Array:
  """Returns client indices by increasing score, ties broken by the total distance to the valid
  clients (not by index, which would make the rule depend on the order of the cohort)."""
  total = jnp.sum(jnp.where(valid[None, :], sq_dists, 0.0), axis=1)
  return jnp.lexsort((total, scores))


def _select_lowest(scores: jax.Array, sq_dists: jax.Array, valid: jax.Array, m) -> jax.Array:
  """Returns a bool mask of the ``min(m, n_valid)`` valid clients with the lowest scores."""
  order = _order(scores, sq_dists, valid)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  return valid & (rank < jnp.minimum(m, jnp.sum(valid)))


def _masked_uniform_mean(updates, selected):
  w = selected.astype(jnp.float32)
  w = w / jnp.maximum(jnp.sum(w), 1.0)
  return jax.tree.map(lambda u: jnp.sum(u * _bcast(w, u).astype(u.dtype), axis=0), updates)


def krum(num_byzantine: int, cohort_size: int, num_selected: int = 1) -> Aggregator:
  """Returns Krum (``num_selected = 1``) or Multi-Krum (Blanchard et al. 2017).

  Each client is scored by the sum of squared distances to its ``n - f - 2`` nearest neighbours;
  Krum returns the update with the lowest score, Multi-Krum the uniform mean of the
  ``num_selected`` lowest. The guarantee needs ``n > 2f + 2`` (checked against ``cohort_size``).
  """
  _check_int("num_byzantine", num_byzantine, 0)
  _check_cohort(cohort_size)
  if not cohort_size > 2 * num_byzantine + 2:
    raise ValueError(f"Krum needs cohort_size > 2 * num_byzantine + 2 (n > 2f + 2); got n={cohort_size}, "
                     f"f={num_byzantine}: use a larger cohort or a smaller num_byzantine")
  _check_int("num_selected", num_selected, 1)
  if num_selected > cohort_size - num_byzantine:
    raise ValueError(f"Multi-Krum num_selected must be in [1, n - f = {cohort_size - num_byzantine}], "
                     f"got {num_selected}")

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    _check_stack("Krum", updates, 2 * num_byzantine + 3, f"n > 2f + 2 with f={num_byzantine}")
    valid = weights > 0
    sqd = pairwise_sq_dists(flatten_updates(updates))
    selected = _select_lowest(krum_scores(sqd, valid, num_byzantine), sqd, valid, num_selected)
    holds = jnp.sum(valid) > 2 * num_byzantine + 2
    return _masked_uniform_mean(updates, selected), state, {"rejected": valid & ~selected, "condition_holds": holds}

  return Aggregator(_empty_init, apply)


def multi_krum(num_byzantine: int, cohort_size: int, num_selected: int) -> Aggregator:
  """Returns Multi-Krum: the mean of the ``num_selected`` updates with the lowest Krum scores."""
  return krum(num_byzantine, cohort_size, num_selected)


def _nan_invalid(flat, valid):
  return jnp.where(valid[:, None], flat, jnp.nan)


def coordinate_median() -> Aggregator:
  """Returns the coordinate-wise median over valid clients (Yin et al. 2018); 0 if none is valid."""

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    valid = weights > 0
    flat = flatten_updates(updates)
    med = jnp.nanmedian(_nan_invalid(flat, valid), axis=0)
    med = jnp.where(jnp.any(valid), med, 0.0)
    return unflatten_like(med, updates), state, {}

  return Aggregator(_empty_init, apply)


def _sorted_valid(flat, valid):
  """Sorts each coordinate over clients with invalid clients as +inf (they end up last)."""
  return jnp.sort(jnp.where(valid[:, None], flat, jnp.inf), axis=0)


def trimmed_mean(cohort_size: int, trim_fraction: float | None = None, num_trim: int | None = None) -> Aggregator:
  """Returns the coordinate-wise trimmed mean (Yin et al. 2018).

  On each coordinate the ``k`` largest and ``k`` smallest of the ``n`` valid values are dropped
  and the rest averaged, with ``k = num_trim`` or ``k = floor(trim_fraction * n)``. Needs
  ``2k < n`` for the full cohort (checked); if clients drop out and ``2k >= n`` at run time, ``k``
  shrinks to ``(n - 1) // 2`` (the median).
  """
  _check_cohort(cohort_size)
  if (trim_fraction is None) == (num_trim is None):
    raise ValueError("trimmed_mean needs exactly one of trim_fraction and num_trim")
  if trim_fraction is not None:
    if not 0.0 <= trim_fraction < 0.5:
      raise ValueError(f"trimmed_mean trim_fraction must be in [0, 0.5) (2k < n), got {trim_fraction}")
    k_full = int(trim_fraction * cohort_size)
  else:
    _check_int("num_trim", num_trim, 0)
    k_full = num_trim
  if not 2 * k_full < cohort_size:
    raise ValueError(f"trimmed mean needs 2k < n; got k={k_full} trimmed per side for cohort_size n={cohort_size}")

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    if num_trim is not None:  # a fraction shrinks k with the stack; a fixed k needs 2k < n
      _check_stack("trimmed mean", updates, 2 * num_trim + 1, f"2k < n with k={num_trim}")
    valid = weights > 0
    n = jnp.sum(valid)
    k = (jnp.floor(trim_fraction * n).astype(jnp.int32) if trim_fraction is not None else jnp.asarray(num_trim))
    k = jnp.minimum(k, jnp.maximum(n - 1, 0) // 2)
    s = _sorted_valid(flatten_updates(updates), valid)
    rank = jnp.arange(s.shape[0])[:, None]
    keep = (rank >= k) & (rank < n - k)
    agg = jnp.sum(jnp.where(keep, s, 0.0), axis=0) / jnp.maximum(n - 2 * k, 1)
    k_wanted = (jnp.floor(trim_fraction * n).astype(jnp.int32) if trim_fraction is not None else jnp.asarray(num_trim))
    holds = 2 * k_wanted < n
    return unflatten_like(agg, updates), state, {"num_trimmed_per_side": k, "condition_holds": holds}

  return Aggregator(_empty_init, apply)


def weiszfeld(points: jax.Array, alphas: jax.Array, max_iter: int = 100, nu: float = 1e-6,
              tol: float = 1e-7) -> tuple[jax.Array, jax.Array]:
  """Returns (geometric median of the rows of ``points`` with weights ``alphas``, iterations).

  Smoothed Weiszfeld (Pillutla et al. 2022, Algorithm 2): ``z <- sum_i b_i v_i / sum_i b_i`` with
  ``b_i = alpha_i / max(nu, ||z - v_i||)``, from the weighted mean, until ``||z_new - z|| <= tol *
  max(1, ||z||)`` or ``max_iter`` iterations.
  """
  a = alphas / jnp.maximum(jnp.sum(alphas), 1e-12)
  z0 = a @ points

  def body(carry):
    z, _, it = carry
    dist = jnp.sqrt(jnp.sum(jnp.square(points - z[None, :]), axis=1))
    b = a / jnp.maximum(nu, dist)
    z_new = (b @ points) / jnp.maximum(jnp.sum(b), 1e-30)
    return z_new, jnp.linalg.norm(z_new - z), it + 1

  def cond(carry):
    z, step, it = carry
    return (it < max_iter) & (step > tol * jnp.maximum(1.0, jnp.linalg.norm(z)))

  z, _, it = jax.lax.while_loop(cond, body, (z0, jnp.asarray(jnp.inf, z0.dtype), jnp.asarray(0)))
  return z, it


def geometric_median(max_iter: int = 100, nu: float = 1e-6, tol: float = 1e-7, weighted: bool = True) -> Aggregator:
  """Returns RFA (Pillutla et al. 2022): the weighted geometric median of the updates.

  ``weighted``: weights ``alpha_i`` proportional to the clients' examples (RFA's choice); else
  uniform over valid clients.
  """
  _check_int("max_iter", max_iter, 1)
  if not nu > 0:
    raise ValueError(f"geometric_median nu (smoothing) must be > 0, got {nu}")
  if not tol >= 0:
    raise ValueError(f"geometric_median tol must be >= 0, got {tol}")

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    alphas = weights if weighted else (weights > 0).astype(jnp.float32)
    z, it = weiszfeld(flatten_updates(updates), alphas, max_iter, nu, tol)
    return unflatten_like(z, updates), state, {"weiszfeld_iterations": it}

  return Aggregator(_empty_init, apply)


def bulyan(num_byzantine: int, cohort_size: int) -> Aggregator:
  """Returns Bulyan (El Mhamdi et al. 2018) over Krum.

  1. Select ``theta = n - 2f`` updates by applying Krum repeatedly to the remaining set.
  2. On each coordinate, average the ``beta = theta - 2f`` selected values closest to their
     median. Needs ``n >= 4f + 3`` (checked against ``cohort_size`` and the stack's size).
     Clients never selected in step 1 are reported as rejected.

  ``n`` is the number of *valid* clients of the round (weight > 0): clients rejected by an
  earlier transform or without data are absent, so ``theta`` and ``beta`` follow the valid count,
  not the cohort size. When fewer than ``4f + 3`` clients are valid, ``theta`` and ``beta`` are
  clipped to ``>= 1`` and ``info["condition_holds"]`` is False (the guarantee is void that round).
  """
  _check_int("num_byzantine", num_byzantine, 0)
  _check_cohort(cohort_size)
  if not cohort_size >= 4 * num_byzantine + 3:
    raise ValueError(f"Bulyan needs cohort_size >= 4 * num_byzantine + 3 (n >= 4f + 3); got n={cohort_size}, "
                     f"f={num_byzantine}")
  f = num_byzantine

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    _check_stack("Bulyan", updates, 4 * f + 3, f"n >= 4f + 3 with f={f}")
    valid = weights > 0
    flat = flatten_updates(updates)
    sqd = pairwise_sq_dists(flat)
    n_valid = jnp.sum(valid)
    n_sel = jnp.clip(n_valid - 2 * f, jnp.minimum(n_valid, 1), n_valid)  # theta from the valid count
    theta = flat.shape[0]  # static loop bound; picks beyond n_sel are no-ops

    def pick(i, selected):
      remaining = valid & ~selected
      scores = krum_scores(sqd, remaining, f)
      j = _order(scores, sqd, remaining)[0]
      return selected.at[j].set(selected[j] | ((i < n_sel) & remaining[j]))

    selected = jax.lax.fori_loop(0, theta, pick, jnp.zeros_like(valid))
    beta = jnp.maximum(n_sel - 2 * f, 1)
    med = jnp.nanmedian(_nan_invalid(flat, selected), axis=0)
    dist = jnp.where(selected[:, None], jnp.abs(flat - med[None, :]), jnp.inf)
    order = jnp.argsort(dist, axis=0)
    vals = jnp.take_along_axis(flat, order, axis=0)
    keep = jnp.arange(flat.shape[0])[:, None] < beta
    agg = jnp.sum(jnp.where(keep, vals, 0.0), axis=0) / beta
    agg = jnp.where(jnp.any(valid), agg, 0.0)
    info = {"rejected": valid & ~selected, "condition_holds": n_valid >= 4 * f + 3}
    return unflatten_like(agg, updates), state, info

  return Aggregator(_empty_init, apply)


def norm_bound(max_norm: float) -> UpdateTransform:
  """Returns the transform that scales each update to L2 norm at most ``max_norm`` (Sun et al. 2019)."""
  if not max_norm > 0:
    raise ValueError(f"norm_bound max_norm must be > 0, got {max_norm}")

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    norms = client_norms(updates)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-12))
    updates = jax.tree.map(lambda u: u * _bcast(scale, u).astype(u.dtype), updates)
    return updates, weights, state, {"fraction_clipped": jnp.mean((norms > max_norm).astype(jnp.float32))}

  return UpdateTransform(_empty_init, apply)


def weak_dp(max_norm: float, stddev: float) -> Aggregator:
  """Returns Sun et al.'s (2019) "weak DP": norm-bounded weighted mean plus Gaussian noise.

  Each update is clipped to ``max_norm``, the clipped updates are averaged by weight, and
  ``N(0, stddev^2)`` is added to every coordinate of the aggregate. The noise is small and is
  not calibrated to a privacy budget (hence "weak"); it is a backdoor defence, not a DP claim.
  """
  if not stddev >= 0:
    raise ValueError(f"weak_dp stddev must be >= 0, got {stddev}")
  clip = norm_bound(max_norm)
  mean = weighted_mean()

  def apply(updates, weights, state, rng, ctx):
    context.require_rng(rng, "weak_dp")
    updates, weights, _, info = clip.apply(updates, weights, EmptyState(), rng, ctx)
    agg, _, _ = mean.apply(updates, weights, EmptyState(), rng, ctx)
    leaves, treedef = jax.tree.flatten(agg)
    keys = jax.random.split(rng, len(leaves))
    noisy = [l + stddev * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy), state, info

  return Aggregator(_empty_init, apply)
