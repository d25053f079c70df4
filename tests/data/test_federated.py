import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_health.data.federated import (BatchPlanSpec, FederatedDataset, from_client_arrays, make_batch_plan,
                                          sample_cohort)


def _dataset(sizes):
  arrays = [{"x": np.full((s, 2), c, np.float32), "y": np.arange(s)} for c, s in enumerate(sizes)]
  return from_client_arrays(arrays)


def test_dataset_offsets_and_views():
  ds = _dataset([3, 0, 5])
  np.testing.assert_array_equal(ds.offsets, [0, 3, 3, 8])
  assert ds.num_clients == 3 and ds.num_examples == 8
  np.testing.assert_array_equal(ds.client(2)["x"][:, 0], [2] * 5)
  np.testing.assert_array_equal(ds.client_of_example(), [0, 0, 0, 2, 2, 2, 2, 2])
  sub = ds.select_clients([2, 0])
  np.testing.assert_array_equal(sub.client_sizes, [5, 3])
  assert ds.pooled().num_clients == 1


@pytest.mark.parametrize("offsets, msg", [([1, 3], "start at 0"), ([0, 3, 2], "non-decreasing"), ([0, 4], "rows")])
def test_dataset_rejects_bad_offsets(offsets, msg):
  with pytest.raises(ValueError, match=msg):
    FederatedDataset({"x": np.zeros((3, 1))}, np.array(offsets))


@pytest.mark.parametrize("epochs", [1, 3])
def test_epoch_plan_visits_every_example_exactly_epochs_times(epochs):
  sizes = np.array([7, 1, 0, 12])
  spec = BatchPlanSpec.create(sizes, batch_size=4, num_epochs=epochs)
  assert spec.num_steps == int(np.ceil(epochs * 12 / 4))
  pos, mask = make_batch_plan(jax.random.key(0), jnp.asarray(sizes), spec)
  assert pos.shape == mask.shape == (4, spec.num_steps, 4)
  pos, mask = np.asarray(pos), np.asarray(mask)
  for c, n in enumerate(sizes):
    visited = pos[c][mask[c]]
    assert mask[c].sum() == epochs * n
    np.testing.assert_array_equal(np.bincount(visited, minlength=n)[:n], np.full(n, epochs))
    # each epoch is a full pass: the first n valid slots are a permutation
    if n:
      np.testing.assert_array_equal(np.sort(visited[:n]), np.arange(n))


def test_step_plan_gives_every_nonempty_client_all_steps():
  sizes = np.array([3, 0, 50])
  spec = BatchPlanSpec.create(sizes, batch_size=5, num_epochs=None, num_steps=7)
  pos, mask = make_batch_plan(jax.random.key(1), jnp.asarray(sizes), spec)
  mask = np.asarray(mask)
  assert mask[0].all() and not mask[1].any() and mask[2].all()
  assert np.asarray(pos)[0].max() < 3


def test_plans_differ_across_keys_and_clients():
  sizes = jnp.array([20, 20])
  spec = BatchPlanSpec.create(np.array([20, 20]), 5, num_epochs=1)
  p1, _ = make_batch_plan(jax.random.key(0), sizes, spec)
  p2, _ = make_batch_plan(jax.random.key(1), sizes, spec)
  assert not np.array_equal(p1, p2)
  assert not np.array_equal(p1[0], p1[1])


def test_sample_cohort_distinct_and_weighted():
  c = np.asarray(sample_cohort(jax.random.key(0), 100, 30))
  assert len(set(c.tolist())) == 30 and c.min() >= 0 and c.max() < 100
  w = jnp.zeros(100).at[:5].set(1.0)
  c = np.asarray(sample_cohort(jax.random.key(0), 100, 5, w))
  assert sorted(c.tolist()) == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match="cohort_size"):
    sample_cohort(jax.random.key(0), 10, 11)


@pytest.mark.parametrize("kw, msg", [(dict(batch_size=0, num_epochs=1), "batch_size"),
                                     (dict(batch_size=2, num_epochs=0), "num_epochs"),
                                     (dict(batch_size=2, num_epochs=None, num_steps=0), "num_steps"),
                                     (dict(batch_size=2, num_epochs=1, num_steps=3), "exactly one")])
def test_plan_spec_validation(kw, msg):
  with pytest.raises(ValueError, match=msg):
    BatchPlanSpec.create(np.array([3, 4]), **kw)


def test_packed_argsort_is_the_stable_argsort():
  """The plan's fast permutation (one uint32 sort) equals the stable argsort it replaces, ties,
  invalid slots and several passes included: per-client step sequences are unchanged."""
  from fedjax_health.data import federated as fed
  keys = jax.random.split(jax.random.key(3), 400)
  u = jax.vmap(lambda k: jax.random.uniform(k, (2, 300)))(keys)
  u = u.at[:, 0, 5].set(u[:, 0, 7])  # a tie: broken by index, as the stable argsort does
  n = jnp.asarray(np.random.default_rng(0).integers(0, 301, 400))
  valid = jnp.arange(300)[None, None, :] < n[:, None, None]
  got = fed._packed_argsort(u, valid, 9)
  ref = jnp.argsort(jnp.where(valid, u, 2.0), axis=-1, stable=True)
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("n,idx_bits", [(1500, 11), (3000, 16)])
def test_packed_argsort_with_truncated_keys_is_the_stable_argsort(n, idx_bits):
  """Long rows keep only u's top bits in the key; the transposition passes restore (u, index) order,
  runs of three equal top bits and exact ties included."""
  from fedjax_health.data import federated as fed
  rng = np.random.default_rng(1)
  u = np.floor(rng.random((6, 2, n)) * 2 ** 23) / 2 ** 23
  step = 2.0 ** -(23 - (23 + idx_bits - 32))  # same top bits, different low bits
  u[:, :, 10:13] = u[:, :, 10:11] + np.array([2, 1, 0]) * 2 ** -23  # a reversed run of three
  u[:, 0, 20] = u[:, 0, 21]  # an exact tie
  u[:, 1, 30] = np.floor(u[:, 1, 30] / step) * step
  u = jnp.asarray(u.astype(np.float32))
  valid = jnp.arange(n)[None, None, :] < jnp.asarray(rng.integers(0, n + 1, 6))[:, None, None]
  got = fed._packed_argsort(u, valid, idx_bits)
  np.testing.assert_array_equal(got, jnp.argsort(jnp.where(valid, u, 2.0), axis=-1, stable=True))


@pytest.mark.parametrize("epochs,steps", [(1, None), (3, None), (None, 40)])
def test_plan_sorting_prefixes_equals_whole_rows(epochs, steps):
  """A heavy-tailed spec sorts each client's first ``sort_prefix`` slots and whole rows only for the
  ``sort_large`` longest clients: the same plan as sorting every row whole, also for a cohort with
  more long clients than the spec counts (a client drawn twice: the whole-row fallback)."""
  import dataclasses
  sizes = np.concatenate([np.full(60, 3), np.arange(1, 30), [200, 300, 450]])
  spec = BatchPlanSpec.create(sizes, 4, num_epochs=epochs, num_steps=steps)
  assert spec.sort_prefix and spec.sort_large == int(np.sum(sizes > spec.sort_prefix)) > 0
  whole = dataclasses.replace(spec, sort_prefix=0, sort_large=0)
  plan = jax.jit(make_batch_plan, static_argnums=2)
  last = len(sizes) - 1
  cohorts = [np.arange(len(sizes)), np.r_[np.arange(last - 2), [last] * 4]]  # 4 long clients, 3 counted
  for cohort in cohorts:
    for k in range(2):
      got = plan(jax.random.key(k), jnp.asarray(sizes[cohort]), spec)
      ref = plan(jax.random.key(k), jnp.asarray(sizes[cohort]), whole)
      np.testing.assert_array_equal(got[0], ref[0])
      np.testing.assert_array_equal(got[1], ref[1])
  assert BatchPlanSpec.create(np.full(10, 5), 4).sort_prefix == 0  # equal sizes: whole rows
  for bad in (dict(sort_prefix=spec.max_client_size + 1), dict(sort_prefix=-1), dict(sort_large=-2)):
    with pytest.raises(ValueError, match="BatchPlanSpec.sort_prefix must be in"):
      make_batch_plan(jax.random.key(0), jnp.asarray(sizes), dataclasses.replace(spec, **bad))
