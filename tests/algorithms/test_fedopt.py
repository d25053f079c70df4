import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import client as client_lib
from fedjax_health import models
from fedjax_health.aggregators import base as agg_base
from fedjax_health.algorithms import fedavg as fa
from fedjax_health.algorithms import fedopt
from fedjax_health.data.federated import BatchPlanSpec, from_client_arrays, make_batch_plan, sample_cohort


def _numpy_algorithm2(kind, deltas, x0, lr, b1, b2, tau, v0):
  """Reddi et al. 2021, Algorithm 2, line by line in NumPy (float64)."""
  x, m, v = x0.astype(np.float64), np.zeros_like(x0, np.float64), np.full_like(x0, v0, np.float64)
  for d in deltas:
    m = b1 * m + (1 - b1) * d
    if kind == "adagrad":
      v = v + d * d
    elif kind == "adam":
      v = b2 * v + (1 - b2) * d * d
    else:
      v = v - (1 - b2) * d * d * np.sign(v - d * d)
    x = x + lr * m / (np.sqrt(v) + tau)
  return x


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
@pytest.mark.parametrize("v0", [None, 0.0, 0.5])
def test_reddi_equals_numpy_algorithm2(kind, v0):
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(3, 4)).astype(np.float32)
  # Steps of very different sizes, so Yogi's sign flips and bias correction would show.
  deltas = [rng.normal(size=(3, 4)) * s for s in (1.0, 0.01, 3.0, 0.1, 1.0, 0.5)]
  lr, b1, b2, tau = 0.3, 0.9, 0.99, 1e-3
  opt = fa.server_optimizer(kind, lr, b1, b2, tau, form="reddi", initial_accumulator=v0)
  params = {"w": jnp.asarray(x0)}
  state = opt.init(params)
  for d in deltas:
    upd, state = opt.update({"w": -jnp.asarray(d, jnp.float32)}, state, params)  # pseudo-gradient = -Delta
    params = optax.apply_updates(params, upd)
  ref = _numpy_algorithm2(kind, deltas, x0, lr, b1, b2, tau, tau ** 2 if v0 is None else v0)
  np.testing.assert_allclose(np.asarray(params["w"]), ref, rtol=2e-5, atol=2e-6)


def test_optax_form_is_optax_and_differs_from_reddi():
  params = {"w": jnp.ones((5,))}
  g = {"w": jnp.linspace(-1.0, 1.0, 5)}
  ours = fa.server_optimizer("adam", 0.1, 0.9, 0.999, 1e-8, form="optax")
  ref = optax.adam(0.1, b1=0.9, b2=0.999, eps=1e-8)
  u1, _ = ours.update(g, ours.init(params), params)
  u2, _ = ref.update(g, ref.init(params), params)
  np.testing.assert_allclose(u1["w"], u2["w"])
  # Without bias correction the first Adam step is lr * 0.1 g / (sqrt(0.001) |g|), not lr * sign(g).
  reddi = fa.server_optimizer("adam", 0.1, 0.9, 0.999, 1e-8, form="reddi")
  u3, _ = reddi.update(g, reddi.init(params), params)
  assert not np.allclose(u3["w"], u2["w"], atol=1e-3)


def test_bad_hyperparameters_fail_at_construction():
  with pytest.raises(ValueError, match="form"):
    fa.server_optimizer("adam", 0.1, form="torch")
  with pytest.raises(ValueError, match="tau"):
    fedopt.reddi("adam", 0.1, tau=0.0)
  with pytest.raises(ValueError, match="weighting"):
    fedopt.aggregation_weights("by_luck", jnp.ones(2), jnp.ones(2))


def test_aggregation_weights_closed_forms():
  used = jnp.array([400.0, 0.0, 120.0, 400.0])
  size = jnp.array([199, 172, 30, 85])
  np.testing.assert_array_equal(fedopt.aggregation_weights("examples_used", used, size), [400, 0, 120, 400])
  np.testing.assert_array_equal(fedopt.aggregation_weights("dataset_size", used, size), [199, 0, 30, 85])
  np.testing.assert_array_equal(fedopt.aggregation_weights("uniform", used, size), [1, 0, 1, 1])


def _data(sizes=(5, 11, 3, 8), dim=4, seed=0):
  rng = np.random.default_rng(seed)
  arrays = [{"x": rng.normal(size=(n, dim)).astype(np.float32), "y": rng.integers(0, 2, n).astype(np.int32)}
            for n in sizes]
  return from_client_arrays(arrays)


def _reference_mean(model, params, ds, plan, rng, lr, weighting):
  """Per-client Python loop, then the closed-form weighted mean of the deltas."""
  c = ds.num_clients
  k_cohort, k_plan, k_clients, _, _ = jax.random.split(jax.random.fold_in(rng, 0), 5)
  cohort = np.asarray(sample_cohort(k_cohort, c, c))
  pos, mask = make_batch_plan(k_plan, jnp.asarray(ds.client_sizes, jnp.int32)[cohort], plan)
  keys = jax.random.split(k_clients, c)
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(lr))
  train = jax.jit(functools.partial(client_lib.local_train, trainer))  # one compile for every client
  deltas, w = [], []
  for i, cl in enumerate(cohort):
    idx = ds.offsets[cl] + np.asarray(pos[i])
    d, _ = train(params, ds.x[idx], ds.y[idx], mask[i], keys[i])
    deltas.append(d)
    w.append({"examples_used": float(np.asarray(mask[i]).sum()), "dataset_size": float(ds.client_sizes[cl]),
              "uniform": 1.0}[weighting])
  w = np.array(w) / np.sum(w)
  return jax.tree.map(lambda p, *ds_: np.asarray(p) + sum(wi * np.asarray(di) for wi, di in zip(w, ds_)),
                      params, *deltas)


@pytest.mark.parametrize("weighting,path", [
    ("examples_used", "plain"), ("uniform", "plain"), ("dataset_size", "plain"),
    ("dataset_size", "lowrank"), ("dataset_size", "stacked")])
def test_weighting_round_equals_closed_form(weighting, path):
  ds = _data()
  model = models.get_model("logreg", 2, (4,))
  # Each weighting gets a plan where it differs from the other two: with one epoch examples used =
  # dataset size != uniform; with a fixed step examples used = uniform != dataset size.
  fixed = weighting == "dataset_size"
  plan = (BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=None, num_steps=1) if fixed
          else BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=1))
  kwargs = dict(fast_path="lowrank" if path == "lowrank" else "off")
  if path == "stacked":
    kwargs["aggregator"] = agg_base.weighted_mean()
  alg = fa.fedavg(model, num_clients=4, cohort_size=4, plan=plan, client_opt=client_lib.sgd(0.2),
                  weighting=weighting, **kwargs)
  assert alg.path == ("lowrank" if path == "lowrank" else "plain")
  params = model.init(jax.random.key(0))
  rng = jax.random.key(3)
  state, metrics = jax.jit(alg.round_fn)(alg.init(params), fa.device_train_data(ds), rng)
  ref = _reference_mean(model, params, ds, plan, rng, 0.2, weighting)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state.params, ref)
  used = 4 * 2 if fixed else np.sum(ds.client_sizes)
  assert float(metrics["examples_used"]) == float(used)  # examples, whatever the weighting
