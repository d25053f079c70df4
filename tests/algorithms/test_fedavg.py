import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import client as client_lib
from fedjax_health import models
from fedjax_health.algorithms import fedavg as fa
from fedjax_health.data.federated import BatchPlanSpec, from_client_arrays, make_batch_plan, sample_cohort


def _data(sizes=(5, 9, 0, 3, 7, 4), dim=4, seed=0):
  rng = np.random.default_rng(seed)
  arrays = [{"x": rng.normal(size=(n, dim)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}
            for n in sizes]
  return from_client_arrays(arrays)


def _reference_round(model, params, ds, plan, cohort_size, rng, round_idx, lr, prox_mu, server_opt, opt_state):
  """Per-client Python loop + explicit weighted mean + server optimiser, from the same plan/keys."""
  k_cohort, k_plan, k_clients, _, _ = jax.random.split(jax.random.fold_in(rng, round_idx), 5)
  cohort = np.asarray(sample_cohort(k_cohort, ds.num_clients, cohort_size))
  sizes = jnp.asarray(ds.client_sizes, jnp.int32)[cohort]
  pos, mask = make_batch_plan(k_plan, sizes, plan)
  keys = jax.random.split(k_clients, cohort_size)
  reg = client_lib.prox_regularizer(prox_mu) if prox_mu else None
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses, reg), optax.sgd(lr))
  train = jax.jit(functools.partial(client_lib.local_train, trainer))  # one compile for every client
  deltas, weights = [], []
  for i, c in enumerate(cohort):
    idx = ds.offsets[c] + np.asarray(pos[i])
    d, aux = train(params, ds.x[idx], ds.y[idx], mask[i], keys[i])
    deltas.append(d)
    weights.append(float(np.asarray(mask[i]).sum()))
  w = np.array(weights) / sum(weights)
  mean = jax.tree.map(lambda *ds_: sum(wi * np.asarray(di) for wi, di in zip(w, ds_)), *deltas)
  upd, opt_state = server_opt.update(jax.tree.map(jnp.negative, mean), opt_state, params)
  return optax.apply_updates(params, upd), opt_state


@pytest.mark.parametrize("server", ["sgd", "adam", "yogi", "adagrad"])
@pytest.mark.parametrize("prox_mu", [0.0, 0.1])
def test_round_equals_per_client_reference(server, prox_mu):
  ds = _data()
  model = models.get_model("mlp", 3, (4,), hidden=(5,))
  plan = BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=2)
  server_opt = fa.server_optimizer(server, 1.0 if server == "sgd" else 0.05)
  alg = fa.fedavg(model, num_clients=6, cohort_size=4, plan=plan, client_opt=optax.sgd(0.1), server_opt=server_opt,
                  prox_mu=prox_mu, clients_per_step=2)
  params = model.init(jax.random.key(0))
  state = alg.init(params)
  train = fa.device_train_data(ds)
  rng = jax.random.key(7)
  ref_params, ref_opt = params, server_opt.init(params)
  round_fn = jax.jit(alg.round_fn)
  for r in range(2):
    state, metrics = round_fn(state, train, rng)
    ref_params, ref_opt = _reference_round(model, ref_params, ds, plan, 4, rng, r, 0.1, prox_mu, server_opt, ref_opt)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state.params, ref_params)
  assert int(state.round) == 2 and np.isfinite(float(metrics["train_loss"]))


def test_server_sgd_lr1_is_fedavg_and_width_does_not_matter():
  ds = _data()
  model = models.get_model("logreg", 3, (4,))
  plan = BatchPlanSpec.create(ds.client_sizes, 3, num_epochs=1)
  outs = []
  for width in (1, 3, 6):
    alg = fa.fedavg(model, num_clients=6, cohort_size=6, plan=plan, client_opt=optax.sgd(0.2), clients_per_step=width)
    state = alg.init(model.init(jax.random.key(0)))
    state, _ = jax.jit(alg.round_fn)(state, fa.device_train_data(ds), jax.random.key(1))
    outs.append(state.params)
  for o in outs[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), outs[0], o)


def test_sharded_round_equals_unsharded(require_host_devices):
  require_host_devices(4)
  ds = _data(sizes=(5, 9, 0, 3, 7, 4, 6, 2))
  model = models.get_model("mlp", 3, (4,), hidden=(5,))
  plan = BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=1)
  results = []
  for mesh in (None, client_lib.make_client_mesh(4)):
    alg = fa.fedavg(model, num_clients=8, cohort_size=8, plan=plan, client_opt=optax.sgd(0.1), mesh=mesh)
    state = alg.init(model.init(jax.random.key(0)))
    state, _ = jax.jit(alg.round_fn)(state, fa.device_train_data(ds), jax.random.key(3))
    results.append(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *results)


def test_nonfinite_client_update_is_rejected_and_counted():
  ds = _data()
  x = ds.x.copy()
  x[ds.offsets[1]] = np.nan  # client 1 has a NaN example -> NaN update
  ds = type(ds)({"x": x, "y": ds.y}, ds.offsets)
  model = models.get_model("logreg", 3, (4,))
  plan = BatchPlanSpec.create(ds.client_sizes, 20, num_epochs=1)
  alg = fa.fedavg(model, num_clients=6, cohort_size=6, plan=plan, client_opt=optax.sgd(0.1))
  state = alg.init(model.init(jax.random.key(0)))
  state, metrics = jax.jit(alg.round_fn)(state, fa.device_train_data(ds), jax.random.key(0))
  assert int(metrics["num_rejected"]) == 1
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize("kw, msg", [(dict(cohort_size=7), "cohort_size"), (dict(cohort_size=0), "cohort_size")])
def test_fedavg_rejects_bad_cohort(kw, msg):
  ds = _data()
  model = models.get_model("logreg", 3, (4,))
  plan = BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=1)
  with pytest.raises(ValueError, match=msg):
    fa.fedavg(model, num_clients=6, plan=plan, client_opt=optax.sgd(0.1), **kw)


@pytest.mark.parametrize("fn, args, msg", [(fa.server_optimizer, ("rmsprop",), "server optimizer"),
                                           (fa.server_optimizer, ("sgd", -1.0), "learning_rate"),
                                           (fa.client_optimizer, ("sgd", 0.0), "learning_rate"),
                                           (fa.client_optimizer, ("lamb", 0.1), "client optimizer")])
def test_optimizer_factories_validate(fn, args, msg):
  with pytest.raises(ValueError, match=msg):
    fn(*args)


@pytest.mark.parametrize("width", [1, 4, 6])
def test_streaming_mean_equals_stacked_aggregator(width):
  from fedjax_health.aggregators import base as agg_base
  ds = _data()
  model = models.get_model("mlp", 3, (4,), hidden=(5,))
  plan = BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=1)
  outs = []
  for agg in (None, agg_base.chain(agg_base.reject_nonfinite(), agg_base.weighted_mean())):
    alg = fa.fedavg(model, num_clients=6, cohort_size=5, plan=plan, client_opt=optax.sgd(0.1), aggregator=agg,
                    clients_per_step=width)
    state = alg.init(model.init(jax.random.key(0)))
    state, m = jax.jit(alg.round_fn)(state, fa.device_train_data(ds), jax.random.key(2))
    outs.append((state.params, m))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), outs[0][0], outs[1][0])
  for k in ("train_loss", "mean_update_norm", "num_rejected"):
    np.testing.assert_allclose(outs[0][1][k], outs[1][1][k], rtol=1e-5)
