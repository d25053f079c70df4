"""Local training of one client, and the compiled map of it over a cohort.

``local_train`` is a ``lax.scan`` over local steps with an optax optimiser. Padded steps (clients
with fewer examples than the cohort's largest) leave parameters *and* optimiser state unchanged:
they are selected away with ``jnp.where``, since zeroed gradients would still move momentum.

Hooks, all pure functions:
  * ``grad_fn(params, anchor, x, y, mask, rng) -> (grads, loss)``: the per-step gradient. The
    default averages per-example losses over the valid examples; DP-SGD swaps in per-example
    clipping and noise; a ``regularizer(params, anchor)`` (FedProx, Ditto) is added to the loss.
  * ``projection(params, anchor, ctx) -> params`` after every step (PGD attacker: stay within a
    ball around the round's starting model).
  * ``data_transform(x, y, mask, rng, ctx) -> (x, y)`` on each gathered batch (data poisoning).
``ctx`` is the client's slice of the cohort context (e.g. ``{"malicious": bool}``).

``map_clients`` runs a per-client function over the cohort with a configurable width: 1 is a
``lax.map`` (scan), C a full ``vmap``, in between ``lax.map(batch_size=width)``; optionally inside
``jax.shard_map`` over a ``'clients'`` mesh axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_health.traced import as_number, is_traced

Params = Any
PyTree = Any
GradFn = Callable[..., tuple[Params, jax.Array]]
CLIENTS_AXIS = "clients"


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask.astype(values.dtype)
  return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def tree_where(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def tree_all_finite(t: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)]))


def tree_sq_norm(t: PyTree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t))


def prox_regularizer(mu: float) -> Callable[[Params, Params], jax.Array]:
  """FedProx's proximal term (Li et al. 2020): ``mu / 2 * ||w - w_global||^2``."""
  if mu < 0:
    raise ValueError(f"prox mu must be >= 0, got {mu}")
  return lambda params, anchor: 0.5 * mu * tree_sq_norm(tree_sub(params, anchor))


def make_grad_fn(example_losses: Callable, regularizer: Callable | None = None) -> GradFn:
  """Returns the default ``grad_fn``: gradient of the masked mean loss (+ regulariser)."""

  def loss(params, anchor, x, y, mask):
    value = masked_mean(example_losses(params, x, y), mask)
    if regularizer is not None:
      value = value + regularizer(params, anchor)
    return value

  vg = jax.value_and_grad(loss)

  def grad_fn(params, anchor, x, y, mask, rng):
    del rng
    value, grads = vg(params, anchor, x, y, mask)
    return grads, value

  return grad_fn


class SGD(optax.GradientTransformation):
  """``optax.sgd`` that remembers its hyperparameters, so the round can take the exact low-rank path.

  It is an ordinary optax transformation (same init/update); ``learning_rate`` and ``momentum``
  are read by ``algorithms.fedavg`` to pick ``lowrank`` when the model is a dense chain.
  """

  learning_rate: float
  momentum: float


def sgd(learning_rate: float, momentum: float = 0.0) -> SGD:
  """Returns local SGD (heavy-ball ``momentum``, 0 = plain), tagged with its hyperparameters."""
  if not is_traced(learning_rate) and learning_rate <= 0:  # traced: a sweep's member, checked on the host
    raise ValueError(f"client learning_rate must be > 0, got {learning_rate}")
  if not 0 <= momentum < 1:
    raise ValueError(f"client momentum must be in [0, 1), got {momentum}")
  t = SGD(*optax.sgd(learning_rate, momentum=momentum or None))
  t.learning_rate, t.momentum = as_number(learning_rate), float(momentum)
  return t


@dataclasses.dataclass(frozen=True)
class ClientTrainer:
  """What a client does locally: gradient, optimiser, and optional per-step hooks."""

  grad_fn: GradFn
  optimizer: optax.GradientTransformation
  projection: Callable | None = None
  data_transform: Callable | None = None
  # Unrolling the local-step scan: XLA's CPU backend runs convolutions inside a while loop an
  # order of magnitude slower (measured 0.45 s vs 0.034 s per CNN step), so CNNs on CPU want True.
  unroll: int | bool = 1


def _train_step(trainer: ClientTrainer, anchor: Params, ctx: PyTree, p: Params, s, x, y, m, key):
  """One local step (data transform, gradient, optimiser, projection); a step with no example is a
  no-op. Returns (params, opt_state, loss, active): the body shared by ``local_train``'s scan and
  ``local_train_dynamic``'s loop."""
  k_data, k_grad = jax.random.split(key)
  if trainer.data_transform is not None:
    x, y = trainer.data_transform(x, y, m, k_data, ctx)
  grads, loss = trainer.grad_fn(p, anchor, x, y, m, k_grad)
  upd, s_new = trainer.optimizer.update(grads, s, p)
  p_new = optax.apply_updates(p, upd)
  if trainer.projection is not None:
    p_new = trainer.projection(p_new, anchor, ctx)
  active = jnp.any(m)
  return tree_where(active, p_new, p), tree_where(active, s_new, s), loss, active


def local_train(trainer: ClientTrainer, params: Params, xs: jax.Array, ys: jax.Array, mask: jax.Array,
                rng: jax.Array, ctx: PyTree = None, num_keys: int | None = None) -> tuple[Params, dict]:
  """Returns (update = new params - params, aux) after scanning over ``xs.shape[0]`` steps.

  Args:
    xs, ys, mask: ``[steps, batch, ...]`` inputs, labels and valid-example mask.
    ctx: this client's context (passed to hooks).
    num_keys: steps of the client's full (padded) plan when ``xs`` holds only its first steps (step
      buckets): step t's key is ``split(rng, num_keys)[t]`` either way, so truncating a client's
      masked tail changes nothing (DP-SGD's noise included).
  aux: ``loss`` (mean over active steps), ``num_steps`` and ``num_examples`` used.
  """
  anchor = params
  opt_state = trainer.optimizer.init(params)

  def step(carry, inp):
    p, s, loss, active = _train_step(trainer, anchor, ctx, *carry, *inp)
    return (p, s), (loss, active)

  keys = jax.random.split(rng, num_keys or xs.shape[0])[:xs.shape[0]]
  (p, _), (losses, active) = jax.lax.scan(step, (params, opt_state), (xs, ys, mask, keys), unroll=trainer.unroll)
  aux = {
      "loss": masked_mean(losses, active),
      "num_steps": jnp.sum(active).astype(jnp.int32),
      "num_examples": jnp.sum(mask).astype(jnp.float32),
  }
  return tree_sub(p, params), aux


def local_train_dynamic(trainer: ClientTrainer, params: Params, get_step: Callable, length: jax.Array,
                        num_steps: int, rng: jax.Array, ctx: PyTree = None) -> tuple[Params, dict]:
  """``local_train`` for exactly ``length`` (a traced scalar) steps: a ``fori_loop`` with a dynamic trip count.

  ``get_step(t) -> (x, y, mask)`` returns step t's ``[batch, ...]`` arrays (gathered inside the loop,
  so a client with 2 steps reads and trains 2 steps whatever ``num_steps``, the plan's padded length).
  Step t uses ``split(rng, num_steps)[t]`` and the same step as ``local_train`` (``_train_step``);
  the steps past ``length`` are masked in the plan, so the result equals ``local_train`` on the padded
  arrays.
  """
  anchor = params
  opt_state = trainer.optimizer.init(params)
  keys = jax.random.split(rng, num_steps)

  def step(t, carry):
    p, s, losses, actives, n = carry
    x, y, m = get_step(t)
    p, s, loss, active = _train_step(trainer, anchor, ctx, p, s, x, y, m, keys[t])
    return p, s, losses.at[t].set(loss), actives.at[t].set(active), n + jnp.sum(m).astype(jnp.float32)

  # zeros_like(length) keeps its varying-ness under shard_map (the loop carry must not change type).
  zeros = jnp.zeros_like(length, shape=(num_steps,), dtype=jnp.float32)
  carry = (params, opt_state, zeros, jnp.zeros_like(zeros, dtype=jnp.bool_), jnp.zeros_like(zeros, shape=()))
  p, _, losses, active, n = jax.lax.fori_loop(0, jnp.minimum(length, num_steps), step, carry)
  aux = {
      "loss": masked_mean(losses, active),
      "num_steps": jnp.sum(active).astype(jnp.int32),
      "num_examples": n,
  }
  return tree_sub(p, params), aux


def gather_client_batches(arrays: dict, offset: jax.Array, pos: jax.Array) -> dict:
  """Gathers one client's ``[steps, batch, ...]`` examples from the flat arrays with one take each.

  ``mode="clip"``: jnp.take's default ("fill") selects every gathered element against a NaN fill for
  out-of-bounds rows, a second pass over the batch (W1 round on the low-rank path: 269 -> 234 ms,
  1.54x -> 1.34x the centralised limit). The only out-of-bounds rows are masked slots of an empty
  last client (its offset is the arrays' length); clamped, they read a real row that the mask drops,
  where the NaN fill made the low-rank path reject the client as non-finite.
  """
  idx = offset + pos
  return {k: jnp.take(v, idx, axis=0, mode="clip") for k, v in arrays.items()}


def map_clients(fn: Callable, xs: PyTree, width: int = 1) -> PyTree:
  """Returns ``fn`` mapped over the leading axis of ``xs``: width 1 = scan, >= C = vmap."""
  cohort = jax.tree.leaves(xs)[0].shape[0]
  if width < 1:
    raise ValueError(f"clients_per_step (map width) must be >= 1, got {width}")
  if width >= cohort:
    return jax.vmap(fn)(xs)
  if width == 1:
    return jax.lax.map(fn, xs)
  return jax.lax.map(fn, xs, batch_size=width)


def make_client_mesh(num_devices: int | None = None) -> Mesh:
  """Returns a 1-D mesh over the first ``num_devices`` local devices on the ``'clients'`` axis."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}] (devices present), got {n}")
  return Mesh(np.array(devices[:n]), (CLIENTS_AXIS,))


def map_clients_sharded(fn: Callable, shared: PyTree, xs: PyTree, width: int, mesh: Mesh) -> PyTree:
  """Maps ``fn(shared, x)`` over clients split across ``mesh``'s ``'clients'`` axis.

  ``shared`` (global params, the flat dataset) is replicated. It is cast to *varying* across the
  axis before use: otherwise ``jax.grad`` with respect to replicated params inside ``shard_map``
  inserts a psum and every client would see the sum of all devices' gradients.
  """
  n_dev = mesh.shape[CLIENTS_AXIS]
  cohort = jax.tree.leaves(xs)[0].shape[0]
  if cohort % n_dev:
    raise ValueError(f"cohort_size ({cohort}) must be a multiple of the number of devices ({n_dev})")

  def body(shared_local, xs_local):
    shared_local = jax.tree.map(lambda a: jax.lax.pcast(a, (CLIENTS_AXIS,), to="varying"), shared_local)
    return map_clients(lambda x: fn(shared_local, x), xs_local, width)

  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(CLIENTS_AXIS)), out_specs=P(CLIENTS_AXIS))(shared, xs)


def masked_chunk_sum(contrib: PyTree, valid: jax.Array) -> PyTree:
  """Returns the sum over axis 0 of the valid clients' entries of every leaf."""
  return jax.tree.map(lambda c: jnp.sum(jnp.where(valid.reshape((-1,) + (1,) * (c.ndim - 1)), c, 0), axis=0),
                      contrib)


def map_sum_clients(fn: Callable, xs: PyTree, width: int = 1, axis_name: str | None = None,
                    unroll: int | bool = 1, chunk_sum: Callable | None = None) -> tuple[PyTree, PyTree]:
  """Returns (sum over clients of ``fn(x)[0]``, stacked ``fn(x)[1]``) without stacking the sums.

  For linear aggregation (FedAvg's weighted mean) this never materialises the ``[cohort, params]``
  stack: a ``lax.scan`` over chunks of ``width`` clients (each chunk a ``vmap``) carries the running
  sum, so memory is bounded by the chunk, not the cohort. The cohort is padded to a multiple of
  ``width`` with copies of client 0 whose contributions are selected away. Inside ``shard_map``
  pass ``axis_name`` so the running sum starts as a per-device (varying) value. ``unroll`` unrolls
  the scan over chunks (small cohorts of conv nets on CPU, where loops slow convolutions down).
  ``chunk_sum(contribs [width, ...], valid [width]) -> tree`` reduces one chunk (default: the sum of
  the valid clients' contributions); the low-rank path uses it to sum factored deltas as one GEMM.
  """
  chunk_sum = chunk_sum or masked_chunk_sum
  if width < 1:
    raise ValueError(f"clients_per_step (map width) must be >= 1, got {width}")
  cohort = jax.tree.leaves(xs)[0].shape[0]
  width = min(width, cohort)
  n_chunks = -(-cohort // width)
  pad = n_chunks * width - cohort
  valid = jnp.arange(n_chunks * width) < cohort
  if pad:
    xs = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]), xs)
  chunked = jax.tree.map(lambda a: a.reshape((n_chunks, width) + a.shape[1:]), xs)
  contrib_shape, _ = jax.eval_shape(jax.vmap(fn), jax.tree.map(lambda a: a[:width], xs))
  acc_shape = jax.eval_shape(chunk_sum, contrib_shape, jax.ShapeDtypeStruct((width,), jnp.bool_))
  acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), acc_shape)
  if axis_name is not None:
    acc0 = jax.tree.map(lambda a: jax.lax.pcast(a, (axis_name,), to="varying"), acc0)

  def body(acc, inp):
    x, v = inp
    contrib, small = jax.vmap(fn)(x)
    return jax.tree.map(jnp.add, acc, chunk_sum(contrib, v)), small

  if n_chunks == 1:
    acc, small = body(acc0, (jax.tree.map(lambda a: a[0], chunked), valid))
    small = jax.tree.map(lambda a: a[None], small)
  else:
    acc, small = jax.lax.scan(body, acc0, (chunked, valid.reshape(n_chunks, width)), unroll=unroll)
  small = jax.tree.map(lambda a: a.reshape((n_chunks * width,) + a.shape[2:])[:cohort], small)
  return acc, small


def map_sum_clients_sharded(fn: Callable, shared: PyTree, xs: PyTree, width: int, mesh: Mesh,
                            unroll: int | bool = 1, chunk_sum: Callable | None = None):
  """``map_sum_clients`` with the cohort split over ``mesh``'s ``'clients'`` axis (sums psum'd)."""
  n_dev = mesh.shape[CLIENTS_AXIS]
  cohort = jax.tree.leaves(xs)[0].shape[0]
  if cohort % n_dev:
    raise ValueError(f"cohort_size ({cohort}) must be a multiple of the number of devices ({n_dev})")

  def body(shared_local, xs_local):
    shared_local = jax.tree.map(lambda a: jax.lax.pcast(a, (CLIENTS_AXIS,), to="varying"), shared_local)
    acc, small = map_sum_clients(lambda x: fn(shared_local, x), xs_local, width, CLIENTS_AXIS, unroll,
                                 chunk_sum)
    return jax.lax.psum(acc, CLIENTS_AXIS), small

  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(CLIENTS_AXIS)),
                       out_specs=(P(), P(CLIENTS_AXIS)))(shared, xs)
