"""Client-level differential privacy as update transforms and aggregators on stacked updates.

* ``clip_updates(C)``: scales each client's whole update to L2 norm <= C.
* ``central_gaussian_mean(C, z, m)``: DP-FedAvg (McMahan et al. 2018, "Learning Differentially
  Private Recurrent Language Models"): clip each update to C, sum with unit weight per
  participating client, add ``N(0, (z C)^2)`` to the sum, divide by a *fixed* denominator ``m``
  (the expected cohort size) so one client moves the result by at most ``C / m``.
* ``adaptive_clip_gaussian_mean``: the same with the clip norm tracking a quantile of update norms
  (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive
  Clipping"); the clipped-count estimate is itself noised, and the update noise is shrunk so the
  pair costs exactly one Gaussian mechanism of multiplier ``z``.
* ``local_gaussian(C, z)``: local DP, every client clips and adds ``N(0, (z C)^2)`` before sending.
* ``distributed_gaussian(C, z, n)``: each client adds ``N(0, (z C)^2 / n)`` so that the sum of
  ``n`` contributions carries the central noise (to be summed under secure aggregation).
* ``public_weighted_mean(w)``: mean with weights fixed in advance (aggregation weights must not
  depend on private data, e.g. on how many patients Poisson sampling picked).

Clients take part when their weight is positive and, if the cohort context has one,
``participating`` is True (Poisson client sampling, see ``experiment.py``). All noise is drawn
from the ``rng`` passed to ``apply``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_health import context
from fedjax_health.traced import is_traced
from fedjax_health.aggregators.base import (Aggregator, EmptyState, StreamingAggregator, UpdateTransform, client_norms,
                                           stacked, weighted_sum)


def _positive(value: float, name: str) -> float:
  if is_traced(value):  # a sweep's member, checked on the host before tracing (fedjax_health/sweep.py)
    return value
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
  return float(value)


def _bcast(w: jax.Array, leaf: jax.Array) -> jax.Array:
  return w.reshape(w.shape + (1,) * (leaf.ndim - 1))


def _empty_init(params):
  del params
  return EmptyState()


def _clip_scale(norms: jax.Array, clip_norm) -> jax.Array:
  return jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))


def clip_by_norm(updates, clip_norm) -> tuple:
  """Returns (updates scaled so each client's L2 norm is <= clip_norm, norms before clipping)."""
  norms = client_norms(updates)
  scale = _clip_scale(norms, clip_norm)
  return jax.tree.map(lambda u: u * _bcast(scale, u).astype(u.dtype), updates), norms


def gaussian_like(rng: jax.Array, tree, std) -> object:
  """Returns a pytree shaped like ``tree`` of i.i.d. ``N(0, std^2)`` draws (one key per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def _participating(weights: jax.Array, client_ctx) -> jax.Array:
  part = weights > 0
  if isinstance(client_ctx, dict) and "participating" in client_ctx:
    part = part & client_ctx["participating"]
  return part


def participation(weights: jax.Array, ctx) -> jax.Array:
  """Returns the bool ``[cohort]`` of clients that contribute: weight > 0 and participating."""
  return _participating(weights, (ctx or {}).get("client_ctx") or {})


def clip_updates(clip_norm: float) -> UpdateTransform:
  """Returns the transform clipping each client's update to L2 norm ``clip_norm``.

  info: ``clip_norm``, ``clipped_fraction`` (of clients whose norm exceeded it).
  """
  clip_norm = _positive(clip_norm, "clip_norm")

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    clipped, norms = clip_by_norm(updates, clip_norm)
    return clipped, weights, state, {"clip_norm": jnp.float32(clip_norm),
                                     "clipped_fraction": jnp.mean(norms > clip_norm)}

  return UpdateTransform(_empty_init, apply)


def _noised_over(total, rng, std, denominator):
  """Returns ``(total + N(0, std^2)) / denominator`` leaf by leaf."""
  noise = gaussian_like(rng, total, std)
  return jax.tree.map(lambda t, n: (t + n) / denominator, total, noise)


def _fixed_mean_info(num_participating, num_clipped, std, clip_norm) -> dict:
  return {"num_participating": jnp.asarray(num_participating).astype(jnp.int32), "noise_std": jnp.float32(std),
          "clipped_fraction": num_clipped / jnp.maximum(num_participating, 1), "clip_norm": jnp.float32(clip_norm)}


def _noisy_fixed_mean(updates, weights, ctx, rng, clip_norm, std, denominator):
  part = participation(weights, ctx)
  clipped, norms = clip_by_norm(updates, clip_norm)
  agg = _noised_over(weighted_sum(clipped, part), rng, std, denominator)
  info = _fixed_mean_info(jnp.sum(part), jnp.sum((norms > clip_norm) & part), std, clip_norm)
  return agg, part, norms, info


def central_gaussian_streaming(clip_norm: float, noise_multiplier: float, denominator: float) -> StreamingAggregator:
  """Returns DP-FedAvg's aggregator: clipped sum + ``N(0, (z C)^2)``, over a fixed denominator.

  McMahan et al. 2018. Each participating client counts once (unit weight), so adding or
  removing a client changes the sum by at most ``C``; the Gaussian mechanism of multiplier
  ``noise_multiplier`` then gives client-level DP, accounted in ``accounting.py``. Clipping only
  scales each client's update, so the clipped sum is linear in the updates: the round accumulates
  it streaming (on the low-rank path as GEMMs); ``central_gaussian_mean`` is the same aggregator
  on stacked updates. ``noise_multiplier=0`` is the noiseless twin (``clipped_fixed_mean``).
  """
  clip_norm = _positive(clip_norm, "clip_norm")
  if not is_traced(noise_multiplier) and not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
    raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
  denominator = _positive(denominator, "denominator")
  std = noise_multiplier * clip_norm

  def client_scale(norm, weight, client_ctx):
    part = _participating(weight, client_ctx)
    scale = jnp.where(part, _clip_scale(norm, clip_norm), 0.0)
    return scale, {"num_participating": part.astype(jnp.float32),
                   "num_clipped": (part & (norm > clip_norm)).astype(jnp.float32)}

  def finalize(total, stats, rng):
    return (_noised_over(total, rng, std, denominator),
            _fixed_mean_info(stats["num_participating"], stats["num_clipped"], std, clip_norm))

  return StreamingAggregator(client_scale, finalize)


def central_gaussian_mean(clip_norm: float, noise_multiplier: float, denominator: float) -> Aggregator:
  """Returns ``central_gaussian_streaming`` on stacked updates; ``noise_multiplier`` must be > 0
  (the epsilon = inf run goes through ``clipped_fixed_mean``)."""
  noise_multiplier = _positive(noise_multiplier, "noise_multiplier")
  return stacked(central_gaussian_streaming(clip_norm, noise_multiplier, denominator))


def clipped_fixed_mean(clip_norm: float, denominator: float) -> Aggregator:
  """Returns the noiseless twin of ``central_gaussian_mean`` (same clipping and denominator)."""
  return stacked(central_gaussian_streaming(clip_norm, 0.0, denominator))


class AdaptiveClipState(NamedTuple):
  clip_norm: jax.Array


def adaptive_update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
  """Returns z_Delta with ``(z_Delta^-2 + (2 sigma_b)^-2)^-1/2 = z`` (Andrew et al. 2021, Thm 1).

  Raises ValueError when the count noise alone already costs more privacy than ``z`` allows.
  """
  z = _positive(noise_multiplier, "noise_multiplier")
  sb = _positive(clipped_count_stddev, "clipped_count_stddev")
  rest = z ** -2 - (2.0 * sb) ** -2
  if rest <= 0:
    raise ValueError(f"clipped_count_stddev={sb} is too small for noise_multiplier={z}: need "
                     f"2 * clipped_count_stddev > noise_multiplier (raise the count noise or the epsilon)")
  return rest ** -0.5


def adaptive_clip_gaussian_mean(initial_clip_norm: float, noise_multiplier: float, denominator: float,
                                target_quantile: float = 0.5, learning_rate: float = 0.2,
                                clipped_count_stddev: float | None = None) -> Aggregator:
  """Returns DP-FedAvg with quantile-based adaptive clipping (Andrew et al. 2021).

  Each round, with clip norm ``C``: ``b_i = 1[||Delta_i|| <= C]``; the server releases
  ``b = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2`` (centred bits: sensitivity 1/2, as in
  TensorFlow Privacy's quantile estimator) and the noised clipped mean with update noise
  ``z_Delta C``; then ``C <- C exp(-eta (b - gamma))`` (geometric update). The default
  ``sigma_b = m / 20`` follows the paper. The two releases together cost one Gaussian
  mechanism of multiplier ``noise_multiplier``.
  """
  c0 = _positive(initial_clip_norm, "initial_clip_norm")
  z = _positive(noise_multiplier, "noise_multiplier")
  denominator = _positive(denominator, "denominator")
  if not 0.0 < target_quantile < 1.0:
    raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
  eta = _positive(learning_rate, "learning_rate")
  sigma_b = denominator / 20.0 if clipped_count_stddev is None else clipped_count_stddev
  z_delta = adaptive_update_noise_multiplier(z, sigma_b)

  def init(params):
    del params
    return AdaptiveClipState(jnp.float32(c0))

  def apply(updates, weights, state, rng, ctx):
    k_upd, k_count = jax.random.split(rng)
    clip = state.clip_norm
    agg, part, norms, info = _noisy_fixed_mean(updates, weights, ctx, k_upd, clip, z_delta * clip, denominator)
    # Centred bits b_i - 1/2: adding or removing a client moves their sum by 1/2, hence 2 sigma_b.
    centred = jnp.sum(jnp.where(part, (norms <= clip).astype(jnp.float32) - 0.5, 0.0))
    frac = (centred + sigma_b * jax.random.normal(k_count, ())) / denominator + 0.5
    new_clip = clip * jnp.exp(-eta * (frac - target_quantile))
    info = dict(info, clip_norm=clip, unclipped_fraction_estimate=frac)
    return agg, AdaptiveClipState(new_clip.astype(jnp.float32)), info

  return Aggregator(init, apply)


def local_gaussian(clip_norm: float, noise_multiplier: float) -> UpdateTransform:
  """Returns local DP: each client clips to ``C`` and adds ``N(0, (z C)^2)`` to its own update.

  The server never sees an un-noised update; each release is a Gaussian mechanism of
  sensitivity ``2C`` (the client's data may change arbitrarily), i.e. multiplier ``z / 2``.
  """
  clip_norm = _positive(clip_norm, "clip_norm")
  std = _positive(noise_multiplier, "noise_multiplier") * clip_norm

  def apply(updates, weights, state, rng, ctx):
    del ctx
    clipped, norms = clip_by_norm(updates, clip_norm)
    noise = gaussian_like(rng, clipped, std)
    return (jax.tree.map(jnp.add, clipped, noise), weights, state,
            {"clipped_fraction": jnp.mean(norms > clip_norm), "local_noise_std": jnp.float32(std)})

  return UpdateTransform(_empty_init, apply)


def distributed_gaussian(clip_norm: float, noise_multiplier: float, num_shares: int) -> UpdateTransform:
  """Returns distributed noise: each client clips to ``C`` and adds ``N(0, (z C)^2 / num_shares)``.

  Summed over at least ``num_shares`` clients (enforced by the secure aggregator's
  ``min_survivors``) the noise has std >= ``z C``, the central mechanism, while the server only
  ever sees the masked vectors and the noised sum.
  """
  clip_norm = _positive(clip_norm, "clip_norm")
  z = _positive(noise_multiplier, "noise_multiplier")
  if int(num_shares) < 1:
    raise ValueError(f"num_shares must be >= 1, got {num_shares}")
  std = z * clip_norm / math.sqrt(int(num_shares))

  def apply(updates, weights, state, rng, ctx):
    del ctx
    clipped, norms = clip_by_norm(updates, clip_norm)
    noise = gaussian_like(rng, clipped, std)
    return (jax.tree.map(jnp.add, clipped, noise), weights, state,
            {"clipped_fraction": jnp.mean(norms > clip_norm), "noise_std_per_client": jnp.float32(std)})

  return UpdateTransform(_empty_init, apply)


def public_weighted_mean(client_weights) -> Aggregator:
  """Returns the mean weighted by fixed public per-client weights (looked up by ``ctx['cohort']``)."""
  table = jnp.asarray(client_weights, jnp.float32)
  if table.ndim != 1 or not bool(jnp.all(table >= 0)) or not bool(jnp.any(table > 0)):
    raise ValueError("client_weights must be a 1-D array of weights >= 0 with at least one > 0")

  def apply(updates, weights, state, rng, ctx):
    del rng
    w = jnp.where(participation(weights, ctx), table[context.require(ctx, "cohort", "public_weighted_mean")], 0.0)
    w = w / jnp.maximum(jnp.sum(w), 1e-12)
    return weighted_sum(updates, w), state, {}

  return Aggregator(_empty_init, apply)
