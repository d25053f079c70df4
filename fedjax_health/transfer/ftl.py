"""Federated transfer learning (Liu, Kang, Xing, Chen & Yang, "A Secure Federated Transfer Learning
Framework", IEEE Intelligent Systems 2020, arXiv:1812.03337), plaintext reference.

Party A holds features ``x^A`` and labels ``y in {-1, +1}`` for its ``N_A`` patients; party B holds
other features ``x^B`` and no labels; ``N`` patients are shared (the overlap, rows ``:N`` of both).
Each party maps its features to ``d``-dimensional representations with its own flax network,
``u^A = Net_A(x^A)``, ``u^B = Net_B(x^B)``. A's class representation is
``Phi = (1/N_A) sum_j y_j u_j^A`` and B predicts ``phi(u^B) = Phi . u^B`` (sign = class).
The loss (paper eq. 4-6 with its second-order Taylor expansion of the logistic loss,
``log(1 + e^{-y phi}) ~ log 2 - y phi / 2 + phi^2 / 8``), averaged over the overlap:

  L = alpha/N sum_i [log 2 - y_i phi_i / 2 + phi_i^2 / 8] + gamma/N sum_i l2(u_i^A, u_i^B)
      + lambda/2 (|theta_A|^2 + |theta_B|^2),

with the alignment ``l2 = |u^A - u^B|^2 / 2`` ("squared") or ``-u^A . u^B`` ("dot"), the two the
paper names. (The paper sums over samples; the means here only rescale alpha and gamma.)

The protocol's structure: every term of ``dL/dtheta`` that mixes the parties' data is a product of
a matrix private to one party and a vector private to the other (the components the paper
exchanges encrypted):

* A sends ``v_A = [vec(M), vec(a)]`` with ``M = alpha/(4N) Phi^T Phi`` and
  ``a_i = -alpha/(2N) y_i Phi - gamma/N u_i^A`` (the paper's ``(1/4) D(y) Phi'Phi`` and
  ``(1/2) C(y) Phi`` terms and the alignment component); B's representation gradient is
  ``g_i^B = u_i^B M + a_i (+ gamma/N u_i^B)`` and ``dL/dtheta_B = W_B v_A + local_B`` with
  ``W_B`` built from B's Jacobians ``J_i^B = du_i^B / dtheta_B``;
* B sends ``v_B = [vec(U^B), vec(S)]`` with ``S = sum_i u_i^B' u_i^B`` (the paper sends each
  ``u_i^B' u_i^B``; only their sum is used); ``dL/dtheta_A = W_A v_B + local_A`` with ``W_A`` built
  from ``K = dPhi/dtheta_A`` and A's overlap Jacobians. One extra row of ``W_A`` gives the loss.

``cross_product(W, v)`` is the only place where one party's data meets the other's: plaintext
here, Paillier with masks in ``paillier.py``, Beaver-triple secret sharing in ``secret_sharing.py``.
As in the paper, each party learns only its own parameter gradient (and A the loss).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fedjax_health import models

ALIGNMENTS = ("squared", "dot")
LOG2 = math.log(2.0)


class FTLHyper(NamedTuple):
  alpha: float = 1.0  # weight of the (Taylor) logistic loss
  gamma: float = 1.0  # weight of the alignment loss
  lam: float = 1e-3  # L2 weight decay of both networks
  alignment: str = "squared"


def check_hyper(hp: FTLHyper) -> None:
  if hp.alignment not in ALIGNMENTS:
    raise ValueError(f"ftl.alignment must be one of {ALIGNMENTS}, got {hp.alignment!r}")
  for name in ("alpha", "gamma", "lam"):
    if not getattr(hp, name) >= 0:
      raise ValueError(f"ftl.{name} must be >= 0, got {getattr(hp, name)}")


def party_network(hidden, dim: int, activation: str = "tanh") -> models.MLP:
  """Returns the flax network ``x -> u`` (``d = dim`` outputs) of one party."""
  if dim < 1:
    raise ValueError(f"ftl.dim must be >= 1, got {dim}")
  return models.MLP(hidden=tuple(hidden), num_outputs=dim, activation=activation)


def taylor_logistic(y_pm: jax.Array, phi: jax.Array) -> jax.Array:
  """Returns the paper's second-order expansion of ``log(1 + exp(-y phi))`` around ``phi = 0``."""
  return LOG2 - 0.5 * y_pm * phi + 0.125 * phi ** 2


def class_representation(u_a: jax.Array, y_a: jax.Array) -> jax.Array:
  """Returns ``Phi = mean_j y_j u_j^A`` (``y`` in {0, 1} mapped to {-1, +1})."""
  return jnp.mean((2.0 * y_a - 1.0)[:, None] * u_a, axis=0)


def ftl_loss(params_a, params_b, net_a, net_b, x_a, y_a, x_b_overlap, hp: FTLHyper) -> jax.Array:
  """Returns the stated loss ``L`` (the reference for every gradient below)."""
  n = x_b_overlap.shape[0]
  u_a, u_b = net_a.apply(params_a, x_a), net_b.apply(params_b, x_b_overlap)
  phi_vec = class_representation(u_a, y_a)
  y_ov = 2.0 * y_a[:n] - 1.0
  l1 = jnp.mean(taylor_logistic(y_ov, u_b @ phi_vec))
  if hp.alignment == "squared":
    l2 = jnp.mean(0.5 * jnp.sum((u_a[:n] - u_b) ** 2, axis=1))
  else:
    l2 = -jnp.mean(jnp.sum(u_a[:n] * u_b, axis=1))
  reg = 0.5 * hp.lam * (sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params_a))
                        + sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params_b)))
  return hp.alpha * l1 + hp.gamma * l2 + reg


class PartyA(NamedTuple):
  """A's explicit intermediate quantities of one epoch (float64 NumPy)."""
  u_overlap: np.ndarray  # [N, d]
  phi: np.ndarray  # [d] class representation
  v: np.ndarray  # [d*d + N*d] sent to B (protected): vec(M), vec(a)
  w: np.ndarray  # [P_A + 1, N*d + d*d] A's private matrix times B's vector = cross part of grad (+ loss row)
  local: np.ndarray  # [P_A + 1] A's own part of the gradient (+ loss constant)


class PartyB(NamedTuple):
  u_overlap: np.ndarray  # [N, d]
  v: np.ndarray  # [N*d + d*d] sent to A (protected): vec(U^B), vec(S)
  w: np.ndarray  # [P_B, d*d + N*d]
  local: np.ndarray  # [P_B]


def _jacobians(net, flat, unravel, x):
  """Returns ``[rows, d, P]``: du_i/dtheta for every row."""
  f = lambda th, xi: net.apply(unravel(th), xi[None])[0]
  return jax.vmap(jax.jacrev(f), in_axes=(None, 0))(flat, x)


def make_party_fns(net_a, net_b, params_a, params_b, hp: FTLHyper):
  """Returns jitted ``(party_a(flat_a, x_a, y_a, n), party_b(flat_b, x_b_ov))`` and the unravel fns."""
  check_hyper(hp)
  _, unravel_a = ravel_pytree(params_a)
  _, unravel_b = ravel_pytree(params_b)
  squared = hp.alignment == "squared"

  def party_a(flat_a, x_a, y_a, n: int):
    u_a = net_a.apply(unravel_a(flat_a), x_a)
    phi = class_representation(u_a, y_a)
    d = phi.shape[0]
    u_ov = u_a[:n]
    y_ov = 2.0 * y_a[:n] - 1.0
    m = hp.alpha / (4 * n) * jnp.outer(phi, phi)
    a = -hp.alpha / (2 * n) * y_ov[:, None] * phi[None] - hp.gamma / n * u_ov
    v = jnp.concatenate([m.reshape(-1), a.reshape(-1)])
    k = jax.jacrev(lambda th: class_representation(net_a.apply(unravel_a(th), x_a), y_a))(flat_a)  # [d, P]
    j_ov = _jacobians(net_a, flat_a, unravel_a, x_a[:n])  # [N, d, P]
    # dL/dtheta_A = K^T dL/dPhi + gamma/N sum_i J_i^T dl2/du_i^A, dL/dPhi = -alpha/(2N) U^T y + alpha/(4N) S Phi.
    w_u = (-hp.alpha / (2 * n)) * jnp.einsum("kp,i->pik", k, y_ov) - hp.gamma / n * jnp.einsum("ikp->pik", j_ov)
    w_s = (hp.alpha / (4 * n)) * jnp.einsum("kp,l->pkl", k, phi)
    w = jnp.concatenate([w_u.reshape(w_u.shape[0], -1), w_s.reshape(w_s.shape[0], -1)], axis=1)
    # Loss row: alpha/N [N log 2 - Phi.(U^T y)/2 + Phi^T S Phi / 8] + gamma/N alignment.
    loss_u = -hp.alpha / (2 * n) * y_ov[:, None] * phi[None] - hp.gamma / n * u_ov
    loss_s = hp.alpha / (8 * n) * jnp.outer(phi, phi) + (hp.gamma / (2 * n) * jnp.eye(d) if squared else 0.0)
    loss_row = jnp.concatenate([loss_u.reshape(-1), loss_s.reshape(-1)])
    w = jnp.concatenate([w, loss_row[None]], axis=0)
    local_grad = hp.lam * flat_a
    loss_const = hp.alpha * LOG2
    if squared:
      local_grad = local_grad + hp.gamma / n * jnp.einsum("ikp,ik->p", j_ov, u_ov)
      loss_const = loss_const + hp.gamma / (2 * n) * jnp.sum(u_ov ** 2)
    local = jnp.concatenate([local_grad, jnp.reshape(loss_const, (1,))])
    return u_ov, phi, v, w, local

  def party_b(flat_b, x_b_ov):
    n = x_b_ov.shape[0]
    u_b = net_b.apply(unravel_b(flat_b), x_b_ov)
    s = u_b.T @ u_b
    v = jnp.concatenate([u_b.reshape(-1), s.reshape(-1)])
    j = _jacobians(net_b, flat_b, unravel_b, x_b_ov)  # [N, d, P]
    # dL/dtheta_B = sum_i J_i^T (u_i M + a_i) + local: T[p, k, l] = sum_i u_ik J_il p.
    t = jnp.einsum("ik,ilp->pkl", u_b, j)
    w = jnp.concatenate([t.reshape(t.shape[0], -1), jnp.einsum("ilp->pil", j).reshape(j.shape[2], -1)], axis=1)
    local = hp.lam * flat_b
    if squared:
      local = local + hp.gamma / n * jnp.einsum("ikp,ik->p", j, u_b)
    return u_b, v, w, local

  return (jax.jit(party_a, static_argnums=3), jax.jit(party_b)), (unravel_a, unravel_b)


def compute_parties(fns, flat_a, flat_b, x_a, y_a, x_b_ov) -> tuple[PartyA, PartyB]:
  """Returns both parties' intermediate quantities as float64 NumPy arrays."""
  party_a, party_b = fns
  n = x_b_ov.shape[0]
  pa = PartyA(*[np.asarray(t, np.float64) for t in party_a(flat_a, x_a, y_a, n)])
  pb = PartyB(*[np.asarray(t, np.float64) for t in party_b(flat_b, x_b_ov)])
  return pa, pb


CrossProduct = Callable[[str, np.ndarray, np.ndarray], np.ndarray]


def plaintext_cross(owner: str, w: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Returns ``w @ v`` in the clear (``owner`` = the party holding ``w``; no protection)."""
  del owner
  return w @ v


def protocol_gradients(pa: PartyA, pb: PartyB, cross: CrossProduct = plaintext_cross):
  """Returns (dL/dtheta_A, dL/dtheta_B, loss without the L2 term) from the parties' quantities."""
  out_a = cross("A", pa.w, pb.v) + pa.local
  out_b = cross("B", pb.w, pa.v) + pb.local
  return out_a[:-1], out_b, float(out_a[-1])


@dataclasses.dataclass
class FTLResult:
  params_a: object
  params_b: object
  phi: np.ndarray  # final class representation
  losses: list  # per epoch, the loss without the L2 term
  seconds: float


def pretrain_source(net_a, params_a, x_a, y_a, epochs: int, lr: float, lam: float):
  """Returns A's parameters after ``epochs`` full-batch Adam steps on its own labels alone.

  The objective is FTL's own prediction rule applied to A: mean_j taylor(y_j, Phi . u_j^A) + L2,
  so A's representation is discriminative before the transfer (A needs no one for this).
  """
  opt = optax.adam(lr)

  def loss(p):
    u = net_a.apply(p, x_a)
    phi = class_representation(u, y_a)
    return jnp.mean(taylor_logistic(2.0 * y_a - 1.0, u @ phi)) + 0.5 * lam * sum(
        jnp.sum(q ** 2) for q in jax.tree.leaves(p))

  @jax.jit
  def run(p):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      upd, s = opt.update(g, s, p)
      return (optax.apply_updates(p, upd), s), None
    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=epochs)
    return p

  return run(params_a) if epochs > 0 else params_a


def train_ftl(net_a, net_b, params_a, params_b, x_a, y_a, x_b_ov, hp: FTLHyper, epochs: int,
              lr: float, cross: CrossProduct = plaintext_cross, log_every: int = 0,
              log: Callable[[str], None] = print, on_epoch: Callable[[int, float], None] | None = None) -> FTLResult:
  """Returns both parties' networks after ``epochs`` full-batch Adam steps on the FTL protocol.

  Each epoch: both parties compute their quantities; the two cross products go through ``cross``;
  each party updates its own network with its own optimiser.
  """
  if epochs < 1:
    raise ValueError(f"ftl.epochs must be >= 1, got {epochs}")
  if x_b_ov.shape[0] < 1:
    raise ValueError("the overlap is empty: FTL needs at least one shared patient")
  flat_a, _ = ravel_pytree(params_a)
  flat_b, _ = ravel_pytree(params_b)
  fns, (unravel_a, unravel_b) = make_party_fns(net_a, net_b, params_a, params_b, hp)
  opt_a, opt_b = optax.adam(lr), optax.adam(lr)
  st_a, st_b = opt_a.init(flat_a), opt_b.init(flat_b)
  x_a, y_a, x_b_ov = jnp.asarray(x_a), jnp.asarray(y_a, jnp.float32), jnp.asarray(x_b_ov)
  losses, t0 = [], time.time()
  for epoch in range(1, epochs + 1):
    pa, pb = compute_parties(fns, flat_a, flat_b, x_a, y_a, x_b_ov)
    g_a, g_b, loss = protocol_gradients(pa, pb, cross)
    losses.append(loss)
    if not np.all(np.isfinite(g_a)) or not np.all(np.isfinite(g_b)):
      raise FloatingPointError(f"FTL gradients are not finite at epoch {epoch}; lower ftl.learning_rate")
    upd, st_a = opt_a.update(jnp.asarray(g_a, jnp.float32), st_a, flat_a)
    flat_a = optax.apply_updates(flat_a, upd)
    upd, st_b = opt_b.update(jnp.asarray(g_b, jnp.float32), st_b, flat_b)
    flat_b = optax.apply_updates(flat_b, upd)
    if on_epoch is not None:
      on_epoch(epoch, loss)
    if log_every and (epoch % log_every == 0 or epoch == epochs):
      log(f"epoch {epoch:5d}/{epochs}  loss {loss:.5f}")
  params_a, params_b = unravel_a(flat_a), unravel_b(flat_b)
  phi = np.asarray(class_representation(net_a.apply(params_a, x_a), y_a), np.float64)
  return FTLResult(params_a, params_b, phi, losses, time.time() - t0)


def predict_b(net_b, params_b, phi: np.ndarray, x_b: np.ndarray) -> np.ndarray:
  """Returns B's scores ``Phi . u^B`` (class 1 when > 0) for B's rows."""
  return np.asarray(net_b.apply(params_b, jnp.asarray(x_b)), np.float64) @ phi
