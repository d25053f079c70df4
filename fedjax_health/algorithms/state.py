"""Per-client persistent state: arrays ``[num_clients, ...]`` gathered for the cohort, scattered back.

Personalised and clustered FL keep something per client between rounds (personal heads, APFL's
local model and mixing weight, Ditto's personal model, cluster ids). Following DESIGN.md, every
leaf of that pytree has a leading ``num_clients`` axis and lives on device with the server state.
Each round ``gather`` slices the cohort's rows ``[cohort, ...]``, the cohort map trains them, and
``scatter`` writes the new rows back with one indexed update per leaf; clients outside the cohort
keep their rows untouched. Cohorts are sampled without replacement, so the scatter has no
duplicate indices and is deterministic.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def broadcast_to_clients(template: PyTree, num_clients: int) -> PyTree:
  """Returns ``template`` repeated along a new leading axis: every leaf ``[num_clients, ...]``."""
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (num_clients,) + jnp.shape(x)), template)


def num_clients_of(states: PyTree) -> int:
  """Returns the leading dimension shared by every leaf of ``states``."""
  leaves = jax.tree.leaves(states)
  if not leaves:
    raise ValueError("per-client state has no leaves")
  n = leaves[0].shape[0]
  for leaf in leaves:
    if leaf.shape[0] != n:
      raise ValueError(f"per-client state leaves disagree on num_clients: {leaf.shape[0]} vs {n}")
  return int(n)


def gather(states: PyTree, cohort: jax.Array) -> PyTree:
  """Returns the cohort's rows of every leaf, ``[cohort, ...]``."""
  return jax.tree.map(lambda s: jnp.take(s, cohort, axis=0), states)


def scatter(states: PyTree, cohort: jax.Array, values: PyTree, keep: jax.Array | None = None) -> PyTree:
  """Returns ``states`` with rows ``cohort`` replaced by ``values`` (``[cohort, ...]`` per leaf).

  ``keep [cohort]`` (optional, bool) leaves the old row of clients where it is False, e.g. clients
  whose update was rejected or who had no data this round.
  """

  def one(s, v):
    v = v.astype(s.dtype)
    if keep is not None:
      old = jnp.take(s, cohort, axis=0)
      v = jnp.where(keep.reshape(keep.shape + (1,) * (v.ndim - 1)), v, old)
    return s.at[cohort].set(v, unique_indices=True)

  return jax.tree.map(one, states, values)
