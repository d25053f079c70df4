import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from fedjax_health import models
from fedjax_health.attacks import poisoning as po
from fedjax_health.data.federated import FederatedData, from_client_arrays


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_malicious_fraction_outside_unit_interval_raises(fraction):
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    po.attacker_ctx_fn(10, fraction=fraction)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    po.fixed_malicious_set(10, fraction)


def test_fixed_malicious_set_by_fraction_and_by_ids():
  m = po.fixed_malicious_set(20, 0.25, seed=3)
  assert m.sum() == 5
  np.testing.assert_array_equal(po.fixed_malicious_set(20, 0.25, seed=3), m)  # seeded
  np.testing.assert_array_equal(np.flatnonzero(po.fixed_malicious_set(6, clients=[4, 1])), [1, 4])
  with pytest.raises(ValueError, match="ids in"):
    po.fixed_malicious_set(6, clients=[6])
  with pytest.raises(ValueError, match="honest"):
    po.fixed_malicious_set(2, clients=[0, 1])


def test_fixed_attackers_are_marked_only_in_the_attack_rounds():
  fn = po.attacker_ctx_fn(6, clients=[1, 4], start_round=2, every=2)
  cohort = jnp.array([4, 0, 1, 5])
  for r, expect in [(0, [0, 0, 0, 0]), (1, [0, 0, 0, 0]), (2, [1, 0, 1, 0]), (3, [0, 0, 0, 0]), (4, [1, 0, 1, 0])]:
    ctx = fn(cohort, jnp.asarray(r), jax.random.key(r))
    np.testing.assert_array_equal(np.asarray(ctx["malicious"]), np.array(expect, bool))
    np.testing.assert_array_equal(ctx["client_id"], cohort)
  stop = po.attacker_ctx_fn(6, clients=[1], stop_round=3)
  assert not bool(stop(jnp.array([1]), jnp.asarray(3), jax.random.key(0))["malicious"][0])


def test_per_round_attackers_are_a_fraction_of_each_cohort_redrawn():
  fn = jax.jit(po.attacker_ctx_fn(100, fraction=0.2, per_round=True))
  cohort = jnp.arange(10)
  masks = [np.asarray(fn(cohort, jnp.asarray(r), jax.random.key(r))["malicious"]) for r in range(5)]
  assert all(m.sum() == 2 for m in masks)
  assert len({tuple(m) for m in masks}) > 1


def test_label_flip_only_on_malicious_clients():
  y = jnp.array([0, 1, 2, 2])
  flip_all = po.label_flip(3)
  np.testing.assert_array_equal(flip_all(None, y, None, None, {"malicious": True})[1], [2, 1, 0, 0])
  np.testing.assert_array_equal(flip_all(None, y, None, None, {"malicious": False})[1], y)
  np.testing.assert_array_equal(po.label_flip(3, 2, 0)(None, y, None, None, {"malicious": True})[1], [0, 1, 0, 0])
  with pytest.raises(ValueError, match="both source and target"):
    po.label_flip(3, source=1)


def test_pixel_patch_sets_exactly_the_corner_square():
  x = jnp.zeros((2, 6, 6, 1))
  out = np.asarray(po.pixel_patch(size=2, value=1.0, margin=1)(x))
  expect = np.zeros((6, 6))
  expect[3:5, 3:5] = 1.0
  np.testing.assert_array_equal(out[0, ..., 0], expect)
  np.testing.assert_array_equal(out[1, ..., 0], expect)
  out = np.asarray(po.pixel_patch(size=1, value=0.5, corner="top_left", margin=0)(x))
  assert out[0, 0, 0, 0] == 0.5 and out.sum() == 1.0
  with pytest.raises(ValueError, match="does not fit"):
    po.pixel_patch(size=6, margin=1)(x)


def test_feature_trigger_sets_the_given_features():
  x = jnp.arange(12.0).reshape(3, 4)
  out = np.asarray(po.feature_trigger([1, 3], [9.0, -9.0])(x))
  np.testing.assert_array_equal(out[:, 1], 9.0)
  np.testing.assert_array_equal(out[:, 3], -9.0)
  np.testing.assert_array_equal(out[:, [0, 2]], np.asarray(x)[:, [0, 2]])


def test_backdoor_stamps_and_relabels_a_fraction_of_malicious_batches_only():
  x = jnp.zeros((4000, 4))
  y = jnp.zeros(4000, jnp.int32)
  trig = po.feature_trigger([0], [5.0])
  full = po.backdoor(trig, target=1, poison_fraction=1.0)
  xo, yo = full(x, y, None, jax.random.key(0), {"malicious": True})
  assert np.all(np.asarray(xo)[:, 0] == 5.0) and np.all(np.asarray(yo) == 1)
  xo, yo = full(x, y, None, jax.random.key(0), {"malicious": False})
  assert np.all(np.asarray(xo) == 0) and np.all(np.asarray(yo) == 0)
  half = po.backdoor(trig, target=1, poison_fraction=0.3)
  xo, yo = half(x, y, None, jax.random.key(1), {"malicious": True})
  poisoned = np.asarray(xo)[:, 0] == 5.0
  np.testing.assert_array_equal(poisoned, np.asarray(yo) == 1)  # stamped <=> relabelled
  assert abs(poisoned.mean() - 0.3) < 0.03
  with pytest.raises(ValueError, match="poison_fraction"):
    po.backdoor(trig, 1, 0.0)


def test_edge_case_replaces_inputs_with_pool_examples():
  pool = jnp.array([[7.0, 7.0], [8.0, 8.0]])
  x, y = jnp.zeros((500, 2)), jnp.zeros(500, jnp.int32)
  xo, yo = po.edge_case(pool, target=2, poison_fraction=0.5)(x, y, None, jax.random.key(0), {"malicious": True})
  xo, yo = np.asarray(xo), np.asarray(yo)
  replaced = xo[:, 0] > 0
  assert 0.4 < replaced.mean() < 0.6
  assert set(np.unique(xo[replaced, 0])) == {7.0, 8.0}
  np.testing.assert_array_equal(yo[replaced], 2)
  np.testing.assert_array_equal(yo[~replaced], 0)


def test_knn_distance_equals_sklearn():
  rng = np.random.default_rng(0)
  ref, q = rng.normal(size=(30, 3)), rng.normal(size=(7, 3))
  nn = NearestNeighbors(n_neighbors=4).fit(ref)
  np.testing.assert_allclose(po.knn_distance(q, ref, 4), nn.kneighbors(q)[0].mean(1), rtol=1e-6)
  d_self = nn.kneighbors(ref, n_neighbors=5)[0][:, 1:].mean(1)  # drop the zero self-distance
  np.testing.assert_allclose(po.knn_distance(ref, ref, 4, exclude_self=True), d_self, rtol=1e-6, atol=1e-9)


def _toy_data():
  rng = np.random.default_rng(0)
  def client(n, far):
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.int32)
    x[:far] = 40.0 + rng.normal(size=(far, 2))  # far-away members of class 0 (rows 0, 2 are class 0)
    y[:far] = 0
    return {"x": x, "y": y}
  train = from_client_arrays([client(40, 2), client(40, 1), client(30, 0)])
  test = from_client_arrays([client(20, 1), client(20, 0), client(10, 0)])
  return FederatedData(train, test, num_classes=2)


def test_split_edge_cases_moves_the_low_density_tail_to_the_attacker():
  data = _toy_data()
  new, pool, test_edge = po.split_edge_cases(data, source_class=0, quantile=0.95, k=5)
  far = np.all(pool > 20, axis=1)
  assert far.sum() == 3 and len(pool) <= 4  # the three planted far points (+ at most one border case)
  assert new.train.num_examples == data.train.num_examples - len(pool)
  assert not np.any(np.all(new.train.x > 20, axis=1))
  np.testing.assert_array_equal(new.train.offsets[-1], new.train.num_examples)
  assert np.all(test_edge[0] > 20) and not np.any(np.all(new.test.x > 20, axis=1))
  with pytest.raises(ValueError, match="quantile"):
    po.split_edge_cases(data, source_class=0, quantile=1.0)


def test_attack_success_rate_counts_target_predictions_on_non_target_inputs():
  model = models.get_model("logreg", 2, (2,))
  params = {"head": {"kernel": jnp.array([[1.0], [0.0]]), "bias": jnp.zeros(1)}}  # class 1 iff x0 > 0
  x = np.array([[-1.0, 0], [-2.0, 0], [-3.0, 0], [1.0, 0]], np.float32)
  y = np.array([0, 0, 0, 1])
  trig = po.feature_trigger([0], [2.0])
  xt = po.triggered_inputs(x, y, trig, target=1)
  assert xt.shape == (3, 2)  # the input already of class 1 is excluded
  assert float(po.attack_success_rate(model.apply, params, jnp.asarray(xt), 1)) == 1.0
  half = jnp.asarray(np.array([[2.0, 0], [-2.0, 0]], np.float32))
  assert float(po.attack_success_rate(model.apply, params, half, 1)) == 0.5
  assert np.isnan(float(po.attack_success_rate(model.apply, params, jnp.zeros((0, 2)), 1)))
