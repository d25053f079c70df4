"""Example-level (patient-level) DP-SGD inside each client, for cross-silo hospitals.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): every local step computes
per-example gradients with ``vmap(grad)``, clips each to L2 norm ``C``, sums them, adds
``N(0, (z C)^2)`` and divides by a fixed denominator (the expected batch size), so one patient
moves a step by at most ``C / denominator`` whatever the rest of the batch holds.

The accounting in ``accounting.py`` assumes Poisson sampling: each patient enters each step's
batch independently with probability ``q``. ``poisson_batch_plan`` builds exactly that as a batch
plan for ``fedavg(plan_fn=...)``: each step's batch holds every example of the client with a fresh
Bernoulli(q) mask, plus one trailing *step slot* that is always on for a non-empty client. The
step slot keeps ``local_train`` from skipping a step whose Poisson batch came out empty: the noise
must be added at every step, or the skip itself would leak that nobody was sampled. The grad_fn
built with ``step_slot=True`` ignores that slot's example.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_health.privacy.dp import gaussian_like
from fedjax_health.traced import as_number, is_traced


def per_example_grads(example_losses: Callable, params, x: jax.Array, y: jax.Array):
  """Returns the gradient of each example's loss, stacked ``[B, ...]`` per leaf (``vmap(grad)``)."""

  def one(p, xi, yi):
    return example_losses(p, xi[None], yi[None])[0]

  return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)


def clipped_sum(grads, mask: jax.Array, clip_norm: float) -> tuple:
  """Returns (sum over masked examples of grads clipped to ``clip_norm``, per-example norms)."""
  sq = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in jax.tree.leaves(grads))
  norms = jnp.sqrt(sq)
  scale = jnp.where(mask, jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12)), 0.0)

  def leaf_sum(g):
    s = scale.reshape(scale.shape + (1,) * (g.ndim - 1))
    return jnp.sum(jnp.where(s > 0, g * s, 0.0), axis=0)

  return jax.tree.map(leaf_sum, grads), norms


def dp_sgd_grad_fn(example_losses: Callable, clip_norm: float, noise_multiplier: float | None,
                   denominator: float, regularizer: Callable | None = None, step_slot: bool = False):
  """Returns a ``grad_fn(params, anchor, x, y, mask, rng) -> (grads, loss)`` doing DP-SGD.

  Args:
    example_losses: ``(params, x[B], y[B]) -> [B]`` per-example losses.
    clip_norm: per-example L2 clip ``C`` (> 0).
    noise_multiplier: ``z`` > 0, noise std ``z C`` per step on the clipped sum; ``None`` clips
      without noise (the epsilon = inf reference, not private).
    denominator: fixed divisor of the noised sum (the expected batch size ``q n``).
    regularizer: optional data-independent ``(params, anchor) -> scalar`` (FedProx); its exact
      gradient is added and costs no privacy.
    step_slot: the batch's last slot is ``poisson_batch_plan``'s always-on step slot (ignored).
  The returned loss is the mean loss of the sampled examples (a simulation diagnostic only).
  """
  if not is_traced(clip_norm) and not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
  if noise_multiplier is not None and not is_traced(noise_multiplier) and not noise_multiplier > 0:
    raise ValueError(f"noise_multiplier must be > 0 (or None for no noise), got {noise_multiplier}")
  if not denominator > 0:
    raise ValueError(f"denominator must be > 0, got {denominator}")
  if noise_multiplier is None:
    std = 0.0
  else:  # a traced z: one member of a sweep (fedjax_health/sweep.py)
    std = as_number(noise_multiplier) * as_number(clip_norm)
  reg_grad = jax.grad(regularizer) if regularizer is not None else None

  def grad_fn(params, anchor, x, y, mask, rng):
    if step_slot:
      x, y, mask = x[:-1], y[:-1], mask[:-1]
    grads = per_example_grads(example_losses, params, x, y)
    total, _ = clipped_sum(grads, mask, clip_norm)
    if noise_multiplier is not None:
      total = jax.tree.map(jnp.add, total, gaussian_like(rng, total, std))
    out = jax.tree.map(lambda t: t / denominator, total)
    if reg_grad is not None:
      out = jax.tree.map(jnp.add, out, reg_grad(params, anchor))
    losses = example_losses(params, x, y)
    m = mask.astype(losses.dtype)
    loss = jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)
    return out, loss

  return grad_fn


def poisson_batch_plan(sampling_rate: float, num_steps: int, max_client_size: int):
  """Returns ``plan_fn(rng, sizes[C]) -> (pos [C, S, n_max + 1], mask)`` of Poisson batches.

  ``mask[c, s, i]`` (i < n_max) is True with probability ``sampling_rate`` for each of client c's
  examples, independently per step; slot ``n_max`` is the always-on step slot (see module doc).
  """
  if not 0.0 < sampling_rate <= 1.0:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if max_client_size < 1:
    raise ValueError(f"max_client_size must be >= 1, got {max_client_size}")
  n_max = int(max_client_size)

  def plan_fn(rng, sizes):
    cohort = sizes.shape[0]
    idx = jnp.arange(n_max, dtype=jnp.int32)
    valid = idx[None, None, :] < sizes.astype(jnp.int32)[:, None, None]
    sampled = valid & (jax.random.uniform(rng, (cohort, num_steps, n_max)) < sampling_rate)
    pos = jnp.broadcast_to(jnp.where(valid, idx[None, None, :], 0), (cohort, num_steps, n_max))
    step = jnp.broadcast_to((sizes > 0)[:, None, None], (cohort, num_steps, 1))
    pos = jnp.concatenate([pos, jnp.zeros((cohort, num_steps, 1), jnp.int32)], axis=-1)
    return pos, jnp.concatenate([sampled, step], axis=-1)

  return plan_fn
