"""Checkpoint/resume of model-heterogeneous runs.

The launcher checkpoints every experiment's whole state with ``checkpointing.Checkpointer``
(``simulation.run_experiment``; a round's randomness comes from ``state.round``). For every
heterogeneous method the state is a different pytree (per-group stacked client models, FD's
per-group teachers with bool masks, FedProto's prototypes, FedDF's group models and server-optimiser
states, FedAvg-within-groups' per-group engine states): a run restored from its round-2 checkpoint
must end bitwise-equal to the uninterrupted run. The runs are test_algorithms' cached ones (same
round functions, so nothing compiles twice in one session).
"""

import jax
import numpy as np
import pytest

from fedjax_health import checkpointing
from tests.heterogeneous.test_algorithms import cached_run, jitted


def _rounds(fn, state, train, n):
  for _ in range(n):
    state, _ = fn(state, train, jax.random.key(7))
  return state


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method,fields", [("fd", {}), ("fedproto", {}), ("feddf", {}),
                                           ("fedmd", {"fedmd_public_per_round": 10}), ("hetero_fedavg", {})])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, method, fields):
  exp, at2, _ = cached_run(method, **fields)  # the state after 2 rounds
  fn = jitted(exp)
  ckpt = checkpointing.Checkpointer(str(tmp_path / method))
  ckpt.save(2, at2)
  full = _rounds(fn, at2, exp.train, 2)
  restored = ckpt.restore(2, exp.init_state)  # a fresh run's initial state gives the structure
  ckpt.close()
  _assert_equal(restored, at2)
  resumed = _rounds(fn, restored, exp.train, 2)
  _assert_equal(resumed, full)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(at2)))
