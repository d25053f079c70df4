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
