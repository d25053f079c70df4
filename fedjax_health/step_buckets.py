"""The cohort map by step buckets: a round costs the cohort's real local steps, not its longest client's.

A round's batch plan is ``[cohort, steps, batch]`` with ``steps`` set by the largest client; with
heavy-tailed client sizes (phones, wearables) most clients need a handful of steps and a few need
hundreds. Padding every client to the longest made a lognormal population of 1,000 clients run
40-66x the centralised limit and 4-10x slower than a plain Python loop over clients.

Here the cohort is bucketed by each client's *length* (index of its last active step + 1) into
static lengths ``1, 2, 4, ..., num_steps`` (``bucket_lengths``). Each bucket is one compiled body
(static shapes: ``[width, length, batch]``) run by a ``lax.fori_loop`` whose trip count is the
bucket's *dynamic* number of chunks, so a client with 2 steps costs 2 steps (at most 2x its real
steps inside its bucket) whatever the largest client holds. Clients are visited bucket by bucket
(a stable sort on the bucket index, so the order is deterministic); outputs are scattered back to
cohort order. Per-client step sequences are untouched: a client's steps past its length are all
masked (no-ops), so truncating them changes nothing but float summation order.

Each bucket can carry its own per-client function and chunk width (``Bucket``): the FedAvg round
trains short clients on the exact low-rank path (wide chunks of shared-weight GEMMs) and long ones
on the dense path, each where it is cheaper. A bucket's chunks are ``width`` clients (a ``vmap``);
its last partial chunk runs at ``tail_width`` so a bucket of 3 long clients does not pay for 50.

A bucket can also keep only the first ``batch`` slots of each step (``Bucket.batch``): one-step
clients holding fewer examples than the batch (most of a heavy-tailed cohort's clients) would
otherwise pay for the whole batch's masked slots. A client goes to such a bucket only when every
active slot of its mask lies within those slots (``client_widths``), so nothing it trains on is cut.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def bucket_lengths(num_steps: int, mode: str = "pow2") -> tuple[int, ...]:
  """Returns the static bucket lengths: powers of two below ``num_steps``, then ``num_steps``.

  ``mode="none"`` gives the padded plan (one bucket of ``num_steps``).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if mode == "none":
    return (num_steps,)
  if mode not in ("pow2", "pow2_static"):
    raise ValueError(f"step_buckets must be one of pow2, pow2_static, none; got {mode!r}")
  lengths, p = [], 1
  while p < num_steps:
    lengths.append(p)
    p *= 2
  return tuple(lengths) + (num_steps,)


def client_widths(mask: jax.Array) -> jax.Array:
  """Returns ``[C]`` int32: each client's last active batch slot + 1 over all its steps (0 if none)."""
  active = jnp.any(mask.reshape(mask.shape[:3] + (-1,)), axis=(1, 3))  # [C, batch]
  slots = jnp.arange(1, mask.shape[2] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(active, slots[None, :], 0), axis=1)


def client_lengths(mask: jax.Array) -> jax.Array:
  """Returns ``[C]`` int32: each client's last active step + 1 (0 for a client with no active step)."""
  active = jnp.any(mask.reshape(mask.shape[:2] + (-1,)), axis=-1)  # [C, S]
  steps = jnp.arange(1, mask.shape[1] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(active, steps[None, :], 0), axis=1)


@dataclasses.dataclass(frozen=True)
class Bucket:
  """One static length: ``fn(x) -> (contrib, small)`` for one client whose length is <= ``length``.

  ``fn`` sees the client's whole per-client pytree (slice the step axis to ``length`` inside).
  ``chunk_sum(contribs [w, ...], valid [w]) -> tree`` reduces a chunk of ``width`` clients (default:
  the sum of the valid clients' contributions). ``tail_width`` (default ``width``) is the chunk width
  of the bucket's leftover clients.

  ``dynamic=True``: one client at a time (``width`` must be 1), called as ``fn(x, length)`` with the
  client's own length (a traced scalar); ``fn`` runs exactly that many steps (``lax.fori_loop`` with a
  dynamic trip count), so its clients pay no padding up to the bucket's static length.

  ``batch``: the bucket takes only clients whose active slots all lie in the first ``batch`` slots of
  every step (``client_widths``); ``fn`` slices the batch axis to it. None: any client of its length.

  ``scatter(extra, contribs [w, ...], valid [w]) -> extra``: with ``bucketed_map_sum(..., extra=...)``,
  what the chunk adds into the map's extra accumulator (e.g. rows of a per-example buffer, which a
  tree sum cannot express), besides ``chunk_sum``'s tree.

  ``chunk_length=True``: ``fn`` is called as ``fn(x, n)`` with ``n`` the longest valid client of its
  chunk (a traced scalar, the same for every lane), and the bucket's clients are ordered by length
  (longest first), so each chunk holds clients of similar length and can stop after ``n`` steps
  instead of the bucket's static length (a vmapped chunk otherwise runs every lane to ``length``).
  """

  length: int
  fn: Callable
  width: int = 1
  chunk_sum: Callable | None = None
  tail_width: int | None = None
  dynamic: bool = False
  batch: int | None = None
  scatter: Callable | None = None
  chunk_length: bool = False


def _masked_sum(contrib: PyTree, valid: jax.Array) -> PyTree:
  return jax.tree.map(lambda c: jnp.sum(jnp.where(valid.reshape((-1,) + (1,) * (c.ndim - 1)), c, 0), axis=0),
                      contrib)


def assign_index(bidx: jax.Array, num_buckets: int, within: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (order [C] clients sorted by bucket, stable; starts [K]; counts [K]) from bucket indices.

  ``within``: optional ``[C]`` non-negative ints ordering the clients inside each bucket (ascending,
  ties in cohort order).
  """
  key = bidx if within is None else bidx * (jnp.max(within) + 1) + within
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  counts = jnp.zeros((num_buckets,), jnp.int32).at[bidx].add(1)
  starts = jnp.cumsum(counts) - counts
  return order, starts, counts


def bucket_index(buckets: tuple[Bucket, ...], lengths: jax.Array, widths: jax.Array | None) -> jax.Array:
  """Returns ``[C]`` int32: each client's bucket, the first at least as long as the client (an empty
  client: the first bucket) whose kept slots (``Bucket.batch``) hold every active slot of the client.

  Buckets must be in increasing (length, batch) order, a full batch counting as the widest.
  """
  lens = tuple(b.length for b in buckets)
  narrow = [b.batch for b in buckets if b.batch is not None]
  if not narrow:
    if list(lens) != sorted(set(lens)):
      raise ValueError(f"bucket lengths must be strictly increasing, got {lens}")
    return jnp.searchsorted(jnp.asarray(lens, jnp.int32), lengths, side="left").astype(jnp.int32)
  if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in narrow):
    raise ValueError(f"Bucket.batch must be a positive int or None, got {narrow}")
  if buckets[-1].batch is not None:
    raise ValueError("the last bucket must keep the whole batch (Bucket.batch=None): it takes any client")
  order = [(b.length, float("inf") if b.batch is None else b.batch) for b in buckets]
  if order != sorted(set(order)):
    raise ValueError("buckets must be in increasing (length, batch) order, each length's full batch last; got "
                     f"{[(b.length, b.batch) for b in buckets]}")
  if widths is None:
    raise ValueError("buckets keeping part of the batch (Bucket.batch) need the clients' widths (client_widths)")
  cap = jnp.asarray([jnp.iinfo(jnp.int32).max if b.batch is None else b.batch for b in buckets], jnp.int32)
  fits = (jnp.asarray(lens, jnp.int32)[None, :] >= lengths[:, None]) & (cap[None, :] >= widths[:, None])
  # A client longer than every bucket gets index K and runs nowhere, as with the lengths' searchsorted.
  return jnp.where(jnp.any(fits, axis=1), jnp.argmax(fits, axis=1), len(buckets)).astype(jnp.int32)


def bucketed_map_sum(buckets: tuple[Bucket, ...], xs: PyTree, lengths: jax.Array,
                     axis_name: str | None = None, widths: jax.Array | None = None,
                     extra: PyTree = None, part: tuple[int, int] | None = None) -> tuple[PyTree, PyTree]:
  """Returns (sum over clients of contributions, stacked ``small`` outputs in cohort order).

  Args:
    buckets: increasing static lengths (a length may repeat with increasing ``batch``, its full-batch
      bucket last); the last must be >= every client's length and keep the whole batch.
    xs: per-client pytree ``[C, ...]``; ``lengths``: ``[C]`` from ``client_lengths``.
    axis_name: inside ``shard_map``, the axis along which the running values are per-device.
    widths: ``[C]`` from ``client_widths``; needed only when a bucket keeps part of the batch.
    extra: an initial extra accumulator that buckets with ``Bucket.scatter`` add into; the sum is then
      ``(tree sum, extra)``.
    part: ``(i, n)``: run only part ``i`` of ``n`` (``split_parts``): each bucket's clients dealt in turn,
      longest first in ``chunk_length`` and dynamic buckets, so the ``n`` parts hold alike work. The
      other clients' ``small`` rows stay zero; the parts' sums and ``small`` outputs add up to the whole
      (``combine_parts``), up to the order of float additions.
  Every bucket's contributions must reduce to the same tree (they are added together).
  """
  if extra is None and any(b.scatter is not None for b in buckets):
    raise ValueError("a bucket with Bucket.scatter needs bucketed_map_sum(..., extra=initial accumulator)")
  cohort = lengths.shape[0]
  bidx = bucket_index(buckets, lengths, widths)
  within = None
  by_length = [b.chunk_length or (part is not None and b.dynamic) for b in buckets]
  if any(by_length):
    # Longest first inside chunk_length buckets (bidx == K, longer than every bucket: runs nowhere).
    within = jnp.where(jnp.asarray(by_length + [False])[bidx], jnp.max(lengths) - lengths, 0)
  order, starts, counts = assign_index(bidx, len(buckets), within)
  if part is not None:
    bidx = split_parts(bidx, order, starts, len(buckets), part)
    order, starts, counts = assign_index(bidx, len(buckets), within)
  max_w = max(max(b.width, b.tail_width or 1) for b in buckets)
  order = jnp.concatenate([order, jnp.zeros((max_w,), jnp.int32)])  # padded lanes read client 0

  def varying(t):
    if axis_name is None:
      return t
    return jax.tree.map(lambda a: jax.lax.pcast(a, (axis_name,), to="varying"), t)

  for b in buckets:
    if b.dynamic and (b.width != 1 or (b.tail_width or 1) != 1):
      raise ValueError(f"a dynamic step bucket runs one client at a time; got width {b.width}")
  one = jax.tree.map(lambda a: a[:1], xs)
  acc = small_buf = None
  for b in buckets:
    if b.dynamic and b.chunk_length:
      raise ValueError("a step bucket is either dynamic or chunk_length, not both")
    fn = (lambda x, f=b.fn: f(x, lengths[:1].reshape(()))) if b.dynamic or b.chunk_length else b.fn
    c_shape, s_shape = jax.eval_shape(jax.vmap(fn), one)
    chunk_sum = b.chunk_sum or _masked_sum
    a_shape = jax.eval_shape(chunk_sum, c_shape, jax.ShapeDtypeStruct((1,), jnp.bool_))
    if acc is None:
      acc = varying(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), a_shape))
      small_buf = varying(jax.tree.map(lambda s: jnp.zeros((cohort,) + s.shape[1:], s.dtype), s_shape))
  if extra is not None:
    acc = (acc, varying(extra))

  def add(b: Bucket, acc, contrib, valid):
    """``acc`` plus a chunk's contributions (and its scatter into the extra accumulator)."""
    chunk_sum = b.chunk_sum or _masked_sum
    if extra is None:
      return jax.tree.map(jnp.add, acc, chunk_sum(contrib, valid))
    tree, ext = acc
    return (jax.tree.map(jnp.add, tree, chunk_sum(contrib, valid)),
            ext if b.scatter is None else b.scatter(ext, contrib, valid))

  def run_chunks(b: Bucket, width: int, first, stop, n_chunks, carry):
    def body(i, carry):
      acc, small_buf = carry
      slot = first + i * width + jnp.arange(width, dtype=jnp.int32)
      valid = slot < stop
      idx = order[slot]
      x = jax.tree.map(lambda a: jnp.take(a, idx, axis=0, mode="clip"), xs)
      if b.chunk_length:
        n = jnp.max(jnp.where(valid, jnp.take(lengths, idx, mode="clip"), 0))
        contrib, small = jax.vmap(b.fn, in_axes=(0, None))(x, n)
      else:
        contrib, small = jax.vmap(b.fn)(x)
      acc = add(b, acc, contrib, valid)
      dest = jnp.where(valid, idx, cohort)  # padded lanes scatter nowhere
      small_buf = jax.tree.map(lambda buf, s: buf.at[dest].set(s, mode="drop"), small_buf, small)
      return acc, small_buf

    return jax.lax.fori_loop(0, n_chunks, body, carry)

  def run_dynamic(b: Bucket, first, count, carry):
    valid = jnp.ones((1,), jnp.bool_)

    def body(i, carry):
      acc, small_buf = carry
      idx = order[first + i]
      x = jax.tree.map(lambda a: a[idx], xs)
      contrib, small = b.fn(x, lengths[idx])
      if b.chunk_sum is None and b.scatter is None:  # a real client: add its contribution as it is
        if extra is None:
          acc = jax.tree.map(jnp.add, acc, contrib)
        else:
          acc = (jax.tree.map(jnp.add, acc[0], contrib), acc[1])
      else:
        acc = add(b, acc, jax.tree.map(lambda a: a[None], contrib), valid)
      small_buf = jax.tree.map(lambda buf, s: buf.at[idx].set(s), small_buf, small)
      return acc, small_buf

    return jax.lax.fori_loop(0, count, body, carry)

  for k, b in enumerate(buckets):
    stop = starts[k] + counts[k]
    if b.dynamic:
      acc, small_buf = run_dynamic(b, starts[k], counts[k], (acc, small_buf))
      continue
    tail_w = min(b.tail_width or b.width, b.width)
    if tail_w < b.width:  # full chunks of `width`, then the leftover clients in chunks of `tail_width`
      n_full = counts[k] // b.width
      acc, small_buf = run_chunks(b, b.width, starts[k], stop, n_full, (acc, small_buf))
      first = starts[k] + n_full * b.width
      acc, small_buf = run_chunks(b, tail_w, first, stop, -(-(stop - first) // tail_w), (acc, small_buf))
    else:
      acc, small_buf = run_chunks(b, b.width, starts[k], stop, -(-counts[k] // b.width), (acc, small_buf))
  return acc, small_buf


def split_parts(bidx: jax.Array, order: jax.Array, starts: jax.Array, num_buckets: int,
                part: tuple[int, int]) -> jax.Array:
  """Returns ``bidx`` with the clients outside part ``i`` of ``n`` moved to ``num_buckets`` (run nowhere).

  ``order``/``starts`` from ``assign_index(bidx, ...)``: a client's rank inside its bucket is its
  position in ``order`` minus its bucket's start; ranks are dealt back and forth (0, 1, .., n-1, n-1,
  .., 0, 0, 1, ..), so with clients longest first no part takes the longer of every turn.
  """
  i, n = part
  if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not isinstance(i, int) or not 0 <= i < n:
    raise ValueError(f"part must be (i, n) with ints 0 <= i < n, got {part!r}")
  pos = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  rank = pos - jnp.concatenate([starts, jnp.zeros((1,), starts.dtype)])[bidx]
  r = rank % (2 * n)
  owner = jnp.where(r < n, r, 2 * n - 1 - r)
  return jnp.where((owner == i) | (bidx >= num_buckets), bidx, num_buckets).astype(bidx.dtype)


def combine_parts(outputs: list) -> PyTree:
  """Adds the parts' ``bucketed_map_sum(..., part=)`` outputs (sums add; a client's ``small`` row is
  zero outside its part, so booleans are or-ed and numbers added: each row is its part's, exactly)."""
  def add(*xs):
    out = xs[0]
    for x in xs[1:]:
      out = (out | x) if out.dtype == jnp.bool_ else out + x
    return out
  return jax.tree.map(add, *outputs)


def bucketed_map(buckets: tuple[Bucket, ...], xs: PyTree, lengths: jax.Array,
                 axis_name: str | None = None, widths: jax.Array | None = None) -> PyTree:
  """Returns every bucket's ``fn(x)`` (a stacked pytree in cohort order; nothing summed)."""
  stacked = tuple(dataclasses.replace(b, fn=lambda x, *n, f=b.fn: ((), f(x, *n)), chunk_sum=lambda c, v: ())
                  for b in buckets)
  return bucketed_map_sum(stacked, xs, lengths, axis_name, widths)[1]


def map_clients_by_length(fn: Callable, xs: PyTree, mask: jax.Array, mode: str = "pow2", width: int = 1) -> PyTree:
  """Returns ``fn(x, length)`` stacked over clients in cohort order, each client in its step bucket.

  ``fn`` must slice the client's step axis to the static ``length`` (its steps past it are masked),
  so a client with 2 steps runs a 2-step (or at most its power-of-two bucket's) body, whatever the
  longest client of the round holds. ``mask`` is the plan's ``[C, steps, batch]`` mask; ``width``
  clients per chunk (``client.map_clients``). With one bucket (``mode="none"`` or one step) this is
  ``client.map_clients`` over ``fn(x, steps)``.
  """
  from fedjax_health.client import map_clients
  num_steps = mask.shape[1]
  lens = bucket_lengths(num_steps, mode)
  if len(lens) == 1:
    return map_clients(lambda x: fn(x, num_steps), xs, width)
  return bucketed_map(tuple(Bucket(n, lambda x, n=n: fn(x, n), width) for n in lens), xs, client_lengths(mask))


def bucketed_map_sum_sharded(make_buckets: Callable, shared: PyTree, xs: PyTree, lengths: jax.Array, mesh,
                             stacked: bool = False, widths: jax.Array | None = None):
  """``bucketed_map_sum`` (or ``bucketed_map`` when ``stacked``) with the cohort split over ``mesh``.

  ``make_buckets(shared) -> buckets`` builds each device's buckets around its copy of ``shared``
  (replicated, cast to varying first: see ``client.map_clients_sharded``); sums are psum'd, stacked
  outputs stay split along the ``'clients'`` axis. Each device buckets its own clients.
  """
  from jax.sharding import PartitionSpec as P
  from fedjax_health.client import CLIENTS_AXIS
  n_dev = mesh.shape[CLIENTS_AXIS]
  cohort = lengths.shape[0]
  if cohort % n_dev:
    raise ValueError(f"cohort_size ({cohort}) must be a multiple of the number of devices ({n_dev})")

  def body(shared_local, xs_local, lengths_local, widths_local=None):
    shared_local = jax.tree.map(lambda a: jax.lax.pcast(a, (CLIENTS_AXIS,), to="varying"), shared_local)
    buckets = make_buckets(shared_local)
    if stacked:
      return bucketed_map(buckets, xs_local, lengths_local, CLIENTS_AXIS, widths_local)
    acc, small = bucketed_map_sum(buckets, xs_local, lengths_local, CLIENTS_AXIS, widths_local)
    return jax.lax.psum(acc, CLIENTS_AXIS), small

  out_specs = P(CLIENTS_AXIS) if stacked else (P(), P(CLIENTS_AXIS))
  args = (shared, xs, lengths) + (() if widths is None else (widths,))
  return jax.shard_map(body, mesh=mesh, in_specs=(P(),) + (P(CLIENTS_AXIS),) * (len(args) - 1),
                       out_specs=out_specs)(*args)
