"""FedOpt's server optimisers in Reddi et al.'s form, and FedAvg's aggregation weights.

Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2: with the aggregate client
change ``Delta_t``,

    m_t = b1 m_{t-1} + (1 - b1) Delta_t
    v_t = v_{t-1} + Delta_t^2                                        (FedAdagrad)
    v_t = b2 v_{t-1} + (1 - b2) Delta_t^2                            (FedAdam)
    v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)     (FedYogi)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

with no bias correction and ``tau`` added outside the square root; FedAdagrad keeps the momentum
``b1``. FLamby's ``flamby/strategies/fed_opt.py`` implements exactly this with ``v_{-1} = 0``; the
paper asks ``v_{-1} >= tau^2`` (our default, ``initial_accumulator=None``). They are optax
``GradientTransformation``s applied to the pseudo-gradient ``-Delta_t`` (so the update is
``-eta m / (sqrt(v) + tau)`` of the pseudo-gradient's moments, the same thing): optax's
bias-corrected ``adam``/``yogi`` and momentum-free ``adagrad`` stay available as ``form="optax"``
in ``fedavg.server_optimizer``.

``aggregation_weights`` is the server's per-client weight: examples used this round (FedAvg of
McMahan et al.), training-set size (FLamby's FedAvg/FedOpt) or uniform.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_health.traced import is_traced

WEIGHTINGS = ("examples_used", "dataset_size", "uniform")
ADAPTIVE = ("adam", "yogi", "adagrad")


class ScaleByReddiState(NamedTuple):
  m: Any  # first moment of the pseudo-gradient
  v: Any  # second-moment accumulator


def scale_by_reddi(kind: str, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
                   initial_accumulator: float | None = None) -> optax.GradientTransformation:
  """Returns ``m_t / (sqrt(v_t) + tau)`` of Reddi et al.'s Algorithm 2 (``kind``: adam, yogi, adagrad).

  No bias correction; ``v`` starts at ``initial_accumulator`` (default ``tau**2``, the paper's
  ``v_{-1} >= tau^2``; FLamby uses 0).
  """
  if kind not in ADAPTIVE:
    raise ValueError(f"kind must be one of {ADAPTIVE}, got {kind!r}")
  if not 0 <= b1 < 1:
    raise ValueError(f"server b1 must be in [0, 1), got {b1}")
  if kind != "adagrad" and not 0 <= b2 < 1:
    raise ValueError(f"server b2 must be in [0, 1), got {b2}")
  if tau <= 0:
    raise ValueError(f"server tau must be > 0, got {tau}")
  v0 = tau ** 2 if initial_accumulator is None else initial_accumulator
  if v0 < 0:
    raise ValueError(f"server initial_accumulator must be >= 0, got {v0}")

  def init_fn(params):
    return ScaleByReddiState(jax.tree.map(jnp.zeros_like, params),
                             jax.tree.map(lambda p: jnp.full_like(p, v0), params))

  def second_moment(v, g):
    g2 = g * g
    if kind == "adagrad":
      return v + g2
    if kind == "adam":
      return b2 * v + (1 - b2) * g2
    return v - (1 - b2) * g2 * jnp.sign(v - g2)

  def update_fn(updates, state, params=None):
    del params
    m = jax.tree.map(lambda m_, g: b1 * m_ + (1 - b1) * g, state.m, updates)
    v = jax.tree.map(second_moment, state.v, updates)
    out = jax.tree.map(lambda m_, v_: m_ / (jnp.sqrt(v_) + tau), m, v)
    return out, ScaleByReddiState(m, v)

  return optax.GradientTransformation(init_fn, update_fn)


def reddi(kind: str, learning_rate: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
          initial_accumulator: float | None = None) -> optax.GradientTransformation:
  """Returns FedAdam/FedYogi/FedAdagrad's server step (Reddi et al. 2021, Algorithm 2) on pseudo-gradients."""
  if not is_traced(learning_rate) and learning_rate <= 0:
    raise ValueError(f"server learning_rate must be > 0, got {learning_rate}")
  return optax.chain(scale_by_reddi(kind, b1, b2, tau, initial_accumulator), optax.scale(-learning_rate))


def aggregation_weights(weighting: str, num_examples: jax.Array, dataset_size: jax.Array) -> jax.Array:
  """Returns each client's aggregation weight ``[cohort]``; 0 for a client that used no examples.

  ``examples_used``: examples this round (McMahan et al.); ``dataset_size``: the client's training
  set size (FLamby); ``uniform``: 1.
  """
  used = num_examples > 0
  if weighting == "examples_used":
    return num_examples.astype(jnp.float32)
  if weighting == "dataset_size":
    return jnp.where(used, dataset_size.astype(jnp.float32), 0.0)
  if weighting == "uniform":
    return used.astype(jnp.float32)
  raise ValueError(f"server weighting must be one of {WEIGHTINGS}, got {weighting!r}")
