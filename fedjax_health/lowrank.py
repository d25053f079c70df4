"""Exact low-rank client deltas for SGD on dense networks: shared-weight GEMMs instead of copies.

A dense layer's gradient is ``H^T G`` (its inputs times the loss gradient at its outputs), so after
``k`` local SGD steps of batch ``b`` a client's change to that layer is ``sum_s a_s H_s^T G_s`` for
scalar coefficients ``a_s``: rank at most ``k*b``. Plain SGD, heavy-ball momentum and FedProx's
proximal pull all keep that form, because each step's update is a linear combination of the
gradients seen so far (and of the delta itself, for the proximal term):

    g_t = e_t + mu * a          (FedProx: the proximal gradient is mu times the delta)
    v   = beta * v + g_t        (momentum; beta = 0 for plain SGD)
    a   = a - lr * v

with ``a`` and ``v`` coefficient vectors over the steps. A client never materialises its weights:

  * forward at step t:  ``h (W + dW) = h W + sum_s (h H_s^T) (a_s G_s)``: one GEMM against the
    *shared* weights for the whole chunk of clients (the first layer's ``x W`` for every step at
    once), plus a correction through ``b x kb`` Gram matrices;
  * FedAvg's weighted sum ``sum_c w_c dW_c = H_all^T (w a G)_all``: one GEMM per layer per chunk.

With most of a population in the round, the first layer's ``x W`` and its weighted sum run once per
round over the dataset's rows instead of per chunk over padded batch slots
(``first_layer_products``, ``local_train(..., xw=)``, ``scatter_first_layer``, ``first_layer_delta``).

Clients too long for their factors to pay (``suitable`` is False) still train dense weights, but with
plain SGD in blocks of ``DENSIFY_STEPS`` steps (``local_train_densified``): each block's factors are
added to the weights once, instead of a pass over every weight per step.

Later layers no larger than their factors (the MLP's 200x10 head) train as per-client dense weights
inside ``local_train`` (``dense_layers``): only the first layer, whose weights dwarf a client's data,
is factored. With plain SGD a step's factor ``U = -lr dL/dz`` never changes once taken, so the loops
store it as it is, carry the bias deltas, and accumulate the delta's squared norm from each step's
correction (``_sq_norm_increment``). Rolled buckets (more than ``MAX_STEPS`` steps) order their
clients by length and run each chunk only to its longest client (``num_steps``).

The input Gram matrices ``x x^T`` depend on the data alone. ``gram_table`` computes every small
client's once (``fedavg.device_train_data(ds, gram_rows)``) and ``slot_gram`` looks a client's slots
up: the batched ``[k*b, d] x [d, k*b]`` products ran at ~25 GFLOP/s, a tenth of a skewed round.

In exact arithmetic this equals per-client training with dense weights; in float32 the two agree
to rounding (tested against the plain path). It wins when ``k*b*(d_in + d_out)`` is small next to
``d_in * d_out`` (cross-device clients with little data and wide layers, workload W1); otherwise
the plain path is used (``suitable``).

Supported: models that are chains of dense layers (``logreg``, ``mlp``) with an elementwise
activation, the default masked-mean loss, local SGD built by ``client.sgd`` (any momentum), any
``prox_mu``; FedAvg's streaming weighted mean. Anything else (custom ``grad_fn``, projections,
data transforms, stacked aggregators, Adam) needs per-client weights and takes the plain path.
Up to ``MAX_STEPS`` local steps are unrolled in Python, so step t's correction uses only the t
earlier steps and no padded buffers. Longer clients (several local epochs) run ``_local_train_rolled``:
a ``lax.scan`` over steps whose corrections read fixed ``[k, b, .]`` buffers; the coefficients of
steps not yet taken are zero, so the result is the same, for about twice the correction FLOPs and
a compile time that no longer grows with k.

Measured on W1 (1000 clients x 20 examples, MLP 784-200-10, 2-core CPU): 117-123 ms per round,
1.16-1.26x the centralised limit, against 359-367 ms for dense per-client training
(``python -m benchmarks.compare``, ``python -m benchmarks.throughput``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_health import models as models_lib

Params = Any
PRODUCT_BLOCK_ROWS = 1024  # rows per block of first_layer_products / first_layer_delta (512-2048 ran alike)
DENSIFY_STEPS = 4  # fedavg(densify_steps=None): steps per block of its long plain-SGD clients
MAX_STEPS = 4  # up to this many local steps are unrolled (compile time grows ~k^2); beyond, a rolled scan.
# Measured (1,000 lognormal clients, sigma 1, 2-core CPU): the 3-4-step bucket unrolled ran the round
# in 259 ms against 273 ms rolled, for ~1 s more compile.


@dataclasses.dataclass(frozen=True)
class DenseChain:
  """A model's dense layers in order (param collection names) and the activation between them."""

  layers: tuple[str, ...]
  activation: Callable[[jax.Array], jax.Array] | None


def dense_chain(model) -> DenseChain | None:
  """Returns the model's ``DenseChain``, or None when it is not a plain chain of dense layers."""
  m = model.module
  if isinstance(m, models_lib.LogisticRegression):
    return DenseChain(("head",), None)
  if isinstance(m, models_lib.MLP):
    return DenseChain(tuple(f"body_{i}" for i in range(len(m.hidden))) + ("head",),
                      models_lib.ACTIVATIONS[m.activation])
  return None


def factor_sizes(chain: DenseChain, params: Params, steps: int, batch: int) -> tuple[int, int]:
  """Returns (elements of a client's dense delta, elements of its low-rank delta): factors for the
  layers ``local_train`` factors, the dense weights of those it trains dense (``dense_layers``)."""
  dense = factored = 0
  tail = dense_layers(chain, params, steps, batch)
  for name, is_dense in zip(chain.layers, tail):
    d_in, d_out = params[name]["kernel"].shape
    dense += d_in * d_out + d_out
    factored += (d_in * d_out if is_dense else steps * batch * (d_in + d_out)) + d_out
  return dense, factored


def factor_fraction(chain: DenseChain, params: Params, steps: int, batch: int) -> float:
  """Returns the size of a client's factored delta over the size of its dense delta."""
  dense, factored = factor_sizes(chain, params, steps, batch)
  return factored / dense


def chunk_width(chain: DenseChain, params: Params, steps: int, batch: int, cohort: int, backend: str) -> int:
  """Returns clients per chunk: ~8 MB of factors on CPU (cache-sized), ~512 MB on accelerators.

  Measured on W1 (2-core CPU, ``benchmarks.throughput``): chunks of 50-100 clients run the round at
  1.16x the centralised limit, 250 at 1.47x, 1000 at 2.35x. The width is then evened out so
  padding stays below one client per chunk.
  """
  per_client = 4 * factor_sizes(chain, params, steps, batch)[1]
  budget = 8e6 if backend == "cpu" else 512e6
  target = max(1, min(cohort, int(budget // per_client)))
  chunks = -(-cohort // target)
  return -(-cohort // chunks)


# fedavg's "auto" takes the low-rank path for step buckets whose low-rank delta is at most this share
# of the dense delta (``factor_fraction``). MLP 784-200-10, batch 10: 1-4 steps 0.06-0.25, 8 steps
# 0.51, 16 steps 1.0, 32 steps 2.0, 64 steps 4.0. Measured on a 2-core AVX-512 CPU (1,000 clients,
# one process, 5-11 repeats, round / centralised limit, paired) once later layers trained dense and
# the rolled loop read flat buffers: 5 epochs of 50 examples (every client in the 32-step bucket)
# 2.09-2.18x in densified blocks against 1.04x low-rank; lognormal sigma 1.5 2.54x / 2.45x (bound
# 0.75 / 2.5), power law 1.5 2.44x / 2.39x, sigma 1 1.93x / 1.95x; 5.0 (64 steps too) 2.32x / 2.51x.
# Before (factored head, every step rescaling its buffers) 0.5 against 0.75 had been the question:
# sigma 1 2.57x / 2.19x (docs/performance.md).
MAX_FACTOR_FRACTION = 2.5


def suitable(chain: DenseChain | None, params: Params, steps: int, batch: int,
             max_fraction: float | None = None) -> bool:
  """True when the low-rank path applies and its factors are at most ``max_fraction`` of dense
  (default ``MAX_FACTOR_FRACTION``)."""
  limit = MAX_FACTOR_FRACTION if max_fraction is None else max_fraction
  return chain is not None and factor_fraction(chain, params, steps, batch) <= limit


def _weights(params: Params, chain: DenseChain):
  return [(params[n]["kernel"], params[n]["bias"]) for n in chain.layers]


def gram_table(x: np.ndarray, offsets: np.ndarray, max_rows: int, block_bytes: float = 64e6) -> np.ndarray:
  """Returns ``[N, max_rows]``: each example's inner products with its own client's examples.

  Row ``offsets[c] + i`` holds ``<x_i, x_j>`` for the client's examples ``j < n_c`` (flattened
  inputs, the first dense layer's), zero past ``n_c``; clients with more than ``max_rows`` examples get
  zero rows. The data Gram matrices ``local_train`` needs are these entries at the slots' positions
  (``slot_gram``): they depend on the data only, so a simulation computes them once instead of
  every round (batched ``[k*b, d] x [d, k*b]`` products run at ~25 GFLOP/s on CPU, a tenth of a skewed
  round). Memory: ``max_rows / d`` of the inputs'.
  """
  if isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1:
    raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
  offsets = np.asarray(offsets, np.int64)
  flat = np.asarray(x).reshape(len(x), -1)
  if not np.issubdtype(flat.dtype, np.floating):
    flat = flat.astype(np.float32)
  sizes = np.diff(offsets)
  if len(sizes) and (np.any(sizes < 0) or offsets[-1] > len(flat) or offsets[0] < 0):
    raise ValueError(f"offsets must be non-decreasing within [0, {len(flat)}], got "
                     f"{offsets[:3]}...{offsets[-3:]}")
  table = np.zeros((len(flat), max_rows), flat.dtype)
  small = np.flatnonzero((sizes > 0) & (sizes <= max_rows))
  rows = np.arange(max_rows)
  per_block = max(1, int(block_bytes // (max_rows * flat.shape[1] * flat.dtype.itemsize)))
  for start in range(0, len(small), per_block):  # one batched product per block of clients (~block_bytes)
    cs = small[start:start + per_block]
    n = sizes[cs]
    valid = rows[None, :] < n[:, None]  # [B, max_rows]
    idx = np.where(valid, offsets[cs][:, None] + rows[None, :], 0)
    xb = flat[idx] * valid[..., None]  # [B, max_rows, d]; rows past n_c are zero
    gram = np.matmul(xb, np.swapaxes(xb, 1, 2))  # [B, max_rows, max_rows]
    table[idx[valid]] = gram[valid]
  return table


def slot_gram(table: jax.Array, offset: jax.Array, pos: jax.Array) -> jax.Array:
  """Returns one client's ``[k*b, k*b]`` input Gram at its slots from ``gram_table`` (``pos [k, b]``).

  Entry ``(s, r)`` is ``<x[offset + pos_s], x[offset + pos_r]>``: exactly what ``x @ x.T`` of the
  gathered batch gives, masked slots (position 0) included. Every position must be below the table's
  width (the client holds at most ``table.shape[1]`` examples).
  """
  p = pos.reshape(-1)
  rows = jnp.take(table, offset + p, axis=0, mode="clip")  # [k*b, max_rows]
  return jnp.take_along_axis(rows, jnp.broadcast_to(p[None, :], rows.shape[:1] + p.shape), axis=1,
                             mode="clip")


def dense_layers(chain: DenseChain, params: Params, steps: int, batch: int) -> tuple[bool, ...]:
  """Per layer, whether ``local_train`` trains it as per-client dense weights instead of factors.

  The first layer always trains factored (its ``x W`` and input Gram come from shared GEMMs or the
  Gram table). A later layer whose weights are no larger than its factors (``d_in * d_out <= k*b *
  (d_in + d_out)``, e.g. the MLP's 200x10 head at any step count) trains dense: its forward with the
  client's weights costs what the factored forward's shared-weight product does, and it needs no
  buffer of earlier steps' activations nor their Gram corrections. Measured (22 clients of 81-160
  examples, 16-step bucket, MLP 784-200-10, 2-core AVX-512 CPU): the factored head's activation
  buffer, its Gram products and their copies were half of every step.
  """
  out = []
  for i, name in enumerate(chain.layers):
    d_in, d_out = params[name]["kernel"].shape
    out.append(i > 0 and d_in * d_out <= steps * batch * (d_in + d_out))
  return tuple(out)


def _tail_mask(chain, params, k, b, dense_tail):
  if dense_tail is not None and not isinstance(dense_tail, (bool, np.bool_)):
    raise ValueError(f"dense_tail must be None, True or False, got {dense_tail!r}")
  if dense_tail is None:
    return dense_layers(chain, params, k, b)
  return tuple(bool(dense_tail) and i > 0 for i in range(len(chain.layers)))


def local_train(chain: DenseChain, params: Params, xs: jax.Array, ys: jax.Array, mask: jax.Array, *,
                learning_rate: float, momentum: float = 0.0, prox_mu: float = 0.0,
                gram_x: jax.Array | None = None, xw: jax.Array | None = None, dense_tail: bool | None = None,
                num_steps: jax.Array | None = None):
  """Returns (factors, aux) of one client's local SGD from ``params``, never forming its first layer's weights.

  Args:
    xs, ys, mask: ``[steps, batch, ...]`` inputs, labels, valid-example mask (as ``client.local_train``);
      up to ``MAX_STEPS`` steps are unrolled, more run as a rolled scan.
  factors: per layer ``(H [k, b, d_in], U [k, b, d_out], db [d_out])`` with the client's delta
    ``dW = H^T U`` (contracting steps and batch) and ``db``, or for a layer trained dense
    (``dense_layers``) ``(dW [d_in, d_out], db)``; aux: ``loss`` (mean over active steps, including
    the proximal term as the plain path reports it), ``num_steps``, ``num_examples``, ``sq_norm``
    (squared norm of the whole delta, via Gram matrices for factored layers).
  gram_x: optional ``[k*b, k*b]`` Gram of the flattened inputs (``slot_gram``); default ``x @ x.T``.
  xw: optional ``[k, b, d_out]``: the inputs' product with the first layer's kernel (no bias), e.g.
    rows of ``first_layer_products`` (one GEMM over a dataset's rows per round). With ``xw`` and
    ``gram_x``, ``xs`` may be None: the first layer's factor ``H`` is then None, and the caller sums
    its ``U`` against the inputs itself (``fedavg``: ``scatter_first_layer`` and ``first_layer_delta``).
  dense_tail: None trains the layers ``dense_layers`` picks dense; True every layer after the first;
    False none (every layer factored).
  num_steps: optional traced scalar for the rolled loop (more than ``MAX_STEPS`` steps): run only the
    first ``num_steps`` steps (a dynamic trip count; the client's steps past it must be masked, e.g. a
    chunk's longest client, ``step_buckets.Bucket(chunk_length=True)``). Ignored when unrolled.
  """
  k, b = mask.shape
  dense = _tail_mask(chain, params, k, b, dense_tail)
  if k > MAX_STEPS:
    return _local_train_rolled(chain, params, xs, ys, mask, learning_rate=learning_rate, momentum=momentum,
                               prox_mu=prox_mu, gram_x=gram_x, xw=xw, dense=dense, num_steps=num_steps)
  wb = _weights(params, chain)
  n_layers = len(wb)
  act = chain.activation or (lambda z: z)
  # The first layer's product with the shared weights for every step at once (one GEMM per chunk)
  # and the Gram matrix of the client's inputs (its blocks give the first layer's corrections).
  x, z0, gram_x = _first_layer_inputs(xs, wb[0][0], k, b, gram_x, xw)
  gram_x = gram_x.reshape(k, b, k * b)  # step t's rows against every slot, step-major
  a = jnp.zeros((k,), z0.dtype)
  v = jnp.zeros((k,), z0.dtype)
  # Plain SGD fixes a step's coefficient when it is taken (-lr): gs then holds U = -lr dL/dz itself and
  # db the bias deltas, so no step rescales or sums the earlier steps' factors (as the rolled loop).
  plain = momentum == 0 and prox_mu == 0
  gs: list[list[jax.Array]] = [[] for _ in wb]  # per factored layer, per step: dL/dz [b, d_out] (plain: U)
  hs: list[list[jax.Array]] = [[] for _ in wb]  # per factored layer >= 1, per step: the layer's input [b, d_in]
  db = [None if d else jnp.zeros_like(z0, shape=bias.shape) for (_, bias), d in zip(wb, dense)]
  sq = [jnp.zeros_like(z0, shape=()) for _ in wb]  # plain: per factored layer, ||H^T U||^2 so far
  dw = _zero_tail(wb, dense, z0)  # per dense layer: (delta of kernel, of bias); None for factored layers
  vw = _zero_tail(wb, dense, z0)  # and its momentum

  def flat_u(coef, g):  # [t*b, d_out]: the first t steps' U
    return _scaled(plain, coef, jnp.stack(g).reshape(-1, g[0].shape[-1]), b)

  def bias_delta(coef, g, db):
    return _bias_delta(plain, coef, jnp.stack(g).reshape(-1, g[0].shape[-1]), b, db)

  def stacked_sq_norm(coef, dw, db):
    total = 0.0
    for l in range(n_layers):
      if dense[l]:
        total = total + _dense_sq_norm(dw[l])
        continue
      if plain:
        total = total + sq[l] + jnp.sum(jnp.square(db[l]))
        continue
      n = len(gs[l])
      u = flat_u(coef[:n], gs[l])
      if l == 0:
        gram_h = gram_x[:n, :, :n * b].reshape(n * b, n * b)
      else:
        h = jnp.stack(hs[l]).reshape(n * b, -1)
        gram_h = h @ h.T
      total = total + jnp.sum(gram_h * (u @ u.T)) + jnp.sum(jnp.square(bias_delta(coef[:n], gs[l], db[l])))
    return total

  losses, actives = [], []
  for t in range(k):
    coef = a[:t]

    def loss_fn(eps, t=t, coef=coef, dw=dw, db=db):
      h, inputs, corr = None, [], [None] * n_layers
      for l, (w, bias) in enumerate(wb):
        if dense[l]:
          inputs.append(h)
          z = _dense_forward(h, w, bias, dw[l], eps[l])
          h = act(z) if l < n_layers - 1 else z
          continue
        if l == 0:
          z = z0[t]
          gram = gram_x[t, :, :t * b] if t else None
        else:
          inputs.append(h)
          z = h @ w
          gram = h @ jnp.stack(hs[l]).reshape(t * b, -1).T if t else None
        z = z + bias
        if t:
          corr[l] = gram @ flat_u(coef, gs[l])  # the layer's delta applied to this step's inputs
          z = z + corr[l] + bias_delta(coef, gs[l], db[l])
        z = z + eps[l]
        h = act(z) if l < n_layers - 1 else z
      ex = models_lib.per_example_loss(h, ys[t])
      mf = mask[t].astype(ex.dtype)
      return jnp.sum(ex * mf) / jnp.maximum(jnp.sum(mf), 1.0), (inputs, corr)

    # zeros_like keeps x's varying-ness under shard_map: grad w.r.t. an invariant zero would be psum'd.
    eps = [jnp.zeros_like(z0, shape=(b, w.shape[1])) for w, _ in wb]
    (loss, (inputs, corr)), grads = jax.value_and_grad(loss_fn, has_aux=True)(eps)
    if prox_mu > 0 and t:
      loss = loss + 0.5 * prox_mu * stacked_sq_norm(coef, dw, db)
    active = jnp.any(mask[t])
    for l in range(n_layers):
      if dense[l]:
        continue
      if plain:
        u_t = jnp.where(active, -learning_rate * grads[l], 0.0)
        gram_tt = gram_x[t, :, t * b:(t + 1) * b] if l == 0 else inputs[l - 1] @ inputs[l - 1].T
        sq[l] = sq[l] + _sq_norm_increment(u_t, corr[l], gram_tt)
        gs[l].append(u_t)
        db[l] = db[l] + jnp.sum(u_t, axis=0)
      else:
        gs[l].append(grads[l])
      if l:
        hs[l].append(inputs[l - 1])
    dw, vw = _dense_tail_step(dense, dw, vw, inputs, grads, active, learning_rate, momentum, prox_mu)
    v_new = momentum * v + (jnp.zeros_like(a).at[t].set(1.0) + prox_mu * a)
    a_new = a - learning_rate * v_new
    a, v = jnp.where(active, a_new, a), jnp.where(active, v_new, v)
    losses.append(loss)
    actives.append(active)

  factors = []
  for l in range(n_layers):
    if dense[l]:
      factors.append(dw[l])
      continue
    u = flat_u(a, gs[l]).reshape(k, b, -1)
    factors.append((_first_layer_h(x, k, b) if l == 0 else jnp.stack(hs[l]), u, bias_delta(a, gs[l], db[l])))
  return factors, _aux(jnp.stack(losses), jnp.stack(actives), mask, stacked_sq_norm(a, dw, db))


def _sq_norm_increment(u_t: jax.Array, corr: jax.Array | None, gram_tt: jax.Array) -> jax.Array:
  """``||D + H_t^T U_t||^2 - ||D||^2`` for a factored layer's delta ``D`` before step t (plain SGD).

  ``corr = H_t D`` (the delta applied to the step's inputs, which the step's forward computed; None
  before the first step) and ``gram_tt = H_t H_t^T``: ``2 <U_t, H_t D> + <gram_tt, U_t U_t^T>``, a
  ``[b, d]`` and a ``[b, b]`` product instead of the ``[k*b, k*b]`` Gram form at the end (for 32
  steps of 10, 41 MFLOP per client of MLP 784-200-10).
  """
  inc = jnp.sum(gram_tt * (u_t @ u_t.T))
  return inc if corr is None else inc + 2.0 * jnp.sum(u_t * corr)


def _scaled(plain: bool, coef: jax.Array, u: jax.Array, b: int) -> jax.Array:
  """A factored layer's ``U`` from its ``[t*b, d]`` buffer: as stored for plain SGD, else each step's
  ``dL/dz`` times its coefficient."""
  return u if plain else jnp.repeat(coef, b)[:, None] * u


def _bias_delta(plain: bool, coef: jax.Array, u: jax.Array, b: int, carried: jax.Array) -> jax.Array:
  """A factored layer's bias delta: carried for plain SGD, else the sum of its ``U``."""
  return carried if plain else jnp.sum(_scaled(plain, coef, u, b), axis=0)


def _dense_forward(h, w, bias, dwb, eps):
  """A layer trained dense: its pre-activation with the client's weights ``W + dW``, ``b + db``."""
  return h @ (w + dwb[0]) + (bias + dwb[1]) + eps


def _aux(losses, actives, mask, sq_norm) -> dict:
  act_f = actives.astype(losses.dtype)
  return {
      "loss": jnp.sum(losses * act_f) / jnp.maximum(jnp.sum(act_f), 1.0),
      "num_steps": jnp.sum(act_f).astype(jnp.int32),
      "num_examples": jnp.sum(mask).astype(jnp.float32),
      # A sum of increments (plain SGD) or of Gram products: rounding can leave a tiny negative value,
      # whose square root would be NaN (the norm scales the client's contribution).
      "sq_norm": jnp.maximum(sq_norm, 0.0),
  }


def _zero_tail(wb, dense, like):
  return [(jnp.zeros_like(like, shape=w.shape), jnp.zeros_like(like, shape=bias.shape)) if d else None
          for (w, bias), d in zip(wb, dense)]


def _dense_sq_norm(dwb) -> jax.Array:
  return jnp.sum(jnp.square(dwb[0])) + jnp.sum(jnp.square(dwb[1]))


# Batches up to this size form a dense layer's gradient h^T g as an unrolled sum of outer products.
OUTER_SUM_MAX_BATCH = 64


def _outer_sum(h: jax.Array, g: jax.Array) -> jax.Array:
  """Returns ``h^T g`` (``[b, d_in] x [b, d_out] -> [d_in, d_out]``) for a chunk's vmapped clients.

  Batched over a chunk, XLA CPU ran the contraction over ``b`` as a batched product (Eigen), or the
  broadcast product reduced over ``b`` as one fusion, at 2-3 GFLOP/s for these blocks; unrolled over
  ``b``, the outer products fuse into one elementwise loop. Measured (2-core AVX-512 CPU, per call,
  ``[w, b, 200] x [w, b, o]``): w=19, b=10, o=10: reduced 126 us, einsum 162, unrolled 25; o=50:
  624 / 348 / 57; w=8, b=32, o=10: 165 / 65 / 48; b=64: 171 / 128 / 104. Larger batches contract.
  """
  b = h.shape[0]
  if b > OUTER_SUM_MAX_BATCH:
    return h.T @ g
  return sum(h[i][:, None] * g[i][None, :] for i in range(b))


def _dense_tail_step(dense, dw, vw, inputs, grads, active, learning_rate, momentum, prox_mu):
  """One SGD step (heavy-ball momentum, proximal pull ``prox_mu * delta``) of the dense layers' deltas;
  ``inputs[l - 1]`` is layer l's input, ``grads[l]`` dL/dz at its output. Inactive steps change nothing."""
  new_dw, new_vw = list(dw), list(vw)
  for l, d in enumerate(dense):
    if not d:
      continue
    g = (_outer_sum(inputs[l - 1], grads[l]), jnp.sum(grads[l], axis=0))
    if momentum:
      v = tuple(momentum * vi + gi + prox_mu * di for vi, gi, di in zip(vw[l], g, dw[l]))
      new_vw[l] = tuple(jnp.where(active, n, o) for n, o in zip(v, vw[l]))
    else:  # no velocity to carry (0 * v is not folded away: it would keep every step's v live)
      v = tuple(gi + prox_mu * di for gi, di in zip(g, dw[l])) if prox_mu else g
    new_dw[l] = tuple(jnp.where(active, di - learning_rate * vi, di) for di, vi in zip(dw[l], v))
  return new_dw, new_vw


def _first_layer_inputs(xs, kernel: jax.Array, k: int, b: int, gram_x, xw):
  """Returns (flat inputs or None, first layer's ``x W`` ``[k, b, d_out]``, input Gram ``[k, b, k, b]``)."""
  x = None if xs is None else xs.reshape(k * b, -1)
  if xw is None:
    if x is None:
      raise ValueError("local_train needs xs, or xw and gram_x (the first layer's products and input Gram)")
    z0 = (x @ kernel).reshape(k, b, -1)
  else:
    if xw.shape != (k, b, kernel.shape[1]):
      raise ValueError(f"xw must be [k, b, d_out] = {(k, b, kernel.shape[1])}, got {xw.shape}")
    z0 = xw.astype(kernel.dtype)
  if gram_x is None:
    if x is None:
      raise ValueError("local_train without xs needs gram_x (the input Gram, slot_gram)")
    gram_x = x @ x.T
  elif gram_x.shape != (k * b, k * b):
    raise ValueError(f"gram_x must be [k*b, k*b] = {(k * b,) * 2}, got {gram_x.shape}")
  return x, z0, gram_x.astype(z0.dtype).reshape(k, b, k, b)


def _first_layer_h(x, k: int, b: int):
  return None if x is None else x.reshape(k, b, -1)


def _local_train_rolled(chain: DenseChain, params: Params, xs, ys, mask, *, learning_rate: float,
                        momentum: float, prox_mu: float, gram_x: jax.Array | None = None,
                        xw: jax.Array | None = None, dense: tuple[bool, ...] | None = None,
                        num_steps: jax.Array | None = None):
  """``local_train`` as a ``lax.scan`` over steps with fixed-size factor buffers (any number of steps).

  The buffers are flat, ``[k*b, d]`` (step-major), so a step's correction is one ``[b, k*b] x [k*b, d]``
  product of the Gram row block and the buffer: the ``[b, k, b]``-by-``[k, b, d]`` contraction made
  XLA transpose the whole buffer every step.
  """
  k, b = mask.shape
  wb = _weights(params, chain)
  n_layers = len(wb)
  dense = dense or (False,) * n_layers
  act = chain.activation or (lambda z: z)
  x, z0, gram_x = _first_layer_inputs(xs, wb[0][0], k, b, gram_x, xw)
  gram_x = gram_x.reshape(k, b, k * b)
  # Buffers of every step's dL/dz (per factored layer) and input (factored layers >= 1); rows of later
  # steps stay zero. Dense layers carry their deltas and momenta instead. Plain SGD (no momentum, no
  # proximal term) fixes a step's coefficient when it is taken (-lr), so its buffers hold U = -lr dL/dz
  # itself and its bias deltas are carried: no step rescales or sums the buffers.
  plain = momentum == 0 and prox_mu == 0
  gs0 = [None if d else jnp.zeros_like(z0, shape=(k * b, w.shape[1])) for (w, _), d in zip(wb, dense)]
  hs0 = [None if d else jnp.zeros_like(z0, shape=(k * b, w.shape[0])) for (w, _), d in zip(wb[1:], dense[1:])]
  db0 = [None if d else jnp.zeros_like(z0, shape=bias.shape) for (_, bias), d in zip(wb, dense)]

  def scaled(coef, g):
    return _scaled(plain, coef, g, b)

  def bias_delta(coef, g, db):
    return _bias_delta(plain, coef, g, b, db)

  def stacked_sq_norm(coef, gs, hs, dw, db, sq):
    total = 0.0
    for l in range(n_layers):
      if dense[l]:
        total = total + _dense_sq_norm(dw[l])
        continue
      if plain:  # accumulated step by step (_sq_norm_increment)
        total = total + sq[l] + jnp.sum(jnp.square(db[l]))
        continue
      u = scaled(coef, gs[l])
      gram_h = gram_x.reshape(k * b, k * b) if l == 0 else hs[l - 1] @ hs[l - 1].T
      total = total + jnp.sum(gram_h * (u @ u.T)) + jnp.sum(jnp.square(bias_delta(coef, gs[l], db[l])))
    return total

  def step(carry, inp):
    a, v, gs, hs, dw, vw, db, sq = carry
    t, y_t, m_t = inp

    def loss_fn(eps):
      h, inputs, corr = None, [], [None] * n_layers
      for l, (w, bias) in enumerate(wb):
        if dense[l]:
          inputs.append(h)
          z = _dense_forward(h, w, bias, dw[l], eps[l])
          h = act(z) if l < n_layers - 1 else z
          continue
        if l == 0:
          z, gram = z0[t], gram_x[t]
        else:
          inputs.append(h)
          z, gram = h @ w, h @ hs[l - 1].T
        # a_s = 0 (plain: U_s = 0) for the steps s >= t not taken yet
        corr[l] = gram @ scaled(a, gs[l])  # the layer's delta applied to this step's inputs
        z = z + bias + corr[l] + bias_delta(a, gs[l], db[l]) + eps[l]
        h = act(z) if l < n_layers - 1 else z
      ex = models_lib.per_example_loss(h, y_t)
      mf = m_t.astype(ex.dtype)
      return jnp.sum(ex * mf) / jnp.maximum(jnp.sum(mf), 1.0), (inputs, corr)

    eps = [jnp.zeros_like(z0, shape=(b, w.shape[1])) for w, _ in wb]
    (loss, (inputs, corr)), grads = jax.value_and_grad(loss_fn, has_aux=True)(eps)
    if prox_mu > 0:
      loss = loss + 0.5 * prox_mu * stacked_sq_norm(a, gs, hs, dw, db, sq)
    active = jnp.any(m_t)
    if plain:
      grads = [d if g is None else jnp.where(active, -learning_rate * d, 0.0) for g, d in zip(gs, grads)]
      db = [None if g is None else dbl + jnp.sum(d, axis=0) for g, d, dbl in zip(gs, grads, db)]
      sq = [None if g is None else sql + _sq_norm_increment(
          d, c, jax.lax.dynamic_slice_in_dim(gram_x[t], t * b, b, axis=1) if l == 0 else inputs[l - 1] @ inputs[l - 1].T)
            for l, (g, d, c, sql) in enumerate(zip(gs, grads, corr, sq))]
    gs = [None if g is None else jax.lax.dynamic_update_slice_in_dim(g, d, t * b, 0) for g, d in zip(gs, grads)]
    hs = [None if h is None else jax.lax.dynamic_update_slice_in_dim(h, i, t * b, 0) for h, i in zip(hs, inputs)]
    dw, vw = _dense_tail_step(dense, dw, vw, inputs, grads, active, learning_rate, momentum, prox_mu)
    v_new = momentum * v + (jnp.zeros_like(a).at[t].set(1.0) + prox_mu * a)
    a_new = a - learning_rate * v_new
    return (jnp.where(active, a_new, a), jnp.where(active, v_new, v), gs, hs, dw, vw, db, sq), (loss, active)

  a0 = jnp.zeros_like(z0, shape=(k,))
  dw0 = _zero_tail(wb, dense, z0)
  sq0 = [None if d else jnp.zeros_like(z0, shape=()) for d in dense]
  carry0 = (a0, a0, gs0, hs0, dw0, dw0, db0, sq0)
  if num_steps is None:
    carry, (losses, actives) = jax.lax.scan(step, carry0, (jnp.arange(k), ys, mask))
  else:  # steps past num_steps are masked: they would change nothing (loss 0, inactive)
    def body(t, c):
      carry, losses, actives = c
      carry, (loss, active) = step(carry, (t, ys[t], mask[t]))
      return carry, losses.at[t].set(loss), actives.at[t].set(active)

    carry, losses, actives = jax.lax.fori_loop(
        0, jnp.minimum(num_steps, k), body,
        (carry0, jnp.zeros_like(z0, shape=(k,)), jnp.zeros_like(mask, shape=(k,))))
  a, _, gs, hs, dw, _, db, sq = carry
  factors = []
  for l in range(n_layers):
    if dense[l]:
      factors.append(dw[l])
      continue
    u = scaled(a, gs[l])
    h = _first_layer_h(x, k, b) if l == 0 else hs[l - 1].reshape(k, b, -1)
    factors.append((h, u.reshape(k, b, -1), bias_delta(a, gs[l], db[l])))
  return factors, _aux(losses, actives, mask, stacked_sq_norm(a, gs, hs, dw, db, sq))


def weighted_sum(chain: DenseChain, factors, weights: jax.Array) -> Params:
  """Returns ``sum_c weights[c] * delta_c`` as a params tree from stacked factors ``[C, k, b, .]``.

  A layer whose ``H`` is None (``local_train`` given ``xw`` and no inputs) has no ``kernel`` entry:
  its caller sums that kernel itself (``scatter_first_layer``, ``first_layer_delta``).
  """
  out = {}
  for name, f in zip(chain.layers, factors):
    if len(f) == 2:  # a layer trained dense: (dW, db)
      out[name] = {"kernel": jnp.einsum("c,cio->io", weights, f[0]), "bias": jnp.einsum("c,co->o", weights, f[1])}
      continue
    h, u, db = f
    out[name] = {"bias": jnp.einsum("c,co->o", weights, db)}
    if h is not None:
      out[name]["kernel"] = jnp.einsum("cksi,ckso->io", h, u * weights[:, None, None, None])
  return out


def first_layer_products(x: jax.Array, kernel: jax.Array, rows: int | None = None,
                         block: int | None = None) -> jax.Array:
  """Returns ``[rows, d_out]``: the first ``rows`` rows' products with the first layer's kernel (``x``
  flattened per row; default every row).

  With most of a round's clients training low-rank, one pass over the dataset's rows per round
  replaces the per-chunk products over padded slots (``local_train(..., xw=...)``). It runs in
  blocks of ``block`` rows: on a 2-core CPU, 11,926 of 20,000 MNIST-sized rows took 40 ms in blocks
  of 1,024 against 61 ms as one product of the sliced rows (XLA copied the slice first). ``block``
  defaults to ``PRODUCT_BLOCK_ROWS``. Every row (``rows`` = all of ``x``'s) is one product, with no
  slice to copy and no output to assemble (rounds whose table covers every client, paired against the
  blocks, with ``first_layer_delta`` alike: 100 clients 0.955 and 0.965, 300 clients 0.941, W1 0.966).
  """
  x = x.reshape(x.shape[0], -1)
  rows = x.shape[0] if rows is None else rows
  if not 0 <= rows <= x.shape[0]:
    raise ValueError(f"rows must be in [0, {x.shape[0]}], got {rows}")
  if rows == x.shape[0]:
    return x.astype(kernel.dtype) @ kernel

  def step(out, start, size):
    xb = jax.lax.dynamic_slice_in_dim(x, start, size).astype(kernel.dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, xb @ kernel, start, 0)

  return _fold_row_blocks(rows, block, jnp.zeros((rows, kernel.shape[1]), kernel.dtype), step)


def _fold_row_blocks(rows: int, block: int | None, init, step):
  """Returns ``step(acc, start, size)`` folded over rows ``[0, rows)``: full blocks of ``block`` rows
  (default ``PRODUCT_BLOCK_ROWS``) in a ``fori_loop``, then the rest as one smaller block."""
  block = block or PRODUCT_BLOCK_ROWS
  n, rem = divmod(rows, block)
  acc = init
  if n:
    acc = jax.lax.fori_loop(0, n, lambda i, a: step(a, i * block, block), acc)
  if rem:
    acc = step(acc, n * block, rem)
  return acc


def scatter_first_layer(buf: jax.Array, rows: jax.Array, u: jax.Array, weights: jax.Array) -> jax.Array:
  """Returns ``buf [N, d_out]`` plus each client's weighted first-layer ``U`` at its examples' rows.

  ``rows [C, k, b]``: each slot's row in the dataset; rows out of ``[0, N)`` (masked slots, padded
  or rejected clients) are dropped. ``first_layer_delta(x, buf)`` is then ``sum_c w_c H_c^T U_c``
  (an example seen in several steps adds each step's ``U``).
  """
  wu = u * weights[:, None, None, None]
  return buf.at[rows.reshape(-1)].add(wu.reshape(-1, wu.shape[-1]), mode="drop")


def first_layer_delta(x: jax.Array, buf: jax.Array, block: int | None = None) -> jax.Array:
  """Returns ``x[:R]^T buf`` for ``buf [R, d_out]`` from ``scatter_first_layer``: the first layer's
  weighted kernel sum (in blocks of rows, as ``first_layer_products``: 37 ms against 61 ms).

  ``x`` must be finite: a rejected client's rows of ``buf`` are zero, and ``inf * 0`` would turn the
  whole sum into NaN (``fedavg.device_train_data`` checks the rows once; selecting non-finite
  entries away every round cost ~8% of a round).
  """
  x = x.reshape(x.shape[0], -1)
  rows = buf.shape[0]
  if rows > x.shape[0]:
    raise ValueError(f"buf has {rows} rows, x only {x.shape[0]}")
  if rows == x.shape[0]:  # every row: one product (first_layer_products)
    return jax.lax.dot_general(x.astype(buf.dtype), buf, (((0,), (0,)), ((), ())))

  def step(acc, start, size):
    xb = jax.lax.dynamic_slice_in_dim(x, start, size).astype(buf.dtype)
    return acc + xb.T @ jax.lax.dynamic_slice_in_dim(buf, start, size)

  return _fold_row_blocks(rows, block, jnp.zeros((x.shape[1], buf.shape[1]), buf.dtype), step)


def local_train_densified(chain: DenseChain, params: Params, get_block: Callable, num_blocks: jax.Array, *,
                          learning_rate: float) -> tuple[Params, dict]:
  """Plain local SGD of a long client in blocks: each runs ``local_train`` from the weights the
  earlier blocks reached and adds its factors to them (periodic densification).

  A client whose factors would outgrow its dense weights (``suitable`` is False) otherwise trains
  dense, one batch-``b`` step at a time: two ``b``-row GEMMs and a pass over every weight per step.
  Here a block of ``k`` steps costs one ``k*b``-row GEMM against the block's weights, the ``b x kb``
  Gram corrections, and one ``[d_in, k*b] x [k*b, d_out]`` GEMM added to the weights. Measured (one
  client, 80 steps of 10, MLP 784-200-10, 2-core AVX-512 CPU, us per step): dense 227, blocks of 2:
  169, of 4: 138, of 8 (rolled): 186, of 16: 230. Since the rolled loop's flat buffers (240 steps):
  blocks of 4 128, 8 110, 10 102, 16 102; in rounds (power law, paired against the limit) blocks of 4,
  8, 12 and 16 ran alike (2.09x-2.11x): a client's last block pays its whole GEMMs.

  Args:
    get_block: ``i -> (xs [k, b, ...], ys [k, b], mask [k, b])``, steps ``i*k .. i*k + k - 1`` of the
      client's plan (masked past its last step).
    num_blocks: blocks to run (a traced scalar: the loop's trip count).
    learning_rate: of plain SGD (no momentum, no proximal term: their state would carry a dense
      velocity or anchor distance across blocks, which the factors do not hold).
  Returns (delta, aux): the client's change to ``params`` and ``loss`` (mean over active steps),
  ``num_steps``, ``num_examples``, as ``client.local_train`` on the same steps.
  """
  def block(i, carry):
    p, loss_sum, steps, examples = carry
    xs, ys, mask = get_block(i)
    factors, aux = local_train(chain, p, xs, ys, mask, learning_rate=learning_rate)
    p = jax.tree.map(jnp.add, p, dense_delta(chain, factors))
    # aux["loss"] is the mean over the block's active steps; times their count, their sum.
    return (p, loss_sum + aux["loss"] * aux["num_steps"], steps + aux["num_steps"],
            examples + aux["num_examples"])

  dtype = jax.tree.leaves(params)[0].dtype
  zero = jnp.zeros_like(num_blocks, dtype=dtype)
  carry = (params, zero, jnp.zeros_like(num_blocks, dtype=jnp.int32), zero)
  p, loss_sum, steps, examples = jax.lax.fori_loop(0, num_blocks, block, carry)
  aux = {"loss": loss_sum / jnp.maximum(steps, 1).astype(dtype), "num_steps": steps, "num_examples": examples}
  return jax.tree.map(jnp.subtract, p, params), aux


def dense_delta(chain: DenseChain, factors) -> Params:
  """Returns one client's dense delta from its (unstacked) factors (``local_train_densified``'s blocks)."""
  return {name: ({"kernel": f[0], "bias": f[1]} if len(f) == 2
                 else {"kernel": jnp.einsum("ksi,kso->io", f[0], f[1]), "bias": f[2]})
          for name, f in zip(chain.layers, factors)}
