import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_health.algorithms import state as state_lib


def test_gather_scatter_round_trip_touches_only_the_cohort():
  states = {"a": jnp.arange(12.0).reshape(6, 2), "b": jnp.arange(6, dtype=jnp.int32)}
  cohort = jnp.asarray([4, 1, 3])
  rows = state_lib.gather(states, cohort)
  np.testing.assert_array_equal(rows["a"], np.arange(12.0).reshape(6, 2)[[4, 1, 3]])
  new = {"a": rows["a"] * -1, "b": rows["b"] + 100}
  out = state_lib.scatter(states, cohort, new)
  ref_a = np.arange(12.0).reshape(6, 2)
  ref_a[[4, 1, 3]] *= -1
  np.testing.assert_array_equal(out["a"], ref_a)
  np.testing.assert_array_equal(out["b"], [0, 101, 2, 103, 104, 5])
  assert out["b"].dtype == jnp.int32


def test_scatter_keep_mask_leaves_rejected_rows():
  states = {"v": jnp.zeros((4, 3))}
  out = state_lib.scatter(states, jnp.asarray([2, 0]), {"v": jnp.ones((2, 3))}, keep=jnp.asarray([False, True]))
  np.testing.assert_array_equal(out["v"][:, 0], [1.0, 0.0, 0.0, 0.0])


def test_broadcast_and_num_clients():
  s = state_lib.broadcast_to_clients({"w": jnp.ones((2, 3)), "alpha": 0.5}, 5)
  assert s["w"].shape == (5, 2, 3) and s["alpha"].shape == (5,)
  assert state_lib.num_clients_of(s) == 5
  with pytest.raises(ValueError, match="num_clients"):
    state_lib.broadcast_to_clients({"w": jnp.ones(2)}, 0)
  with pytest.raises(ValueError, match="disagree"):
    state_lib.num_clients_of({"a": jnp.ones((2, 1)), "b": jnp.ones((3,))})
