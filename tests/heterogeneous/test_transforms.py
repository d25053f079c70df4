import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_health import models
from fedjax_health.heterogeneous import transforms as T


def _np_class_means(v, y, m, k):
  out, counts = np.zeros((k, v.shape[1])), np.zeros(k)
  for i in range(len(y)):
    if m[i]:
      out[y[i]] += v[i]
      counts[y[i]] += 1
  for c in range(k):
    if counts[c]:
      out[c] /= counts[c]
  return out, counts


def test_class_means_match_numpy_loop():
  rng = np.random.default_rng(0)
  v, y, m = rng.normal(size=(20, 3)), rng.integers(0, 4, 20), rng.random(20) > 0.3
  y[y == 2] = 0  # class 2 absent
  got, counts = T.class_means(jnp.asarray(v), jnp.asarray(y), jnp.asarray(m), 4)
  want, want_counts = _np_class_means(v, y, m, 4)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(counts, want_counts)
  assert counts[2] == 0 and np.all(np.asarray(got)[2] == 0)


def _np_aggregate(protos, counts, weighted):
  c, k, d = protos.shape
  out, present = np.zeros((k, d)), np.zeros(k, bool)
  for j in range(k):
    num, den = np.zeros(d), 0.0
    for i in range(c):
      if counts[i, j] > 0:
        w = counts[i, j] if weighted else 1.0
        num += w * protos[i, j]
        den += w
    if den > 0:
      out[j], present[j] = num / den, True
  return out, present


@pytest.mark.parametrize("weighted", [True, False])
def test_prototype_aggregation_with_missing_classes_matches_numpy_loop(weighted):
  rng = np.random.default_rng(1)
  protos = rng.normal(size=(5, 4, 3))
  counts = rng.integers(1, 9, size=(5, 4)).astype(float)
  counts[0, 1] = counts[2, 1] = counts[4, 3] = 0  # clients missing classes
  counts[:, 2] = 0  # a class nobody holds
  got, present = T.aggregate_prototypes(jnp.asarray(protos), jnp.asarray(counts), weighted)
  want, want_present = _np_aggregate(protos, counts, weighted)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(present, want_present)
  # The missing client's (garbage) prototype must not leak in: changing it changes nothing.
  protos2 = protos.copy()
  protos2[0, 1] = 1e3
  np.testing.assert_allclose(T.aggregate_prototypes(jnp.asarray(protos2), jnp.asarray(counts), weighted)[0], got,
                             atol=1e-5)


def test_aggregation_and_teachers_do_not_depend_on_client_order():
  rng = np.random.default_rng(2)
  protos, counts = rng.normal(size=(6, 3, 2)), rng.integers(0, 4, size=(6, 3)).astype(float)
  logits = rng.normal(size=(6, 3, 3))
  perm = rng.permutation(6)
  for weighted in (True, False):
    a = T.aggregate_prototypes(jnp.asarray(protos), jnp.asarray(counts), weighted)
    b = T.aggregate_prototypes(jnp.asarray(protos[perm]), jnp.asarray(counts[perm]), weighted)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
  t, v = T.leave_one_out_label_logits(jnp.asarray(logits), jnp.asarray(counts))
  tp, vp = T.leave_one_out_label_logits(jnp.asarray(logits[perm]), jnp.asarray(counts[perm]))
  np.testing.assert_allclose(np.asarray(t)[perm], tp, atol=1e-6)  # equivariant: each client keeps its teacher
  np.testing.assert_array_equal(np.asarray(v)[perm], vp)


def test_fd_teachers_leave_the_client_out():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 2, 2))
  counts = np.array([[3, 0], [1, 2], [0, 5], [2, 2]], float)
  t, v = T.leave_one_out_label_logits(jnp.asarray(logits), jnp.asarray(counts))
  for i, l in itertools.product(range(4), range(2)):
    others = [j for j in range(4) if j != i and counts[j, l] > 0]
    assert bool(v[i, l]) == bool(others)
    if others:
      np.testing.assert_allclose(t[i, l], np.mean(logits[others, l], axis=0), atol=1e-6)


def test_kl_distillation_zero_for_identical_models_and_matches_numpy():
  model = models.get_model("mlp", 3, (5,), hidden=(4,))
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (7, 5))
  stacked = jax.tree.map(lambda p: jnp.stack([p, p, p]), params)  # three identical client models
  teacher = T.consensus(jax.vmap(lambda p: model.apply(p, x))(stacked))
  np.testing.assert_allclose(T.kl_distillation(model.apply(params, x), teacher, 2.0), 0.0, atol=1e-6)
  s, t = np.random.default_rng(4).normal(size=(2, 6, 3))
  temp = 3.0
  soft = lambda z: np.exp(z / temp) / np.exp(z / temp).sum(-1, keepdims=True)
  want = np.sum(soft(t) * (np.log(soft(t)) - np.log(soft(s))), -1) * temp ** 2
  np.testing.assert_allclose(T.kl_distillation(jnp.asarray(s), jnp.asarray(t), temp), want, rtol=1e-4, atol=1e-6)
  assert float(jnp.min(T.kl_distillation(jnp.asarray(s), jnp.asarray(t), 1.0))) > 0
  # A single binary logit z means logits [0, z].
  z = jnp.asarray([[0.3], [-1.2]])
  np.testing.assert_allclose(T.kl_distillation(z, jnp.asarray([[0.0, 0.3], [0.0, -1.2]])), 0.0, atol=1e-6)


def test_nearest_prototype_skips_absent_classes():
  protos = jnp.asarray([[0.0, 0.0], [5.0, 5.0], [0.1, 0.1]])
  emb = jnp.asarray([[0.09, 0.09], [4.0, 4.0]])
  np.testing.assert_array_equal(T.nearest_prototype(emb, protos, jnp.asarray([True, True, True])), [2, 1])
  np.testing.assert_array_equal(T.nearest_prototype(emb, protos, jnp.asarray([True, True, False])), [0, 1])


def test_bytes_closed_forms():
  assert T.fd_bytes(2) == (2 * 2 * 4 + 2 * 4,) * 2
  assert T.fedproto_bytes(5, 32) == (5 * 32 * 4 + 5 * 4,) * 2
  assert T.fedmd_bytes(64, 3) == (64 * 3 * 4,) * 2
  params = models.get_model("mlp", 2, (13,), hidden=(32, 13)).init(jax.random.key(0))
  n = 13 * 32 + 32 + 32 * 13 + 13 + 13 * 2 + 2
  assert T.fedavg_bytes(params) == (4 * n, 4 * n)
