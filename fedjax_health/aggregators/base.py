"""Update transforms and aggregators: optax-like pairs of pure functions on stacked updates.

Client updates arrive stacked, ``[cohort, ...]`` per leaf, with ``weights [cohort]`` (examples
used by default) and a context dict ``ctx`` (``params``: the round's global params, ``round``,
``cohort``, ``client_ctx``: per-client context such as the malicious mask ``[cohort]``; the
convention, and the keys each transform reads, are in ``fedjax_health.context``).

* ``UpdateTransform(init, apply)``: ``apply(updates, weights, state, rng, ctx) ->
  (updates, weights, state, info)`` changes the stack (clipping, noise, attacks, rejection).
* ``Aggregator(init, apply)``: ``apply(updates, weights, state, rng, ctx) ->
  (aggregate, state, info)`` combines the stack into one update.
* ``chain(t1, ..., aggregator)`` composes transforms in order, then the aggregator;
  ``chain(t1, t2)`` (no aggregator) is itself an UpdateTransform.
* ``StreamingAggregator(client_scale, finalize)``: an aggregator *linear* in the updates,
  ``finalize(sum_c scale_c * update_c, sum_c stats_c, rng)``, with each client's scalar ``scale``
  and ``stats`` from ``client_scale(norm, weight, client_ctx)``. The round computes it streaming
  (never stacking the cohort; on the low-rank path as GEMMs). FedAvg's weighted mean and
  DP-FedAvg's clipped, noised fixed-denominator mean have this form.

``info`` is a flat dict of arrays (logged as metrics); aggregators that drop clients report a
boolean ``rejected [cohort]``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
InitFn = Callable[[PyTree], PyTree]
TransformApplyFn = Callable[..., tuple[PyTree, jax.Array, PyTree, dict]]
AggregateApplyFn = Callable[..., tuple[PyTree, PyTree, dict]]


class EmptyState(NamedTuple):
  """State of a stateless transform or aggregator."""


class UpdateTransform(NamedTuple):
  init: InitFn
  apply: TransformApplyFn


class Aggregator(NamedTuple):
  init: InitFn
  apply: AggregateApplyFn


def _empty_init(params):
  del params
  return EmptyState()


class StreamingAggregator(NamedTuple):
  """``client_scale(norm, weight, client_ctx) -> (scale, stats)`` per client (scalars and a dict
  of scalars); ``finalize(total, stats_sum, rng) -> (aggregate, info)``. Stateless."""

  client_scale: Callable[..., tuple[jax.Array, dict]]
  finalize: Callable[..., tuple[PyTree, dict]]


def streaming_weighted_mean() -> StreamingAggregator:
  """Returns FedAvg's weighted mean (weights = examples used) in streaming form."""

  def client_scale(norm, weight, client_ctx):
    del norm, client_ctx
    return weight, {"weight": weight}

  def finalize(total, stats, rng):
    del rng
    return jax.tree.map(lambda t: t / jnp.maximum(stats["weight"], 1e-12), total), {}

  return StreamingAggregator(client_scale, finalize)


def stacked(aggregator: StreamingAggregator) -> Aggregator:
  """Returns a ``StreamingAggregator`` as an ``Aggregator`` on stacked updates (same result)."""

  def apply(updates, weights, state, rng, ctx):
    client_ctx = (ctx or {}).get("client_ctx") or {}
    scale, stats = jax.vmap(aggregator.client_scale)(client_norms(updates), weights, client_ctx)
    agg, info = aggregator.finalize(weighted_sum(updates, scale), jax.tree.map(lambda s: jnp.sum(s, axis=0), stats),
                                    rng)
    return agg, state, info

  return Aggregator(_empty_init, apply)


def identity() -> UpdateTransform:
  """Returns the transform that changes nothing."""

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    return updates, weights, state, {}

  return UpdateTransform(_empty_init, apply)


def chain(*parts) -> Aggregator | UpdateTransform:
  """Returns the parts applied in order: an Aggregator when the last part is one, else an
  UpdateTransform (a chain of transforms only, to run before an aggregator of your own).

  Info keys are prefixed with the part's position when two parts report the same key (the
  ``rejected`` masks are OR-ed). ``rng`` may be None when no part draws random numbers (a
  randomised part then raises naming itself); ``ctx`` may be None when no part reads it.
  """
  if not parts:
    raise TypeError("chain(...) needs at least one UpdateTransform or Aggregator")
  ends_in_aggregator = isinstance(parts[-1], Aggregator)
  transforms = parts[:-1] if ends_in_aggregator else parts
  for i, t in enumerate(transforms):
    if not isinstance(t, UpdateTransform):
      where = "before the final Aggregator" if ends_in_aggregator else "(only the last part may be an Aggregator)"
      raise TypeError(f"chain(...) part {i} is a {type(t).__name__} {where}; expected an UpdateTransform")

  def init(params):
    return tuple(p.init(params) for p in parts)

  def split(rng):
    return [None] * len(parts) if rng is None else jax.random.split(rng, len(parts))

  def merge(info, i, part_info):
    for k, v in part_info.items():
      if k in info and k == "rejected":
        info[k] = info[k] | v
      elif k in info:
        info[f"{i}/{k}"] = v
      else:
        info[k] = v

  def run_transforms(updates, weights, state, keys, ctx):
    new_state, info = [], {}
    for i, t in enumerate(transforms):
      updates, weights, s, t_info = t.apply(updates, weights, state[i], keys[i], ctx)
      new_state.append(s)
      merge(info, i, t_info)
    return updates, weights, new_state, info

  if not ends_in_aggregator:

    def apply_transforms(updates, weights, state, rng=None, ctx=None):
      updates, weights, new_state, info = run_transforms(updates, weights, state, split(rng), ctx)
      return updates, weights, tuple(new_state), info

    return UpdateTransform(init, apply_transforms)

  aggregator = parts[-1]

  def apply(updates, weights, state, rng=None, ctx=None):
    keys = split(rng)
    updates, weights, new_state, info = run_transforms(updates, weights, state, keys, ctx)
    agg, s, a_info = aggregator.apply(updates, weights, state[-1], keys[-1], ctx)
    new_state.append(s)
    merge(info, len(transforms), a_info)
    return agg, tuple(new_state), info

  return Aggregator(init, apply)


def _bcast(w: jax.Array, leaf: jax.Array) -> jax.Array:
  return w.reshape(w.shape + (1,) * (leaf.ndim - 1))


def weighted_sum(updates: PyTree, weights: jax.Array) -> PyTree:
  return jax.tree.map(lambda u: jnp.sum(u * _bcast(weights, u).astype(u.dtype), axis=0), updates)


def weighted_mean() -> Aggregator:
  """FedAvg's aggregate (McMahan et al. 2017): sum_i w_i u_i / sum_i w_i (0 if all weights 0)."""

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    total = jnp.sum(weights)
    agg = weighted_sum(updates, weights / jnp.maximum(total, 1e-12))
    return agg, state, {}

  return Aggregator(_empty_init, apply)


def uniform_mean() -> Aggregator:
  """Unweighted mean over clients with a positive weight."""

  def apply(updates, weights, state, rng, ctx):
    w = (weights > 0).astype(jnp.float32)
    return weighted_mean().apply(updates, w, state, rng, ctx)

  return Aggregator(_empty_init, apply)


def client_norms(updates: PyTree) -> jax.Array:
  """Returns the L2 norm of each client's whole update, ``[cohort]``."""
  sq = sum(jnp.sum(jnp.square(u.reshape(u.shape[0], -1)), axis=1) for u in jax.tree.leaves(updates))
  return jnp.sqrt(sq)


def flatten_updates(updates: PyTree) -> jax.Array:
  """Returns the stack as one matrix ``[cohort, num_params]``."""
  leaves = jax.tree.leaves(updates)
  return jnp.concatenate([u.reshape(u.shape[0], -1) for u in leaves], axis=1)


def unflatten_like(flat: jax.Array, updates: PyTree) -> PyTree:
  """Inverse of ``flatten_updates`` for one row (``[num_params]``) or a stack."""
  leaves, treedef = jax.tree.flatten(updates)
  out, i = [], 0
  stacked = flat.ndim == 2
  for u in leaves:
    size = int(u[0].size)
    chunk = flat[..., i:i + size]
    out.append(chunk.reshape((flat.shape[0],) + u.shape[1:] if stacked else u.shape[1:]))
    i += size
  return jax.tree.unflatten(treedef, out)


def reject_nonfinite() -> UpdateTransform:
  """Drops clients whose update has any NaN/Inf: update zeroed, weight 0, counted in info."""

  def apply(updates, weights, state, rng, ctx):
    del rng, ctx
    finite = jnp.ones(weights.shape, bool)
    for u in jax.tree.leaves(updates):
      finite &= jnp.all(jnp.isfinite(u.reshape(u.shape[0], -1)), axis=1)
    updates = jax.tree.map(lambda u: jnp.where(_bcast(finite, u), u, 0.0), updates)
    weights = jnp.where(finite, weights, 0.0)
    return updates, weights, state, {"rejected": ~finite, "num_nonfinite": jnp.sum(~finite)}

  return UpdateTransform(_empty_init, apply)
