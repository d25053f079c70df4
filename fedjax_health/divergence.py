"""Run-time divergence guard: non-finite global parameters or train loss stop the run (or warn).

A train loss above ``config.divergence_loss_limit`` (default 1e6: a cross-entropy that large means
logits wrong by ~1e6) counts as diverged too. Each compiled round also returns one int32 code
(``with_finite_flag``); the host reads these flags only when it already synchronises (before
writing a metrics row or a checkpoint), so the guard adds no per-round device round trip. The
first bad round is named, rows written before it stay in ``metrics.jsonl``, and no checkpoint of a
diverged state is saved. ``config.on_divergence``: ``"stop"`` (default) raises ``DivergenceError``;
``"warn"`` logs once and continues.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

FLAG = "_finite"  # the round metric carrying the flag; popped before metrics are written


class DivergenceError(RuntimeError):
  """Training diverged: the message names the experiment, the round and the likely causes."""


def tree_all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# Flag codes: what went wrong first in a round.
OK, PARAMS_NONFINITE, LOSS_NONFINITE, LOSS_TOO_LARGE = 0, 1, 2, 3
REASONS = {PARAMS_NONFINITE: "the global parameters hold NaN/inf",
           LOSS_NONFINITE: "the train loss is NaN/inf",
           LOSS_TOO_LARGE: "the train loss exceeds config.divergence_loss_limit={limit:g}"}


def with_finite_flag(round_fn: Callable, params_of: Callable, loss_limit: float = float("inf")) -> Callable:
  """Wraps ``round_fn(state, train, rng) -> (state, metrics)`` to add ``metrics[FLAG]``, a code:
  0 ok, 1 non-finite parameters, 2 non-finite train loss, 3 train loss above ``loss_limit``."""

  def wrapped(state, train, rng):
    state, metrics = round_fn(state, train, rng)
    code = jnp.where(tree_all_finite(params_of(state)), OK, PARAMS_NONFINITE)
    if "train_loss" in metrics:
      loss = metrics["train_loss"]
      code = jnp.where(code != OK, code,
                       jnp.where(~jnp.isfinite(loss), LOSS_NONFINITE, jnp.where(loss > loss_limit, LOSS_TOO_LARGE, OK)))
    return state, dict(metrics, **{FLAG: code.astype(jnp.int32)})

  return wrapped


def likely_causes(config) -> str:
  c, s = config.client, config.server
  return (f"learning rates too large (client.learning_rate={c.learning_rate}, server.learning_rate="
          f"{s.learning_rate}, server.optimizer={s.optimizer!r}), unnormalised or extreme inputs, or an "
          f"attack/noise setting that blows updates up")


class Guard:
  """Collects each round's finite flag; ``check()`` acts on the first non-finite round."""

  def __init__(self, name: str, config, log: Callable[[str], None], local: Callable = lambda x: x):
    self.name, self.config, self.log, self.local = name, config, log, local
    self.mode = config.get("on_divergence", "stop")
    self.pending: list[tuple[int, Any]] = []
    self.diverged_at: int | None = None

  def observe(self, round_idx: int, metrics: dict) -> dict:
    """Takes the flag out of ``metrics`` (returned without it) and notes ``all_rejected``."""
    metrics = dict(metrics)
    flag = metrics.pop(FLAG, None)
    if flag is not None or "all_rejected" in metrics:
      self.pending.append((round_idx, flag, metrics.get("all_rejected")))
    return metrics

  def check(self) -> bool:
    """Returns True while the run is finite; raises (``stop``) or warns once (``warn``) otherwise.

    Also warns about every round since the last check in which all clients were rejected."""
    if not self.pending:
      return self.diverged_at is None
    got = jax.device_get([(self.local(f), self.local(a)) for _, f, a in self.pending])
    rounds = [r for r, _, _ in self.pending]
    self.pending = []
    empty = [r for r, (_, a) in zip(rounds, got) if a is not None and bool(np.any(a))]
    if empty:
      self.log(f"WARNING: [{self.name}] every client of the cohort was rejected (non-finite update or a "
               f"defence) or had no data in round(s) {empty}: no update was aggregated (metric all_rejected)")
    bad = [(r, int(f)) for r, (f, _) in zip(rounds, got) if f is not None and int(f) != OK]
    if bad and self.diverged_at is None:
      self.diverged_at, code = bad[0]
      reason = REASONS[code].format(limit=self.config.get("divergence_loss_limit", float("inf")))
      msg = (f"[{self.name}] training diverged at round {self.diverged_at}: {reason}. Likely causes: "
             f"{likely_causes(self.config)}. Metrics of earlier rounds are kept.")
      if self.mode == "stop":
        raise DivergenceError(msg + " (set --config.on_divergence=warn to continue anyway)")
      self.log("WARNING: " + msg + " Continuing (config.on_divergence='warn').")
    return self.diverged_at is None
