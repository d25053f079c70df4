"""Secure aggregation, simulated: the server learns only masked vectors and their sum.

Follows Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
Learning") with the sparse neighbour graph of SecAgg+ (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead"):

1. Each client quantises its update to the ring ``Z_{2^32}``: ``clip(x, -r, r) * 2^f`` with
   unbiased stochastic rounding, two's complement (``quantize``).
2. Clients sit on a random ``k``-regular circulant (Harary) graph. Each holds a key pair
   (``sk``, ``pk = g^sk`` in the multiplicative group mod the Mersenne prime ``2^127 - 1``:
   Diffie-Hellman in a toy-sized group, enough to simulate who can compute which seed), agrees a
   seed ``s_ij = pk_j^sk_i`` with every neighbour and draws a self-mask seed ``b_i``.
3. Each client Shamir-shares ``sk_i`` and ``b_i`` among its ``k`` neighbours with threshold ``t``
   (prime field ``2^127 - 1``, Python integers: this runs once per round on the host, outside
   the compiled client map).
4. Client ``i`` sends ``y_i = q_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)``
   (mod ``2^32``; masks generated for all edges at once with ``vmap``).
5. Some clients drop before sending. The server asks the surviving neighbours for shares: of
   ``b_i`` for each survivor, of ``sk_i`` for each dropped client (never both for one client).
   With ``t`` shares it reconstructs them, recomputes the dropped clients' pair seeds with the
   survivors' public keys, and removes all masks: what is left is exactly
   ``sum_{survivors} q_i (mod 2^32)``. If any needed secret has fewer than ``t`` surviving
   shareholders (or fewer than ``min_survivors`` clients send), the round is **aborted**: the
   aggregate is zero and ``secagg_aborted = 1`` is reported, never a wrong sum.

The quantisation error of the dequantised sum is at most ``n_survivors / 2^f`` per coordinate
(stochastic rounding; plus clamping at ``r``, counted in ``secagg_clamped``). ``bytes_per_client``
gives the upload of one client. DP composes by clipping and noising before masking
(``dp.distributed_gaussian``) or by ``central_noise_multiplier`` added to the unmasked sum.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_health.aggregators.base import Aggregator, EmptyState, flatten_updates, unflatten_like

RING_BITS = 32
PRIME = 2 ** 127 - 1  # Shamir field and (toy) Diffie-Hellman group modulus
GENERATOR = 3
_MASK64 = 2 ** 64 - 1


# --- Shamir secret sharing over GF(PRIME), Python integers -------------------------------------


def shamir_share(secret: int, xs, threshold: int, rng: np.random.Generator) -> list[tuple[int, int]]:
  """Returns shares ``(x, f(x))`` of ``secret`` at the nonzero points ``xs``; any ``threshold`` recover it.

  ``f`` is a uniformly random polynomial of degree ``threshold - 1`` with ``f(0) = secret``
  (Shamir 1979, "How to Share a Secret").
  """
  if not 0 <= secret < PRIME:
    raise ValueError(f"secret must be in [0, 2^127 - 1), got {secret}")
  if not 1 <= threshold <= len(xs):
    raise ValueError(f"threshold must be in [1, {len(xs)}] (number of shares), got {threshold}")
  coeffs = [secret] + [int.from_bytes(rng.bytes(16), "little") % PRIME for _ in range(threshold - 1)]
  shares = []
  for x in xs:
    x = int(x)
    if not 0 < x < PRIME:
      raise ValueError(f"share points must be in [1, PRIME), got {x}")
    y = 0
    for c in reversed(coeffs):  # Horner
      y = (y * x + c) % PRIME
    shares.append((x, y))
  return shares


def shamir_reconstruct(shares) -> int:
  """Returns ``f(0)`` by Lagrange interpolation from shares ``(x, y)`` with distinct ``x``."""
  xs = [int(x) for x, _ in shares]
  if len(set(xs)) != len(xs):
    raise ValueError("shares must have distinct x")
  secret = 0
  for i, (xi, yi) in enumerate(shares):
    num, den = 1, 1
    for j, xj in enumerate(xs):
      if j != i:
        num = num * (-xj) % PRIME
        den = den * (xi - xj) % PRIME
    secret = (secret + int(yi) * num * pow(den, -1, PRIME)) % PRIME
  return secret


# --- Graph, ring, masks --------------------------------------------------------------------------


def neighbour_edges(num_clients: int, num_neighbors: int) -> np.ndarray:
  """Returns the ``[E, 2]`` edges (i < j by position) of the ``k``-regular circulant graph on ``m`` nodes.

  Node ``p`` links to ``p +- 1, ..., p +- k/2`` (mod m), and to ``p + m/2`` when ``k`` is odd
  (needs ``m`` even). ``k = m - 1`` is the complete graph of the original protocol.
  """
  m, k = int(num_clients), int(num_neighbors)
  if not 1 <= k <= m - 1:
    raise ValueError(f"num_neighbors must be in [1, {m - 1}] for a cohort of {m}, got {k}")
  if k % 2 and m % 2:
    raise ValueError(f"num_neighbors must be even when the cohort size ({m}) is odd, got {k}")
  edges = set()
  for p in range(m):
    for o in range(1, k // 2 + 1):
      edges.add(tuple(sorted((p, (p + o) % m))))
    if k % 2:
      edges.add(tuple(sorted((p, (p + m // 2) % m))))
  return np.array(sorted(edges), np.int32).reshape(-1, 2)


def max_frac_bits(num_clients: int, clip_range: float) -> int:
  """Returns the largest ``f`` with ``m (r 2^f + 1) < 2^31``: the sum of ``m`` values can't overflow."""
  f = math.floor(math.log2(((2 ** (RING_BITS - 1) - 1) / num_clients - 1) / clip_range))
  if f < 0:
    raise ValueError(f"clip_range={clip_range} is too large for a {RING_BITS}-bit ring with {num_clients} clients")
  return int(f)


def precision_frac_bits(clip_range: float) -> int:
  """Returns the largest ``f`` with ``r 2^f <= 2^22``: float32 holds the scaled integers exactly."""
  return int(22 - math.ceil(math.log2(clip_range)))


def default_frac_bits(num_clients: int, clip_range: float) -> int:
  """Returns ``min(max_frac_bits, precision_frac_bits)``: no overflow, and float32-exact scaling."""
  return min(max_frac_bits(num_clients, clip_range), precision_frac_bits(clip_range))


def quantize(x: jax.Array, clip_range: float, frac_bits: int, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (``uint32`` fixed-point ring elements of ``x``, number of clamped values).

  ``round(clip(x, -r, r) * 2^f)`` with unbiased stochastic rounding, as two's complement.
  """
  scale = float(2 ** frac_bits)
  clamped = jnp.sum(jnp.abs(x) > clip_range)
  v = jnp.clip(x, -clip_range, clip_range) * scale  # exact: a power-of-two scaling
  lo = jnp.floor(v)
  # Round up with probability frac(v): exact in float32, so unbiased (v + u would round u away).
  v = lo + (jax.random.uniform(rng, x.shape, v.dtype) < v - lo).astype(v.dtype)
  return jax.lax.bitcast_convert_type(v.astype(jnp.int32), jnp.uint32), clamped


def dequantize(q: jax.Array, frac_bits: int) -> jax.Array:
  """Returns the float value of ring elements read as signed (two's complement) fixed point."""
  return jax.lax.bitcast_convert_type(q, jnp.int32).astype(jnp.float32) / float(2 ** frac_bits)


def _prg(seed: jax.Array, dim: int) -> jax.Array:
  key = jax.random.wrap_key_data(seed, impl="threefry2x32")
  return jax.random.bits(key, (dim,), jnp.uint32)


def _seg_sum(values: jax.Array, ids: jax.Array, n: int) -> jax.Array:
  return jax.ops.segment_sum(values, ids, num_segments=n)  # uint32 addition wraps mod 2^32


# --- The protocol's host side: key agreement and Shamir recovery --------------------------------


def _to_int(pair) -> int:
  return int(pair[0]) | (int(pair[1]) << 32)


def _to_pair(v: int) -> tuple[int, int]:
  v &= _MASK64
  return v & 0xFFFFFFFF, v >> 32


def _protocol_host(sk, b, edges, dropped, coef_seed, threshold):
  """Runs key agreement, sharing and recovery; returns (client seeds, server seeds, b_rec, ok)."""
  m = sk.shape[0]
  sks = [_to_int(p) for p in sk]
  bs = [_to_int(p) for p in b]
  pks = [pow(GENERATOR, s, PRIME) for s in sks]
  neighbours = [[] for _ in range(m)]
  for i, j in edges:
    neighbours[int(i)].append(int(j))
    neighbours[int(j)].append(int(i))
  # Clients: pair seeds from Diffie-Hellman with the neighbour's public key.
  client_seeds = np.array([_to_pair(pow(pks[int(j)], sks[int(i)], PRIME)) for i, j in edges], np.uint32)
  # Clients: Shamir shares of sk and b for the neighbours (share point = neighbour index + 1).
  rng = np.random.default_rng([int(coef_seed[0]), int(coef_seed[1])])
  held = {}  # (owner, holder) -> (share of sk, share of b)
  for i in range(m):
    xs = [j + 1 for j in neighbours[i]]
    sh_sk = shamir_share(sks[i], xs, threshold, rng)
    sh_b = shamir_share(bs[i], xs, threshold, rng)
    for j, s1, s2 in zip(neighbours[i], sh_sk, sh_b):
      held[(i, j)] = (s1, s2)
  # Server: each surviving neighbour reveals the share of sk (owner dropped) or of b (owner survived).
  ok = True
  recovered_sk, b_rec = {}, np.zeros((m, 2), np.uint32)
  for i in range(m):
    which = 0 if dropped[i] else 1
    shares = [held[(i, j)][which] for j in neighbours[i] if not dropped[j]]
    if len(shares) < threshold:
      ok = False
      continue
    secret = shamir_reconstruct(shares[:threshold])
    if dropped[i]:
      recovered_sk[i] = secret
    else:
      b_rec[i] = _to_pair(secret)
  server_seeds = np.zeros((len(edges), 2), np.uint32)
  for e, (i, j) in enumerate(edges):
    i, j = int(i), int(j)
    if dropped[i] != dropped[j]:  # one end dropped: the server rebuilds that pair's seed
      d, s = (i, j) if dropped[i] else (j, i)
      if d in recovered_sk:
        server_seeds[e] = _to_pair(pow(pks[s], recovered_sk[d], PRIME))
  return client_seeds, server_seeds, b_rec, np.bool_(ok)


def secure_sum(q: jax.Array, dropped: jax.Array, rng: jax.Array, num_neighbors: int, threshold: int,
               min_survivors: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (the unmasked sum over survivors ``[d]`` uint32, ok, the masked inputs ``[m, d]``).

  ``q``: quantised updates ``[m, d]`` uint32; ``dropped``: bool ``[m]`` clients that never send.
  When ``ok`` is False the round must be aborted (the returned sum is then zero).
  """
  m, d = q.shape
  edges_np = neighbour_edges(m, num_neighbors)
  k_perm, k_sk, k_b, k_coef = jax.random.split(rng, 4)
  perm = jax.random.permutation(k_perm, m)  # random assignment of clients to graph positions
  edges = perm[jnp.asarray(edges_np)]
  sk = jax.random.bits(k_sk, (m, 2), jnp.uint32)
  b = jax.random.bits(k_b, (m, 2), jnp.uint32)
  coef = jax.random.bits(k_coef, (2,), jnp.uint32)
  out_shapes = (jax.ShapeDtypeStruct((len(edges_np), 2), jnp.uint32), jax.ShapeDtypeStruct((len(edges_np), 2), jnp.uint32),
                jax.ShapeDtypeStruct((m, 2), jnp.uint32), jax.ShapeDtypeStruct((), jnp.bool_))
  client_seeds, server_seeds, b_rec, ok = jax.pure_callback(
      lambda *a: _protocol_host(*a, threshold=threshold), out_shapes, sk, b, edges, dropped, coef,
      vmap_method="sequential")
  src, dst = edges[:, 0], edges[:, 1]
  # Clients: add the self mask and the signed pair masks.
  pair = jax.vmap(lambda s: _prg(s, d))(client_seeds)
  masked = q + jax.vmap(lambda s: _prg(s, d))(b) + _seg_sum(pair, src, m) - _seg_sum(pair, dst, m)
  # Server: sum what survivors sent, remove their self masks and the dropped clients' pair masks.
  alive = ~dropped
  zero = jnp.zeros((), jnp.uint32)
  total = jnp.sum(jnp.where(alive[:, None], masked, zero), axis=0)
  total = total - jnp.sum(jnp.where(alive[:, None], jax.vmap(lambda s: _prg(s, d))(b_rec), zero), axis=0)
  rebuilt = jax.vmap(lambda s: _prg(s, d))(server_seeds)
  plus = (alive[src] & dropped[dst])[:, None]  # survivor src holds +mask
  minus = (dropped[src] & alive[dst])[:, None]  # survivor dst holds -mask
  total = total - jnp.sum(jnp.where(plus, rebuilt, zero), axis=0) + jnp.sum(jnp.where(minus, rebuilt, zero), axis=0)
  ok = ok & (jnp.sum(alive) >= min_survivors)
  return jnp.where(ok, total, zero), ok, masked


def bytes_per_client(num_params: int, num_neighbors: int, key_bytes: int = 16, share_bytes: int = 16) -> dict:
  """Returns the bytes one client uploads per round, by protocol phase (SecAgg+ with ``k`` neighbours).

  Keys: two public keys (pair agreement, share encryption); shares: encrypted Shamir shares of
  ``sk`` and ``b`` for each neighbour; masked input: ``num_params`` ring elements of 4 bytes;
  unmasking: one share per neighbour. ``plain`` is an unprotected float32 update, for comparison.
  """
  out = {"keys": 2 * key_bytes, "shares": 2 * num_neighbors * share_bytes,
         "masked_input": num_params * RING_BITS // 8, "unmasking": num_neighbors * share_bytes}
  out["total"] = sum(out.values())
  out["plain"] = num_params * 4
  return out


def quantization_error_bound(num_survivors: int, frac_bits: int) -> float:
  """Returns the per-coordinate bound on |dequantised sum - true sum| (stochastic rounding, no clamping)."""
  return num_survivors / float(2 ** frac_bits)


def secure_mean(num_neighbors: int, threshold: int, clip_range: float, frac_bits: int | None = None,
                cohort_size: int | None = None, denominator: float | None = None, min_survivors: int = 1,
                central_noise_multiplier: float = 0.0, clip_norm: float | None = None) -> Aggregator:
  """Returns the Aggregator that sums the cohort's updates under simulated SecAgg+ and divides.

  Args:
    num_neighbors, threshold: graph degree ``k`` and Shamir threshold ``t`` (``k/2 < t <= k``:
      a majority, so the server can never gather shares of both ``sk_i`` and ``b_i``).
    clip_range: ``r``, values are clamped to ``[-r, r]`` before quantisation (an L2 clip ``C``
      gives ``r = C``; add room for distributed noise).
    frac_bits: fixed-point fraction bits ``f`` (default ``default_frac_bits``: the largest that
      cannot overflow the sum of the cohort and that float32 scales exactly); checked against
      ``cohort_size`` when given.
    denominator: fixed divisor (DP), or None for the number of survivors (plain mean).
    min_survivors: abort when fewer clients send (distributed DP noise needs enough shares).
    central_noise_multiplier, clip_norm: if > 0, the server adds ``N(0, (z C)^2)`` to the unmasked sum.
  Clients drop when ``ctx['client_ctx']['dropped']`` is True; clients of weight 0 send zeros.
  info: ``secagg_aborted``, ``secagg_survivors``, ``secagg_clamped``, ``secagg_error_bound``.
  """
  k, t = int(num_neighbors), int(threshold)
  if k < 1:
    raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}")
  if not (k / 2 < t <= k):
    raise ValueError(f"threshold must be in ({k / 2}, {k}] (a majority of num_neighbors={k}), got {threshold}")
  if not clip_range > 0:
    raise ValueError(f"clip_range must be > 0, got {clip_range}")
  if min_survivors < 1:
    raise ValueError(f"min_survivors must be >= 1, got {min_survivors}")
  if central_noise_multiplier < 0:
    raise ValueError(f"central_noise_multiplier must be >= 0, got {central_noise_multiplier}")
  if central_noise_multiplier > 0 and not (clip_norm and clip_norm > 0):
    raise ValueError(f"clip_norm must be > 0 with central noise, got {clip_norm}")
  if denominator is not None and not denominator > 0:
    raise ValueError(f"denominator must be > 0 or None, got {denominator}")
  if cohort_size is not None:
    neighbour_edges(cohort_size, k)  # validates k against the cohort
    limit = max_frac_bits(cohort_size, clip_range)
    if frac_bits is not None and frac_bits > limit:
      raise ValueError(f"frac_bits must be <= {limit} so {cohort_size} clients of range {clip_range} cannot "
                       f"overflow the {RING_BITS}-bit ring, got {frac_bits}")

  def apply(updates, weights, state, rng, ctx):
    flat = flatten_updates(updates)
    m, d = flat.shape
    f = default_frac_bits(m, clip_range) if frac_bits is None else frac_bits
    client_ctx = (ctx or {}).get("client_ctx") or {}
    dropped = client_ctx.get("dropped", jnp.zeros(m, bool)) if isinstance(client_ctx, dict) else jnp.zeros(m, bool)
    k_q, k_sec, k_noise = jax.random.split(rng, 3)
    flat = jnp.where((weights > 0)[:, None], flat, 0.0)
    q, clamped = jax.vmap(lambda x, key: quantize(x, clip_range, f, key))(flat, jax.random.split(k_q, m))
    total, ok, _ = secure_sum(q, dropped, k_sec, k, t, min_survivors)
    survivors = jnp.sum(~dropped)
    agg = dequantize(total, f)
    if central_noise_multiplier > 0:
      agg = agg + central_noise_multiplier * clip_norm * jax.random.normal(k_noise, agg.shape)
    denom = jnp.maximum(survivors, 1).astype(jnp.float32) if denominator is None else denominator
    agg = jnp.where(ok, agg / denom, 0.0)
    info = {"secagg_aborted": (~ok).astype(jnp.int32), "secagg_survivors": survivors,
            "secagg_clamped": jnp.sum(jnp.where(~dropped, clamped, 0)),
            "secagg_error_bound": survivors.astype(jnp.float32) / float(2 ** f)}
    return unflatten_like(agg, updates), state, info

  return Aggregator(lambda params: EmptyState(), apply)
