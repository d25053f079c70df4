import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedjax_health.aggregators import base as agg_base
from fedjax_health.aggregators import clustered as cl


def _np_kmeans_step(points, weights, centers, distance):
  """Slow reference: a Python loop over points and clusters."""
  n, k = points.shape[0], centers.shape[0]
  assign = np.zeros(n, np.int64)
  objective = 0.0
  for i in range(n):
    if distance == "l2":
      d = [float(np.sum((points[i] - centers[j]) ** 2)) for j in range(k)]
    else:
      d = [1.0 - float(points[i] @ centers[j] / (np.linalg.norm(points[i]) * np.linalg.norm(centers[j])))
           for j in range(k)]
    assign[i] = int(np.argmin(d))
    objective += weights[i] * d[assign[i]]
  new = centers.copy()
  for j in range(k):
    members = assign == j
    if weights[members].sum() > 0:
      new[j] = (weights[members, None] * points[members]).sum(0) / weights[members].sum()
  return assign, new, objective


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("n, k, p", [(7, 3, 5), (12, 4, 2), (3, 3, 8)])
def test_kmeans_step_equals_numpy_reference(distance, n, k, p):
  rng = np.random.default_rng(n + k)
  points = rng.normal(size=(n, p)).astype(np.float32)
  weights = rng.integers(0, 5, n).astype(np.float32)  # zero weights: assigned but do not move centres
  centers = rng.normal(size=(k, p)).astype(np.float32)
  assign, new, obj = cl.kmeans_step(jnp.asarray(points), jnp.asarray(weights), jnp.asarray(centers), distance)
  ref_assign, ref_new, ref_obj = _np_kmeans_step(points, weights, centers, distance)
  np.testing.assert_array_equal(np.asarray(assign), ref_assign)
  np.testing.assert_allclose(np.asarray(new), ref_new, rtol=1e-5, atol=1e-5)
  assert float(obj) == pytest.approx(ref_obj, rel=1e-5, abs=1e-5)


def test_kmeans_iterations_do_not_increase_objective_and_find_separated_blobs():
  rng = np.random.default_rng(0)
  means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  truth = np.repeat(np.arange(3), 6)
  points = jnp.asarray(means[truth] + 0.1 * rng.normal(size=(18, 2)), jnp.float32)
  w = jnp.ones(18)
  seeds = cl.kmeans_plusplus_init(jax.random.key(0), points, w, 3)
  objs, c = [], seeds
  for _ in range(4):
    _, c, o = cl.kmeans_step(points, w, c)
    objs.append(float(o))
  assert all(b <= a + 1e-5 for a, b in zip(objs, objs[1:]))
  assign, _, _ = cl.kmeans(points, w, seeds, 5)
  assert cl.adjusted_rand_index(truth, np.asarray(assign)) == 1.0


def test_kmeans_plusplus_picks_weighted_points_only():
  points = jnp.arange(12.0).reshape(6, 2)
  w = jnp.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
  seeds = np.asarray(cl.kmeans_plusplus_init(jax.random.key(3), points, w, 3))
  rows = {tuple(r) for r in np.asarray(points)[[1, 3, 5]]}
  assert {tuple(s) for s in seeds} == rows  # three distinct positive-weight points


def test_per_cluster_mean_matches_loop():
  rng = np.random.default_rng(1)
  updates = {"a": jnp.asarray(rng.normal(size=(6, 3, 2)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
  w = jnp.asarray([1.0, 2.0, 0.0, 3.0, 1.0, 4.0])
  assign = jnp.asarray([0, 2, 0, 2, 0, 2])
  agg, _, info = cl.per_cluster_mean(3).apply(updates, w, agg_base.EmptyState(), jax.random.key(0),
                                              {"client_ctx": {"cluster": assign}})
  for key in updates:
    u = np.asarray(updates[key])
    for k in range(3):
      m = np.asarray(assign) == k
      ref = (np.asarray(w)[m].reshape((-1,) + (1,) * (u.ndim - 1)) * u[m]).sum(0) / max(np.asarray(w)[m].sum(), 1e-12)
      np.testing.assert_allclose(np.asarray(agg[key][k]), ref if m.any() else 0 * u[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(info["cluster_weight"]), [2.0, 0.0, 9.0])


def test_multicenter_kmeans_moves_centres_to_cluster_means():
  centers = {"w": jnp.asarray([[0.0, 0.0], [5.0, 5.0]])}
  start = jnp.asarray([0, 0, 1, 1])
  # Client models: two near (1, 0), two near (6, 5); updates are relative to the start centre.
  models = np.array([[1.0, 0.0], [1.2, 0.0], [6.0, 5.0], [6.2, 5.0]], np.float32)
  updates = {"w": jnp.asarray(models) - centers["w"][start]}
  agg_fn = cl.multicenter_kmeans(2, num_iters=3)
  state = cl.KMeansState(jnp.ones((), bool))  # already initialised: warm start from the centres
  agg, _, info = agg_fn.apply(updates, jnp.ones(4), state, jax.random.key(0),
                              {"params": centers, "client_ctx": {"cluster": start}})
  np.testing.assert_array_equal(np.asarray(info["assignment"]), [0, 0, 1, 1])
  np.testing.assert_allclose(np.asarray(centers["w"] + agg["w"]), [[1.1, 0.0], [6.1, 5.0]], atol=1e-6)
  assert float(info["kmeans_objective"]) == pytest.approx(4 * 0.01, abs=1e-5)


def test_multicenter_first_round_seeds_with_kmeans_plusplus():
  same = {"w": jnp.zeros((2, 2))}  # all centres equal before the first round
  models = jnp.asarray([[1.0, 0.0], [1.2, 0.0], [6.0, 5.0], [6.2, 5.0]])
  agg_fn = cl.multicenter_kmeans(2)
  agg, state, info = agg_fn.apply({"w": models}, jnp.ones(4), agg_fn.init(None), jax.random.key(1),
                                  {"params": same, "client_ctx": {"cluster": jnp.zeros(4, jnp.int32)}})
  assert bool(state.initialized)
  assert cl.adjusted_rand_index([0, 0, 1, 1], np.asarray(info["assignment"])) == 1.0


@pytest.mark.parametrize("fn, kw, msg", [(cl.per_cluster_mean, dict(num_clusters=0), "num_clusters"),
                                         (cl.multicenter_kmeans, dict(num_clusters=2, num_iters=0), "num_iters"),
                                         (cl.multicenter_kmeans, dict(num_clusters=2, num_restarts=0), "num_restarts"),
                                         (cl.multicenter_kmeans, dict(num_clusters=2, distance="l1"), "distance")])
def test_factories_validate(fn, kw, msg):
  with pytest.raises(ValueError, match=msg):
    fn(**kw)


def test_more_clusters_than_clients_is_an_error():
  with pytest.raises(ValueError, match=r"num_clusters \(5\) must be <= the number of clients \(4\)"):
    cl.check_num_clusters(5, 4)


def _np_sattler_bipartition(sim, members):
  """Sattler et al.'s loop: merge the groups of the most similar pair until two groups remain."""
  idx = [i for i in range(len(members)) if members[i]]
  groups = [{i} for i in idx]
  pairs = sorted(((sim[a, b], a, b) for a in idx for b in idx if a < b), reverse=True)
  for _, a, b in pairs:
    if len(groups) <= 2:
      break
    ga = next(g for g in groups if a in g)
    gb = next(g for g in groups if b in g)
    if ga is not gb:
      groups.remove(ga)
      groups.remove(gb)
      groups.append(ga | gb)
  first = next(g for g in groups if idx[0] in g)
  return np.array([members[i] and i not in first for i in range(len(members))])


_bipartition = jax.jit(cl.bipartition)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 1.0))
def test_bipartition_equals_sattler_merge_loop(seed, share):
  n = 9  # one shape, one compile; the member mask varies the effective size from 0 to 9
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(n, 4))
  sim = np.asarray(cl.cosine_similarity(jnp.asarray(v), jnp.asarray(v)), np.float64)
  members = rng.random(n) < share
  got = np.asarray(_bipartition(jnp.asarray(sim, jnp.float32), jnp.asarray(members)))
  sim = np.asarray(jnp.asarray(sim, jnp.float32), np.float64)
  if members.sum() < 2:
    assert not got.any()
  else:
    np.testing.assert_array_equal(got, _np_sattler_bipartition(sim, members))


def test_bipartition_separates_two_directions():
  rng = np.random.default_rng(0)
  ups = np.concatenate([[1.0, 0.0] + 0.1 * rng.normal(size=(4, 2)), [-1.0, 0.2] + 0.1 * rng.normal(size=(3, 2))])
  sim = cl.cosine_similarity(jnp.asarray(ups), jnp.asarray(ups))
  got = np.asarray(cl.bipartition(sim, jnp.ones(7, bool)))
  np.testing.assert_array_equal(got, [False] * 4 + [True] * 3)


def test_adjusted_rand_index_matches_sklearn():
  sk = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  cases = [([0, 0, 0], [1, 1, 1]), ([0, 1, 2], [0, 1, 2]), ([0], [3]), ([0, 0, 1, 1], [1, 1, 0, 0]),
           ([0, 1, 2, 3], [0, 0, 0, 0]), ([0, 0, 0, 0], [0, 1, 2, 3])]
  for _ in range(30):
    n = int(rng.integers(2, 40))
    cases.append((rng.integers(0, rng.integers(1, 5), n), rng.integers(0, rng.integers(1, 6), n)))
  for t, p in cases:
    assert cl.adjusted_rand_index(t, p) == pytest.approx(sk.adjusted_rand_score(t, p), abs=1e-12)
  with pytest.raises(ValueError, match="length"):
    cl.adjusted_rand_index([0, 1], [0])
