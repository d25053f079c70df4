import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from hypothesis import given, settings, strategies as st

from fedjax_health.aggregators import robust


def _tree(flat):
  """Splits a [C, 5] matrix into a two-leaf pytree so unflattening is exercised."""
  flat = jnp.asarray(flat, jnp.float32)
  return {"a": flat[:, :2].reshape(-1, 2, 1), "b": flat[:, 2:]}


def _flat(tree):
  return np.concatenate([np.asarray(tree["a"]).reshape(-1), np.asarray(tree["b"]).reshape(-1)])


def _apply(agg, flat, weights=None):
  flat = np.asarray(flat, np.float32)
  w = jnp.ones(flat.shape[0]) if weights is None else jnp.asarray(weights, jnp.float32)
  out, _, info = agg.apply(_tree(flat), w, agg.init(None), jax.random.key(0), {})
  return _flat(out), info


# ---------------------------------------------------------------- slow references


def _np_krum_scores(x, f):
  n = len(x)
  scores = []
  for i in range(n):
    d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
    scores.append(sum(d[:n - f - 2]))
  return np.array(scores)


def _np_bulyan(x, f):
  n = len(x)
  theta, beta = n - 2 * f, n - 4 * f
  remaining, selected = list(range(n)), []
  for _ in range(theta):
    sub = x[remaining]
    m = len(remaining)
    k = min(max(m - f - 2, 1), m - 1)
    scores = []
    for i in range(m):
      d = sorted(float(np.sum((sub[i] - sub[j]) ** 2)) for j in range(m) if j != i)
      scores.append(sum(d[:k]))
    totals = [sum(float(np.sum((sub[i] - sub[j]) ** 2)) for j in range(m)) for i in range(m)]
    pick = remaining[min(range(m), key=lambda i: (scores[i], totals[i]))]  # ties: total distance
    selected.append(pick)
    remaining.remove(pick)
  s = x[selected]
  out = np.empty(x.shape[1])
  for c in range(x.shape[1]):
    med = np.median(s[:, c])
    closest = sorted(s[:, c], key=lambda v: abs(v - med))[:beta]
    out[c] = np.mean(closest)
  return out, sorted(selected)


def _np_weiszfeld(x, a, iters, nu=1e-6):
  a = a / a.sum()
  z = a @ x
  for _ in range(iters):
    b = np.array([a[i] / max(nu, np.linalg.norm(z - x[i])) for i in range(len(x))])
    z = (b @ x) / b.sum()
  return z


# ---------------------------------------------------------------- tests


def test_pairwise_sq_dists_equals_numpy():
  x = np.random.default_rng(0).normal(size=(6, 9)).astype(np.float32) + 3.0
  ref = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
  np.testing.assert_allclose(robust.pairwise_sq_dists(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-4)


def test_krum_picks_the_known_point():
  # Hand-computed: with f=1 each client sums its 3 nearest squared distances; the centre of the
  # square scores 4 * 0.5 -> 1.5, a corner 0.5 + 1 + 1 = 2.5, the outlier ~2e4.
  x = np.array([[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0.5, 0.5, 0, 0, 0],
                [100, 100, 0, 0, 0]], np.float32)
  out, info = _apply(robust.krum(1, 6), x)
  np.testing.assert_allclose(out, x[4])
  np.testing.assert_array_equal(np.asarray(info["rejected"]), [1, 1, 1, 1, 0, 1])


@pytest.mark.parametrize("n, f, m", [(7, 1, 1), (9, 2, 3), (12, 3, 5)])
def test_krum_and_multi_krum_equal_numpy_loop(n, f, m):
  x = np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)
  scores = _np_krum_scores(x, f)
  np.testing.assert_allclose(
      robust.krum_scores(robust.pairwise_sq_dists(jnp.asarray(x)), jnp.ones(n, bool), f), scores, rtol=1e-4)
  out, _ = _apply(robust.krum(f, n, num_selected=m), x)
  np.testing.assert_allclose(out, x[np.argsort(scores)[:m]].mean(0), rtol=1e-5, atol=1e-6)


def test_krum_ignores_clients_with_zero_weight():
  x = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
  w = np.array([1, 1, 0, 1, 1, 1, 0, 1.0])
  out, info = _apply(robust.krum(1, 8), x, w)
  keep = np.flatnonzero(w > 0)
  np.testing.assert_allclose(out, x[keep[np.argmin(_np_krum_scores(x[keep], 1))]], rtol=1e-6)
  assert not np.asarray(info["rejected"])[w == 0].any()


@pytest.mark.parametrize("factory, message", [
    (lambda: robust.krum(1, 4), "n > 2f \\+ 2"),
    (lambda: robust.krum(2, 10, num_selected=9), "n - f"),
    (lambda: robust.bulyan(1, 6), "n >= 4f \\+ 3"),
    (lambda: robust.trimmed_mean(4, num_trim=2), "2k < n"),
    (lambda: robust.trimmed_mean(4, trim_fraction=0.5), "0.5"),
    (lambda: robust.trimmed_mean(4), "exactly one"),
    (lambda: robust.norm_bound(0.0), "max_norm"),
    (lambda: robust.geometric_median(nu=0.0), "nu"),
    (lambda: robust.krum(-1, 10), "num_byzantine"),
])
def test_impossible_defences_raise_naming_the_constraint(factory, message):
  with pytest.raises(ValueError, match=message):
    factory()


@pytest.mark.parametrize("n", [1, 4, 7])
def test_median_equals_numpy(n):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  out, _ = _apply(robust.coordinate_median(), x)
  np.testing.assert_allclose(out, np.median(x, axis=0), rtol=1e-6)
  w = (rng.random(n) > 0.4).astype(np.float32)
  w[0] = 1.0
  out, _ = _apply(robust.coordinate_median(), x, w)
  np.testing.assert_allclose(out, np.median(x[w > 0], axis=0), rtol=1e-6)


@pytest.mark.parametrize("n, beta", [(5, 0.2), (10, 0.25), (9, 0.0), (8, 0.4)])
def test_trimmed_mean_equals_scipy(n, beta):
  x = np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)
  out, info = _apply(robust.trimmed_mean(n, trim_fraction=beta), x)
  np.testing.assert_allclose(out, scipy.stats.trim_mean(x, beta, axis=0), rtol=1e-5, atol=1e-6)
  assert int(info["num_trimmed_per_side"]) == int(beta * n)


def test_trimmed_mean_with_dropped_clients_trims_valid_ones_only():
  x = np.random.default_rng(3).normal(size=(9, 5)).astype(np.float32)
  w = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1.0])
  out, _ = _apply(robust.trimmed_mean(9, num_trim=2), x, w)
  s = np.sort(x[w > 0], axis=0)
  np.testing.assert_allclose(out, s[2:-2].mean(0), rtol=1e-5, atol=1e-6)
  # Only 3 valid clients left: k shrinks to 1, i.e. the median.
  w3 = np.array([1, 0, 0, 0, 1, 0, 0, 0, 1.0])
  out, _ = _apply(robust.trimmed_mean(9, num_trim=2), x, w3)
  np.testing.assert_allclose(out, np.median(x[w3 > 0], axis=0), rtol=1e-6)


@pytest.mark.parametrize("weighted", [True, False])
def test_geometric_median_equals_slow_weiszfeld_and_minimises(weighted):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(7, 5)).astype(np.float64)
  x[0] += 50.0  # an outlier the median resists
  w = rng.integers(1, 10, 7).astype(np.float64)
  a = w if weighted else np.ones(7)
  ref = _np_weiszfeld(x, a, 500)
  out, info = _apply(robust.geometric_median(max_iter=500, tol=1e-9, weighted=weighted), x, w)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  objective = lambda z: float(np.sum(a * np.linalg.norm(x - z, axis=1)))
  best = scipy.optimize.minimize(objective, x.mean(0), method="Nelder-Mead",
                                 options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}).x
  assert objective(out) <= objective(best) + 1e-4
  assert int(info["weiszfeld_iterations"]) > 1


def test_geometric_median_iterations_equal_numpy_loop_step_by_step():
  x = np.random.default_rng(5).normal(size=(6, 4))
  for iters in (1, 2, 5):
    z, _ = robust.weiszfeld(jnp.asarray(x, jnp.float32), jnp.ones(6), max_iter=iters, tol=0.0)
    np.testing.assert_allclose(z, _np_weiszfeld(x, np.ones(6), iters), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, f", [(7, 1), (11, 2), (9, 1)])
def test_bulyan_equals_numpy_reference(n, f):
  x = np.random.default_rng(n + f).normal(size=(n, 5)).astype(np.float64)
  ref, selected = _np_bulyan(x, f)
  out, info = _apply(robust.bulyan(f, n), x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.flatnonzero(~np.asarray(info["rejected"])), selected)


def test_norm_bound_clips_to_the_ball_and_keeps_direction():
  x = np.array([[3, 4, 0, 0, 0], [0.3, 0.4, 0, 0, 0]], np.float32)
  t = robust.norm_bound(1.0)
  out, w, _, info = t.apply(_tree(x), jnp.ones(2), t.init(None), jax.random.key(0), {})
  flat = np.concatenate([np.asarray(out["a"]).reshape(2, -1), np.asarray(out["b"])], axis=1)
  np.testing.assert_allclose(flat, [[0.6, 0.8, 0, 0, 0], [0.3, 0.4, 0, 0, 0]], rtol=1e-6)
  assert float(info["fraction_clipped"]) == 0.5


def test_weak_dp_is_clipped_mean_plus_gaussian_noise():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(4, 5)).astype(np.float32) * 3
  w = np.array([1, 2, 3, 4.0])
  clipped = x * np.minimum(1, 1.0 / np.linalg.norm(x, axis=1))[:, None]
  out, _ = _apply(robust.weak_dp(1.0, 0.0), x, w)
  np.testing.assert_allclose(out, (w[:, None] * clipped).sum(0) / w.sum(), rtol=1e-5)
  big = {"u": jnp.zeros((3, 20000))}
  agg = robust.weak_dp(1.0, 0.05)
  noisy, _, _ = agg.apply(big, jnp.ones(3), agg.init(None), jax.random.key(1), {})
  assert abs(float(jnp.std(noisy["u"])) - 0.05) < 0.002


# ---------------------------------------------------------------- properties

_AGGS = {
    "krum": lambda n: robust.krum(1, n),
    "multi_krum": lambda n: robust.krum(1, n, num_selected=3),
    "median": lambda n: robust.coordinate_median(),
    "trimmed_mean": lambda n: robust.trimmed_mean(n, num_trim=1),
    "geometric_median": lambda n: robust.geometric_median(weighted=False),
    "bulyan": lambda n: robust.bulyan(1, n),
}


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(sorted(_AGGS)))
def test_robust_aggregators_are_permutation_invariant(seed, name):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(7, 5)).astype(np.float32)
  perm = rng.permutation(7)
  out, _ = _apply(_AGGS[name](7), x)
  out_p, _ = _apply(_AGGS[name](7), x[perm])
  np.testing.assert_allclose(out, out_p, rtol=1e-4, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(sorted(_AGGS)), scale=st.floats(-1e4, 1e4))
def test_robust_aggregators_stay_within_the_honest_range(seed, name, scale):
  """One byzantine update among 7: coordinate-wise rules stay in range whatever it is; the
  distance-based ones (Krum, Bulyan, RFA) when it is far from the honest cluster."""
  rng = np.random.default_rng(seed)
  honest = rng.normal(size=(6, 5)).astype(np.float32)
  bad = (rng.normal(size=(1, 5)) * scale).astype(np.float32)
  if name in ("krum", "multi_krum", "bulyan", "geometric_median"):
    bad = bad + np.float32(100.0 * np.sign(scale or 1.0))
  x = np.concatenate([honest[:3], bad, honest[3:]])
  out, _ = _apply(_AGGS[name](7), x)
  lo, hi = honest.min(0), honest.max(0)
  if name == "geometric_median":  # RFA only bounds the pull: stays within the honest hull's reach
    assert np.linalg.norm(out - np.median(honest, 0)) <= np.linalg.norm(hi - lo) + 1e-3
  else:
    assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5)


# ---------------------------------------------------------------- run-time cohort (issue 15)


@pytest.mark.parametrize("n, f, absent", [(11, 2, [3, 7]), (12, 2, [1, 5, 10])])
def test_bulyan_with_absent_clients_equals_bulyan_on_the_valid_ones(n, f, absent):
  # theta and beta follow the valid count: weight-0 clients are as if they were not in the stack.
  x = np.random.default_rng(n + f).normal(size=(n, 5)).astype(np.float64)
  w = np.ones(n)
  w[absent] = 0.0
  keep = np.flatnonzero(w > 0)
  ref, selected = _np_bulyan(x[keep], f)
  out, info = _apply(robust.bulyan(f, n), x, w)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.flatnonzero(~np.asarray(info["rejected"]) & (w > 0)), keep[selected])
  assert bool(info["condition_holds"]) == (len(keep) >= 4 * f + 3)


def test_bulyan_reports_when_too_few_valid_clients_remain():
  x = np.random.default_rng(0).normal(size=(7, 5))
  out, info = _apply(robust.bulyan(1, 7), x, [1, 1, 1, 1, 1, 1, 0])
  assert not bool(info["condition_holds"]) and np.all(np.isfinite(out))


@pytest.mark.parametrize("factory, stack, message", [
    (lambda: robust.krum(1, 8), 4, "Krum .* 4 client updates .* n > 2f \\+ 2"),
    (lambda: robust.bulyan(1, 8), 6, "Bulyan .* 6 client updates .* n >= 4f \\+ 3"),
    (lambda: robust.trimmed_mean(8, num_trim=2), 4, "trimmed mean .* 4 client updates .* 2k < n"),
])
def test_rules_check_the_cohort_they_are_run_on(factory, stack, message):
  with pytest.raises(ValueError, match=message):
    _apply(factory(), np.zeros((stack, 5)))


def test_krum_and_trimmed_mean_report_whether_the_condition_held():
  x = np.random.default_rng(0).normal(size=(6, 5))
  assert bool(_apply(robust.krum(1, 6), x)[1]["condition_holds"])
  assert not bool(_apply(robust.krum(1, 6), x, [1, 1, 1, 1, 0, 0])[1]["condition_holds"])
  assert not bool(_apply(robust.trimmed_mean(6, num_trim=2), x, [1, 1, 1, 1, 0, 0])[1]["condition_holds"])
