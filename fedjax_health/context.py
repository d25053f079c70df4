"""The context convention: what ``ctx`` holds for aggregators, update transforms and client hooks.

There are two levels, and every transform of the library reads the same keys:

**Server level** (``Aggregator.apply`` and ``UpdateTransform.apply``: robust rules, attacks on the
stack, detectors, clustered and DP aggregators) receive ``ctx``, a dict with

==============  ============================  ==================================================
key             value                         read by
==============  ============================  ==================================================
``params``      the round's global params     ``loss_rejection`` (LRR/ERR), ``multicenter_kmeans``
                (clustered: leaves ``[K,..]``)
``round``       int scalar                    (logged; schedules)
``cohort``      int ``[cohort]`` client ids   ``track_rejections``, ``dp.fixed_weight_mean``,
                                              inversion's update capture
``client_ctx``  dict of per-client arrays     see below
                ``[cohort]``
==============  ============================  ==================================================

``ctx["client_ctx"]`` holds one array per per-client fact, ``[cohort]`` each:
``malicious`` (bool: every attack on the stack, model replacement), ``cluster`` (int: the cluster
model each client trained; ``per_cluster_mean``, ``multicenter_kmeans``), ``participating`` and
``dropped`` (bool: DP sampling, secure aggregation dropouts), ``client_id``.

**Client level** (the hooks of local training: ``projection(params, anchor, ctx)`` such as
``pgd_projection``, ``data_transform(x, y, mask, rng, ctx)`` such as the data poisoning
attacks) receive *one client's row* of ``client_ctx``: ``{"malicious": bool scalar, ...}``.
The cohort map slices it for them; in your own loop, pass ``{"malicious": True}``.

Build a server context with ``server_ctx(...)``; a transform that needs a key it does not find
raises ``MissingContextKey`` naming the key, the level and the transform.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

SERVER_KEYS = ("params", "round", "cohort", "client_ctx")
CLIENT_KEYS = ("malicious", "cluster", "participating", "dropped", "client_id")


class MissingContextKey(ValueError):
  """A transform needed a ``ctx`` key that the caller did not provide."""


def server_ctx(params: Any = None, cohort=None, round: int = 0, **client_ctx) -> dict:  # pylint: disable=redefined-builtin
  """Returns a server-level ``ctx``; keyword arguments (``malicious=``, ``cluster=``, ...) go to
  ``ctx["client_ctx"]`` as arrays ``[cohort]``. ``None`` values are left out."""
  ctx = {"round": jnp.asarray(round), "client_ctx": {k: jnp.asarray(v) for k, v in client_ctx.items()
                                                     if v is not None}}
  if params is not None:
    ctx["params"] = params
  if cohort is not None:
    ctx["cohort"] = jnp.asarray(cohort)
  return ctx


def require(ctx, key: str, who: str) -> Any:
  """Returns ``ctx[key]`` of a server-level context; MissingContextKey naming ``key`` and ``who``."""
  if not isinstance(ctx, dict) or key not in ctx:
    have = sorted(ctx) if isinstance(ctx, dict) else type(ctx).__name__
    raise MissingContextKey(f"{who} needs ctx[{key!r}] (server-level context; see fedjax_health.context), "
                            f"got keys {have}; build one with fedjax_health.context.server_ctx({key}=...)")
  return ctx[key]


def client_array(ctx, key: str, who: str) -> Any:
  """Returns ``ctx["client_ctx"][key]`` (an array ``[cohort]``); MissingContextKey naming it."""
  inner = ctx.get("client_ctx") if isinstance(ctx, dict) else None
  if not isinstance(inner, dict) or key not in inner:
    hint = (f"; ctx has {key!r} at the top level, which is the client-level form: server-level "
            f"transforms read ctx['client_ctx'][{key!r}]") if isinstance(ctx, dict) and key in ctx else ""
    have = sorted(inner) if isinstance(inner, dict) else "no 'client_ctx'"
    raise MissingContextKey(f"{who} needs ctx['client_ctx'][{key!r}] (an array [cohort]; server-level context, "
                            f"see fedjax_health.context), got {have}{hint}; build one with "
                            f"fedjax_health.context.server_ctx({key}=...)")
  return inner[key]


def client_value(ctx, key: str, who: str) -> Any:
  """Returns ``ctx[key]`` of a client-level context (one client's row); MissingContextKey naming it."""
  if isinstance(ctx, dict) and key in ctx:
    return ctx[key]
  hint = (f"; ctx has 'client_ctx', which is the server-level form: client hooks get one client's row, "
          f"e.g. {{{key!r}: True}}") if isinstance(ctx, dict) and "client_ctx" in ctx else ""
  have = sorted(ctx) if isinstance(ctx, dict) else type(ctx).__name__
  raise MissingContextKey(f"{who} needs ctx[{key!r}] (client-level context: this client's row of client_ctx; "
                          f"see fedjax_health.context), got {have}{hint}")


def require_rng(rng, who: str) -> None:
  """Raises ValueError when a randomised transform is called without a PRNG key."""
  if rng is None:
    raise ValueError(f"{who} draws random numbers and needs a PRNG key (rng=jax.random.key(...)), got None")
