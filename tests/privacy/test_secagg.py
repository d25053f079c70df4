"""Simulated SecAgg+: exact sums mod 2^32, uniform masks, Shamir recovery of dropouts, aborts."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_health.privacy import secagg


def _q(m=7, d=2000, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 2 ** 32, size=(m, d), dtype=np.uint64).astype(np.uint32))


def _plain_sum(q, alive):
  return np.asarray(q, np.uint64)[np.asarray(alive)].sum(0) % (2 ** 32)


def test_shamir_any_threshold_subset_reconstructs():
  rng = np.random.default_rng(0)
  secret = 2 ** 64 - 12345
  shares = secagg.shamir_share(secret, [3, 5, 8, 9, 11], 3, rng)
  for subset in itertools.combinations(shares, 3):
    assert secagg.shamir_reconstruct(list(subset)) == secret
  assert secagg.shamir_reconstruct(shares) == secret
  assert all(secagg.shamir_reconstruct(list(s)) != secret for s in itertools.combinations(shares, 2))
  with pytest.raises(ValueError):
    secagg.shamir_share(secret, [1, 2], 3, rng)


@pytest.mark.parametrize("m,k", [(4, 3), (7, 4), (10, 2), (8, 5), (9, 8)])
def test_neighbour_graph_is_k_regular(m, k):
  edges = secagg.neighbour_edges(m, k)
  degree = np.bincount(edges.ravel(), minlength=m)
  assert np.all(degree == k) and len({tuple(e) for e in edges}) == len(edges)
  with pytest.raises(ValueError):
    secagg.neighbour_edges(m, m)


@pytest.mark.parametrize("m,k,t", [(7, 6, 4), (7, 4, 3), (10, 4, 3)])
def test_secure_sum_equals_plain_sum_mod_ring(m, k, t):
  q = _q(m)
  total, ok, masked = jax.jit(lambda q, r: secagg.secure_sum(q, jnp.zeros(m, bool), r, k, t))(q, jax.random.key(1))
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(total), _plain_sum(q, np.ones(m, bool)))
  assert not np.array_equal(np.asarray(masked), np.asarray(q))


def test_masked_vectors_pass_chi_square_uniformity_test():
  m, d = 6, 64_000
  q = jnp.asarray(np.tile(np.arange(d) % 7, (m, 1)).astype(np.uint32))  # far from uniform
  _, ok, masked = secagg.secure_sum(q, jnp.zeros(m, bool), jax.random.key(3), 4, 3)
  assert bool(ok)
  bins = 256
  for row in np.asarray(masked):
    counts = np.bincount(row >> 24, minlength=bins)  # top 8 bits
    assert stats.chisquare(counts).pvalue > 1e-4
    low = np.bincount(row & 0xFF, minlength=bins)  # low 8 bits too
    assert stats.chisquare(low).pvalue > 1e-4
  # The test has power: the unmasked inputs fail it.
  assert stats.chisquare(np.bincount(np.asarray(q[0]) & 0xFF, minlength=bins)).pvalue < 1e-10


@pytest.mark.parametrize("seed", range(4))
def test_dropouts_below_threshold_still_give_exact_sum(seed):
  m, k, t = 10, 6, 4
  rng = np.random.default_rng(seed)
  q = _q(m, 500, seed)
  dropped = np.zeros(m, bool)
  dropped[rng.choice(m, 2, replace=False)] = True  # <= k - t: every neighbourhood keeps t shareholders
  total, ok, _ = secagg.secure_sum(q, jnp.asarray(dropped), jax.random.key(seed), k, t)
  assert bool(ok)
  np.testing.assert_array_equal(np.asarray(total), _plain_sum(q, ~dropped))


def test_too_many_dropouts_abort_instead_of_a_wrong_sum():
  m, k, t = 6, 4, 3
  q = _q(m, 100)
  dropped = jnp.array([True, True, True, True, False, False])
  total, ok, _ = secagg.secure_sum(q, dropped, jax.random.key(0), k, t)
  assert not bool(ok) and not np.asarray(total).any()
  # Through the aggregator: the round's aggregate is zero and the abort is reported.
  agg = secagg.secure_mean(k, t, clip_range=1.0, cohort_size=m)
  u = {"w": jnp.full((m, 5), 0.3)}
  out, _, info = jax.jit(agg.apply)(u, jnp.ones(m), (), jax.random.key(0), {"client_ctx": {"dropped": dropped}})
  assert int(info["secagg_aborted"]) == 1 and not np.asarray(out["w"]).any()
  # Too few senders for the distributed noise also aborts.
  agg = secagg.secure_mean(k, t, clip_range=1.0, cohort_size=m, min_survivors=6)
  _, _, info = agg.apply(u, jnp.ones(m), (), jax.random.key(0),
                         {"client_ctx": {"dropped": jnp.array([True] + [False] * 5)}})
  assert int(info["secagg_aborted"]) == 1


def test_quantisation_round_trip_error_bound_and_unbiasedness():
  m, d, r = 8, 5000, 1.0
  f = secagg.default_frac_bits(m, r)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (m, d)), jnp.float32)
  q, clamped = jax.vmap(lambda v, k: secagg.quantize(v, r, f, k))(x, jax.random.split(jax.random.key(0), m))
  assert int(clamped.sum()) == 0
  ring_sum = jnp.sum(q, axis=0)  # wraps mod 2^32
  err = np.asarray(secagg.dequantize(ring_sum, f)) - np.asarray(x, np.float64).sum(0)
  assert np.max(np.abs(err)) <= secagg.quantization_error_bound(m, f)
  assert abs(err.mean()) < 4 * err.std() / np.sqrt(d)  # stochastic rounding is unbiased
  # Coarse grid: rounding is visibly stochastic, still within the bound and unbiased.
  q3 = secagg.quantize(jnp.full(20_000, 0.3), r, 3, jax.random.key(1))[0]
  vals = np.asarray(secagg.dequantize(q3, 3))
  assert set(np.unique(vals)) == {0.25, 0.375} and abs(vals.mean() - 0.3) < 0.002


def test_secure_mean_matches_plain_mean_within_quantisation_bound():
  m, k, t = 6, 4, 3
  rng = np.random.default_rng(2)
  u = {"w": jnp.asarray(rng.uniform(-0.5, 0.5, (m, 3, 4)), jnp.float32), "b": jnp.asarray(rng.uniform(-0.5, 0.5, (m, 4)), jnp.float32)}
  dropped = jnp.array([False, True, False, False, False, False])
  agg = secagg.secure_mean(k, t, clip_range=0.5, cohort_size=m)
  out, _, info = jax.jit(agg.apply)(u, jnp.ones(m), (), jax.random.key(4), {"client_ctx": {"dropped": dropped}})
  alive = ~np.asarray(dropped)
  bound = float(info["secagg_error_bound"]) / alive.sum()
  for key in u:
    np.testing.assert_allclose(np.asarray(out[key]), np.asarray(u[key])[alive].mean(0), atol=bound, rtol=0)
  assert int(info["secagg_aborted"]) == 0 and int(info["secagg_survivors"]) == 5


def test_bytes_per_client():
  b = secagg.bytes_per_client(1000, num_neighbors=4)
  assert b["masked_input"] == 4000 and b["plain"] == 4000
  assert b["total"] == 32 + 2 * 4 * 16 + 4000 + 4 * 16


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=2), "threshold"),  # not a majority of 4
    (dict(threshold=5), "threshold"),
    (dict(frac_bits=30), "frac_bits"),  # the sum of 6 clients would overflow
    (dict(clip_range=0.0), "clip_range"),
    (dict(num_neighbors=6, threshold=4), "num_neighbors"),  # more neighbours than the cohort has
])
def test_bad_secagg_parameters_raise(kwargs, match):
  args = dict(num_neighbors=4, threshold=3, clip_range=1.0, cohort_size=6)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    secagg.secure_mean(**args)
