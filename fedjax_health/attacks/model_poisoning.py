"""Model poisoning: PGD, model replacement, and untargeted byzantine updates.

Targeted (backdoor) model poisoning, on top of training on poisoned data (``poisoning.py``):

* ``pgd_projection``: a client ``projection`` hook: after every local step a malicious client
  projects its model onto ``||w_i - w|| <= radius`` around the round's global model ``w``, so
  its update passes norm-based defences (Sun et al. 2019; Wang et al. 2020).
* ``model_replacement``: the malicious update is scaled by ``n_S / n_i`` (total weight of the
  round over the attacker's weight; split among the attackers of the round) so that the
  weighted average becomes the attacker's model (Bagdasaryan et al. 2020). PGD + replacement:
  both together.

Untargeted (byzantine) updates, as UpdateTransforms that replace the malicious rows of the stack
(``ctx["client_ctx"]["malicious"]``) with ``jnp.where``; those that need benign statistics see
the whole stack. ``knowledge="full"`` is the omniscient attacker of Fang et al. and Baruch et al.,
``"partial"`` uses only the attackers' own honestly trained updates (they hold benign data too).
With full knowledge, ALIE and IPM take their statistics over the *honest* clients only (the
papers' form: Baruch et al. estimate the correct workers' mean and std, Xie et al. use the mean
of the correct gradients) and ALIE uses the sample std (``ddof=1``); ``include_attackers=True``
(and ``ddof=0``) restores the earlier form, statistics over every client's honestly trained
update. Fang's attacks use every client's honestly trained update, as Fang et al. do:

* ``sign_flip``: ``-scale * u_i`` (reversed gradient).
* ``gaussian``: ``N(0, stddev^2)`` per coordinate (Blanchard et al. 2017).
* ``alie``: "A little is enough" (Baruch et al. 2019): ``mu - z sigma`` coordinate-wise, with
  ``z`` from the cohort size and number of attackers (``s = floor(n/2 + 1) - m``,
  ``z = Phi^-1((n - s) / n)``) unless given.
* ``ipm``: inner-product manipulation (Xie et al. 2020, "Fall of empires"): ``-epsilon * mu``.
* ``fang_trimmed_mean``: Fang et al. 2020 ("Local model poisoning attacks to byzantine-robust
  FL") against trimmed mean and median: on each coordinate, values beyond the benign extreme
  opposite to the benign direction, drawn from ``[x, b x]`` or ``[x / b, x]``.
* ``fang_krum``: Fang et al. 2020 against Krum: every attacker sends ``-lambda s`` (``s`` the
  sign of the benign direction) with the largest ``lambda`` (halving search from their upper
  bound) for which Krum still selects an attacker.
* ``nonfinite``: NaN updates (a crashed or hostile client); the server must drop them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from fedjax_health import context
from fedjax_health.aggregators import robust
from fedjax_health.aggregators.base import EmptyState, UpdateTransform, flatten_updates, unflatten_like


def _empty_init(params):
  del params
  return EmptyState()


def _malicious_mask(ctx, who: str) -> jax.Array:
  return jnp.asarray(context.client_array(ctx, "malicious", who), bool)


def _replace_rows(updates, malicious: jax.Array, new_flat: jax.Array):
  """Returns the stack with malicious rows replaced by rows of ``new_flat [C, D]``."""
  flat = flatten_updates(updates)
  return unflatten_like(jnp.where(malicious[:, None], new_flat.astype(flat.dtype), flat), updates)


def _reference_set(weights, malicious, knowledge: str, include_attackers: bool = True) -> jax.Array:
  """Returns the clients whose honestly trained updates the attack's statistics use."""
  valid = weights > 0
  if knowledge == "partial":
    return valid & malicious
  return valid if include_attackers else valid & ~malicious


def _masked_mean_std(flat, mask, ddof: int = 0):
  w = mask.astype(flat.dtype)[:, None]
  count = jnp.sum(w)
  mu = jnp.sum(flat * w, axis=0) / jnp.maximum(count, 1.0)
  var = jnp.sum(jnp.square(flat - mu) * w, axis=0) / jnp.maximum(count - ddof, 1.0)
  return mu, jnp.sqrt(var)


def _check_knowledge(knowledge: str) -> None:
  if knowledge not in ("full", "partial"):
    raise ValueError(f"attack knowledge must be 'full' or 'partial', got {knowledge!r}")


# ----------------------------------------------------------------------------------------------
# Targeted: PGD and model replacement.


def pgd_projection(radius: float) -> Callable:
  """Returns the projection hook keeping a malicious client within ``||w_i - w|| <= radius``.

  A client-level hook: ``ctx`` is this client's row of the context (``{"malicious": bool}``, see
  ``fedjax_health.context``); honest clients (``ctx["malicious"]`` False) are left unchanged.
  """
  if not radius > 0:
    raise ValueError(f"PGD radius must be > 0, got {radius}")

  def projection(params, anchor, ctx):
    delta = jax.tree.map(jnp.subtract, params, anchor)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in jax.tree.leaves(delta)))
    mal = jnp.asarray(context.client_value(ctx, "malicious", "pgd_projection"), bool)
    scale = jnp.where(mal, jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12)), 1.0)
    return jax.tree.map(lambda a, d: a + (scale * d).astype(d.dtype), anchor, delta)

  return projection


def model_replacement(scale: float | None = None, server_learning_rate: float = 1.0) -> UpdateTransform:
  """Returns the model-replacement boost (Bagdasaryan et al. 2020).

  Each malicious update is multiplied by ``scale`` or, by default, by ``n_S / (m n_i eta)``: the
  round's total weight over the attacker's own weight, shared among the ``m`` attackers of the
  round, over the server learning rate ``eta`` (the paper's ``gamma = n / eta``). With a
  weighted-mean server applying the aggregate by SGD with learning rate ``eta`` and honest updates
  near zero (a converged model), the new global model is then exactly the attackers' (mean)
  model. (An adaptive server optimiser rescales the step itself; the boost is then approximate.)
  """
  if scale is not None and not scale > 0:
    raise ValueError(f"model replacement scale must be > 0 (None: n_S / (n_i eta)), got {scale}")
  if not (server_learning_rate > 0 and server_learning_rate < float("inf")):
    raise ValueError(f"model replacement server_learning_rate must be finite and > 0, got {server_learning_rate}")

  def apply(updates, weights, state, rng, ctx):
    del rng
    mal = _malicious_mask(ctx, "model_replacement") & (weights > 0)
    if scale is None:
      m = jnp.maximum(jnp.sum(mal), 1)
      gamma = jnp.sum(weights) / (m * jnp.maximum(weights, 1e-12) * server_learning_rate)
    else:
      gamma = jnp.full(weights.shape, scale)
    gamma = jnp.where(mal, gamma, 1.0)
    updates = jax.tree.map(lambda u: u * gamma.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype), updates)
    return updates, weights, state, {"replacement_scale": jnp.max(jnp.where(mal, gamma, 0.0))}

  return UpdateTransform(_empty_init, apply)


# ----------------------------------------------------------------------------------------------
# Untargeted byzantine updates.


def sign_flip(scale: float = 1.0) -> UpdateTransform:
  """Returns the sign-flipping attack: malicious clients send ``-scale`` times their update."""
  if not scale > 0:
    raise ValueError(f"sign_flip scale must be > 0, got {scale}")

  def apply(updates, weights, state, rng, ctx):
    del rng
    flat = flatten_updates(updates)
    return _replace_rows(updates, _malicious_mask(ctx, "sign_flip"), -scale * flat), weights, state, {}

  return UpdateTransform(_empty_init, apply)


def gaussian(stddev: float) -> UpdateTransform:
  """Returns the Gaussian attack: malicious clients send ``N(0, stddev^2)`` per coordinate."""
  if not stddev > 0:
    raise ValueError(f"gaussian attack stddev must be > 0, got {stddev}")

  def apply(updates, weights, state, rng, ctx):
    context.require_rng(rng, "gaussian attack")
    flat = flatten_updates(updates)
    noise = stddev * jax.random.normal(rng, flat.shape, flat.dtype)
    return _replace_rows(updates, _malicious_mask(ctx, "gaussian"), noise), weights, state, {}

  return UpdateTransform(_empty_init, apply)


def alie_z(n: jax.Array, m: jax.Array) -> jax.Array:
  """Returns Baruch et al.'s ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n/2 + 1) - m`` (>= 0)."""
  n = jnp.asarray(n, jnp.float32)
  s = jnp.floor(n / 2 + 1) - m
  p = jnp.clip((n - s) / jnp.maximum(n, 1.0), 0.5, 1.0 - 1e-6)
  return ndtri(p)


def alie(z: float | None = None, knowledge: str = "full", include_attackers: bool = False,
         ddof: int = 1) -> UpdateTransform:
  """Returns "A little is enough" (Baruch et al. 2019): malicious rows ``mu - z * sigma``.

  ``mu``, ``sigma``: coordinate-wise mean and std (``ddof=1``: sample std, the paper's estimate)
  of the honest clients' updates (full knowledge; ``include_attackers=True``: of every client's
  honestly trained update) or of the attackers' own honestly trained updates (partial).
  """
  _check_knowledge(knowledge)
  if ddof not in (0, 1):
    raise ValueError(f"ALIE ddof must be 0 (population std) or 1 (sample std), got {ddof!r}")
  if z is not None and not z >= 0:
    raise ValueError(f"ALIE z must be >= 0 (None: Baruch et al.'s z_max), got {z}")

  def apply(updates, weights, state, rng, ctx):
    del rng
    mal = _malicious_mask(ctx, "alie")
    flat = flatten_updates(updates)
    mu, sigma = _masked_mean_std(flat, _reference_set(weights, mal, knowledge, include_attackers), ddof)
    zz = alie_z(jnp.sum(weights > 0), jnp.sum(mal & (weights > 0))) if z is None else jnp.asarray(z)
    new = jnp.broadcast_to(mu - zz * sigma, flat.shape)
    return _replace_rows(updates, mal, new), weights, state, {"alie_z": zz}

  return UpdateTransform(_empty_init, apply)


def ipm(epsilon: float = 0.5, knowledge: str = "full", include_attackers: bool = False) -> UpdateTransform:
  """Returns inner-product manipulation (Xie et al. 2020): malicious rows ``-epsilon * mean``.

  The mean is over the honest clients' updates (full knowledge; ``include_attackers=True``: over
  every client's honestly trained update) or the attackers' own honestly trained updates (partial).
  """
  _check_knowledge(knowledge)
  if not epsilon > 0:
    raise ValueError(f"IPM epsilon must be > 0, got {epsilon}")

  def apply(updates, weights, state, rng, ctx):
    del rng
    mal = _malicious_mask(ctx, "ipm")
    flat = flatten_updates(updates)
    mu, _ = _masked_mean_std(flat, _reference_set(weights, mal, knowledge, include_attackers))
    return _replace_rows(updates, mal, jnp.broadcast_to(-epsilon * mu, flat.shape)), weights, state, {}

  return UpdateTransform(_empty_init, apply)


def fang_trimmed_mean(b: float = 2.0, knowledge: str = "full") -> UpdateTransform:
  """Returns Fang et al.'s (2020) full-knowledge attack on trimmed mean / median.

  With ``s_j`` the sign of the benign mean on coordinate ``j`` and ``max_j``/``min_j`` the benign
  extremes: where ``s_j > 0`` attackers send values below ``min_j`` (uniform in
  ``[min_j / b, min_j]`` if ``min_j > 0`` else ``[b min_j, min_j]``), where ``s_j <= 0`` values
  above ``max_j`` (``[max_j, b max_j]`` if ``max_j > 0`` else ``[max_j / b, max_j]``).
  """
  _check_knowledge(knowledge)
  if not b > 1:
    raise ValueError(f"Fang attack b must be > 1, got {b}")

  def apply(updates, weights, state, rng, ctx):
    context.require_rng(rng, "fang_trimmed_mean attack")
    mal = _malicious_mask(ctx, "fang_trimmed_mean")
    flat = flatten_updates(updates)
    ref = _reference_set(weights, mal, knowledge)
    mu, _ = _masked_mean_std(flat, ref)
    hi = jnp.max(jnp.where(ref[:, None], flat, -jnp.inf), axis=0)
    lo = jnp.min(jnp.where(ref[:, None], flat, jnp.inf), axis=0)
    hi, lo = jnp.where(jnp.isfinite(hi), hi, 0.0), jnp.where(jnp.isfinite(lo), lo, 0.0)
    below_lo = jnp.where(lo > 0, lo / b, lo * b), lo  # interval [a, c] below the benign minimum
    above_hi = hi, jnp.where(hi > 0, hi * b, hi / b)
    a = jnp.where(mu > 0, below_lo[0], above_hi[0])
    c = jnp.where(mu > 0, below_lo[1], above_hi[1])
    u = jax.random.uniform(rng, flat.shape, flat.dtype)
    return _replace_rows(updates, mal, a + u * (c - a)), weights, state, {}

  return UpdateTransform(_empty_init, apply)


def fang_krum(num_byzantine: int | None = None, num_halvings: int = 24, knowledge: str = "full") -> UpdateTransform:
  """Returns Fang et al.'s (2020) full-knowledge attack on Krum.

  All attackers send ``-lambda * s`` (``s`` the sign of the benign mean, so the global model is
  pushed against the honest direction). ``lambda`` starts at Fang et al.'s upper bound
  ``min_i sum_{l in G_i} ||u_l - u_i|| / ((n - 2c - 1) sqrt(d)) + max_i ||u_i|| / sqrt(d)``
  (``G_i`` the ``n - c - 2`` benign nearest to ``u_i``) and is halved until Krum, with the
  defender's ``num_byzantine`` (default: the number of attackers ``c`` in the round), selects an
  attacker; after ``num_halvings`` halvings the smallest candidate is sent.
  """
  _check_knowledge(knowledge)
  if num_byzantine is not None and num_byzantine < 0:
    raise ValueError(f"fang_krum num_byzantine must be >= 0, got {num_byzantine}")
  if num_halvings < 1:
    raise ValueError(f"fang_krum num_halvings must be >= 1, got {num_halvings}")

  def apply(updates, weights, state, rng, ctx):
    del rng
    mal = _malicious_mask(ctx, "fang_krum")
    valid = weights > 0
    flat = flatten_updates(updates)
    ref = _reference_set(weights, mal, knowledge)
    n, c = jnp.sum(valid), jnp.sum(mal & valid)
    d = flat.shape[1]
    mu, _ = _masked_mean_std(flat, ref)
    s = jnp.sign(mu)
    sqd = robust.pairwise_sq_dists(flat)
    dist = jnp.sqrt(sqd)
    # Upper bound on lambda (Fang et al., Section 3.2), over the reference (benign) updates.
    k = jnp.maximum(n - c - 2, 1)
    others = ref[None, :] & ref[:, None] & ~jnp.eye(flat.shape[0], dtype=bool)
    near = jnp.sort(jnp.where(others, dist, jnp.inf), axis=1)
    near_sum = jnp.sum(jnp.where((jnp.arange(flat.shape[0])[None, :] < k) & jnp.isfinite(near), near, 0.0), axis=1)
    norms = jnp.sqrt(jnp.sum(flat * flat, axis=1))
    lam0 = (jnp.min(jnp.where(ref, near_sum, jnp.inf)) / (jnp.maximum(n - 2 * c - 1, 1) * jnp.sqrt(d))
            + jnp.max(jnp.where(ref, norms, 0.0)) / jnp.sqrt(d))
    lam0 = jnp.where(jnp.isfinite(lam0), lam0, 0.0)
    lams = lam0 / 2.0 ** jnp.arange(num_halvings)
    f = c if num_byzantine is None else num_byzantine
    # Squared distances with the attackers at -lambda s: benign-benign unchanged, attacker-attacker
    # 0, benign i to attacker ||u_i + lambda s||^2.
    dot = flat @ s
    ss = jnp.sum(s * s)

    def selects_attacker(lam):
      to_att = jnp.sum(flat * flat, axis=1) + 2 * lam * dot + lam * lam * ss
      att_row = jnp.where(mal, 0.0, to_att)
      sq = jnp.where(mal[:, None], att_row[None, :], jnp.where(mal[None, :], to_att[:, None], sqd))
      sq = sq * (1.0 - jnp.eye(flat.shape[0]))
      scores = robust.krum_scores(sq, valid, f)
      return mal[jnp.argmin(scores)]

    ok = jax.vmap(selects_attacker)(lams)
    lam = jnp.where(jnp.any(ok), lams[jnp.argmax(ok)], lams[-1])
    new = jnp.broadcast_to(-lam * s, flat.shape)
    return _replace_rows(updates, mal, new), weights, state, {"fang_lambda": lam}

  return UpdateTransform(_empty_init, apply)


def nonfinite() -> UpdateTransform:
  """Returns the attack whose malicious clients send NaN updates."""

  def apply(updates, weights, state, rng, ctx):
    del rng
    flat = flatten_updates(updates)
    return _replace_rows(updates, _malicious_mask(ctx, "nonfinite"), jnp.full_like(flat, jnp.nan)), weights, state, {}

  return UpdateTransform(_empty_init, apply)
