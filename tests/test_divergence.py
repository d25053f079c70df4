"""Run-time numerics: the divergence guard, and a train loss that a rejected NaN client cannot poison."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import divergence, metrics, models
from fedjax_health.algorithms import fedavg as fa
from fedjax_health.config_base import base_config
from fedjax_health.data.federated import BatchPlanSpec, from_client_arrays


def test_cohort_train_loss_masks_rejected_and_empty_clients():
  loss = jnp.array([np.nan, 1.0, 2.0, np.inf, 5.0])
  weights = jnp.array([0.0, 1.0, 3.0, 2.0, 4.0])
  rejected = jnp.array([False, False, False, True, False])
  out = metrics.cohort_train_loss(loss, weights, rejected)
  np.testing.assert_allclose(out["train_loss"], (1 * 1 + 2 * 3 + 5 * 4) / 8, rtol=1e-6)
  assert float(out["all_rejected"]) == 0.0
  out = metrics.cohort_train_loss(loss, weights, jnp.ones(5, bool))
  assert float(out["train_loss"]) == 0.0 and float(out["all_rejected"]) == 1.0
  np.testing.assert_allclose(metrics.cohort_train_loss(loss[1:3], weights[1:3])["train_loss"], 7 / 4, rtol=1e-6)


def test_rejected_nan_client_does_not_make_train_loss_nan():
  rng = np.random.default_rng(0)
  clean = [{"x": rng.normal(size=(6, 4)).astype(np.float32), "y": rng.integers(0, 3, 6).astype(np.int32)}
           for _ in range(4)]

  def data(nan_clients):  # a NaN example: NaN loss and NaN update, so the client is rejected
    arrays = [{"x": np.where(np.arange(6)[:, None] == 2, np.nan, a["x"]) if c in nan_clients else a["x"], "y": a["y"]}
              for c, a in enumerate(clean)]
    return fa.device_train_data(from_client_arrays(arrays))

  model = models.get_model("logreg", 3, (4,))
  plan = BatchPlanSpec.create(np.full(4, 6), 3, num_epochs=1)
  alg = fa.fedavg(model, num_clients=4, cohort_size=4, plan=plan, client_opt=optax.sgd(0.1))
  init = alg.init(model.init(jax.random.key(0)))
  round_fn = jax.jit(alg.round_fn)
  state, m = round_fn(init, data([1]), jax.random.key(0))
  assert int(m["num_rejected"]) == 1
  assert np.isfinite(float(m["train_loss"])) and float(m["train_loss"]) > 0
  assert float(m["all_rejected"]) == 0.0
  state, m = round_fn(init, data([0, 1, 2, 3]), jax.random.key(0))
  assert int(m["num_rejected"]) == 4 and float(m["all_rejected"]) == 1.0
  assert float(m["train_loss"]) == 0.0
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(state.params))  # nothing aggregated, not NaN


def _round_fn(values):
  """A fake round whose params become ``values[round]`` (state = round counter, params)."""
  def round_fn(state, train, rng):
    r, _ = state
    p = jnp.asarray(values)[r]
    return (r + 1, p), {"train_loss": p * 2.0, "all_rejected": (r == 1).astype(jnp.float32)}
  return round_fn


@pytest.mark.parametrize("values, limit, bad_round, reason", [
    ([1.0, 2.0, np.nan, 3.0], np.inf, 3, "global parameters hold NaN/inf"),
    ([1.0, 2.0, 3.0, np.inf], np.inf, 4, "global parameters hold NaN/inf"),
    ([1.0, 600.0, 3.0, 4.0], 1000.0, 2, "train loss exceeds config.divergence_loss_limit=1000"),
])
def test_guard_names_first_bad_round(values, limit, bad_round, reason):
  config = base_config()
  config.divergence_loss_limit = limit
  fn = jax.jit(divergence.with_finite_flag(_round_fn(values), lambda s: s[1], limit))
  logs = []
  guard = divergence.Guard("fedavg", config, logs.append)
  state = (jnp.int32(0), jnp.float32(0))
  with pytest.raises(divergence.DivergenceError) as e:
    for r in range(1, 5):
      state, m = fn(state, None, None)
      m = guard.observe(r, m)
      assert divergence.FLAG not in m  # never written to metrics.jsonl
    guard.check()  # one host sync for all four rounds
  assert f"diverged at round {bad_round}: " in str(e.value) and reason in str(e.value)
  assert "client.learning_rate=0.01" in str(e.value)  # the likely cause names the config values
  assert any("every client of the cohort was rejected" in l and "[2]" in l for l in logs)


def test_guard_warn_mode_logs_once_and_continues():
  config = base_config()
  config.on_divergence = "warn"
  fn = jax.jit(divergence.with_finite_flag(_round_fn([1.0, np.nan, np.nan, np.nan]), lambda s: s[1]))
  logs = []
  guard = divergence.Guard("fedavg", config, logs.append)
  state = (jnp.int32(0), jnp.float32(0))
  results = []
  for r in range(1, 5):
    state, m = fn(state, None, None)
    guard.observe(r, m)
    results.append(guard.check())
  assert results == [True, False, False, False]
  warnings = [l for l in logs if "diverged" in l]
  assert len(warnings) == 1 and "round 2" in warnings[0] and warnings[0].startswith("WARNING")
