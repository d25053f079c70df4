import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import client as client_lib
from fedjax_health import config_validation, models, simulation
from fedjax_health.aggregators import base as agg_base
from fedjax_health.algorithms import fedavg as fa
from fedjax_health.algorithms import personal_eval as pe
from fedjax_health.algorithms import personalized as pz
from fedjax_health.algorithms import state as state_lib
from fedjax_health.config_base import base_config
from fedjax_health.data.federated import (BatchPlanSpec, FederatedData, from_client_arrays, make_batch_plan,
                                          sample_cohort)

N, DIM, CLASSES = 5, 4, 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name, arg=""):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _ds(sizes=(6, 9, 3, 7, 5), seed=0):
  rng = np.random.default_rng(seed)
  return from_client_arrays([{"x": rng.normal(size=(n, DIM)).astype(np.float32),
                              "y": rng.integers(0, CLASSES, n).astype(np.int32)} for n in sizes])


def _data(seed=0):
  return FederatedData(train=_ds(seed=seed), test=_ds(sizes=(3, 4, 2, 5, 3), seed=seed + 1), num_classes=CLASSES)


def _model():
  return models.get_model("mlp", CLASSES, (DIM,), hidden=(6,))


def _config(algorithm, rounds=2):
  config = pz.add_config(base_config())
  config.algorithm = algorithm
  config.num_rounds = rounds
  config.client.batch_size = 2
  config.client.num_epochs = 1
  config.client.learning_rate = 0.1
  config.cohort_size = 4  # partial participation: some rows must stay untouched
  return config


def _run(exp, rounds, rng=jax.random.key(5)):
  state = exp.init_state
  round_fn = jax.jit(exp.round_fn)
  for _ in range(rounds):
    state, _ = round_fn(state, exp.train, rng)
  return state


def _local_reference(model, ds, params, rounds, cohort_size, plan, lr, rng=jax.random.key(5)):
  """Per-client Python loop: each client trains its own model on the batches FedAvg's plan gives it."""
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(lr))
  train_one = jax.jit(lambda p, x, y, m, k: client_lib.local_train(trainer, p, x, y, m, k)[0])
  own = [params] * ds.num_clients
  for r in range(rounds):
    k_cohort, k_plan, k_clients, _, _ = jax.random.split(jax.random.fold_in(rng, r), 5)
    cohort = np.asarray(sample_cohort(k_cohort, ds.num_clients, cohort_size))
    pos, mask = make_batch_plan(k_plan, jnp.asarray(ds.client_sizes, jnp.int32)[cohort], plan)
    keys = jax.random.split(k_clients, cohort_size)
    for i, c in enumerate(cohort):
      idx = ds.offsets[c] + np.asarray(pos[i])
      own[c] = client_lib.tree_add(own[c], train_one(own[c], ds.x[idx], ds.y[idx], mask[i], keys[i]))
  return own


def _fedavg_reference(config, data, model, rounds):
  alg = fa.fedavg(model, num_clients=N, cohort_size=config.cohort_size,
                  plan=simulation.build_plan(config, data.train.client_sizes),
                  client_opt=optax.sgd(config.client.learning_rate))
  state = alg.init(model.init(jax.random.key(config.seed)))
  round_fn = jax.jit(alg.round_fn)
  for _ in range(rounds):
    state, _ = round_fn(state, fa.device_train_data(data.train), jax.random.key(5))
  return state.params


def _close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol), a, b)


# ----------------------------------------------------------------------------------------------


def test_split_merge_round_trip_and_pattern_errors():
  params = _model().init(jax.random.key(0))
  mask = pz.personal_mask(params, "^head/")
  shared, personal = pz.split_params(params, mask)
  assert set(shared) == {"body_0"} and set(personal) == {"head"}
  _close(pz.merge_params(shared, personal), params)
  with pytest.raises(ValueError, match="matches no parameter"):
    pz.personal_mask(params, "^classifier")
  with pytest.raises(ValueError, match="regular expression"):
    pz.personal_mask(params, "head[")


class _Spy:
  """An aggregator recording the structure it is handed (at trace time)."""

  def __init__(self):
    self.seen = []
    inner = agg_base.weighted_mean()

    def apply(updates, weights, state, rng, ctx):
      self.seen.append(jax.tree_util.tree_structure(updates))
      self.seen.append(jax.tree_util.tree_structure(ctx["params"]))
      return inner.apply(updates, weights, state, rng, ctx)

    self.aggregator = agg_base.Aggregator(inner.init, apply)


@pytest.mark.parametrize("pattern, personal_key, shared_key",
                         [("^head/", "head", "body_0"), ("^body", "body_0", "head")])
def test_fedper_and_lg_keep_personal_layers_off_the_server(pattern, personal_key, shared_key):
  data, model = _data(), _model()
  config = _config("fedper")
  params = model.init(jax.random.key(0))
  mask = pz.personal_mask(params, pattern)
  shared, personal = pz.split_params(params, mask)
  spy = _Spy()
  kw = pz._common(config, data.train)
  init, round_fn = pz.personalized_round(client_update=pz.partial_update(model, optax.sgd(0.1), mask),
                                         aggregator=spy.aggregator, **kw)
  state0 = init(shared, state_lib.broadcast_to_clients(personal, N))
  state = jax.jit(round_fn)(state0, fa.device_train_data(data.train), jax.random.key(1))[0]
  for structure in spy.seen:  # the server never receives, nor holds, a personal layer
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        jax.tree_util.tree_unflatten(structure, [0] * structure.num_leaves))[0]}
    assert not any(personal_key in p for p in paths) and any(shared_key in p for p in paths)
  assert set(state.params) == {shared_key}
  cohort = np.asarray(sample_cohort(jax.random.split(jax.random.fold_in(jax.random.key(1), 0), 5)[0], N, 4))
  heads = np.asarray(jax.tree.leaves(state.clients)[0])
  init_head = np.asarray(jax.tree.leaves(personal)[0])
  for c in range(N):
    if c in cohort:
      assert not np.allclose(heads[c], init_head)  # trained locally
    else:
      np.testing.assert_array_equal(heads[c], init_head)  # not sampled: untouched
  trained = [heads[c] for c in cohort]
  assert not np.allclose(trained[0], trained[1])  # personal layers differ between clients
  assert not np.allclose(np.asarray(jax.tree.leaves(state.params)[0]), np.asarray(jax.tree.leaves(shared)[0]))


def test_apfl_alpha0_equals_fedavg():
  data, model = _data(), _model()
  config = _config("apfl", rounds=3)
  exp = pz.build_apfl_experiment(config, data, model, alpha=0.0, adapt_alpha=False)
  state = _run(exp, 3)
  ref = _fedavg_reference(config, data, model, 3)
  _close(state.params, ref)
  # The personal model alpha v + (1 - alpha) w is the global model for every client.
  v = state.clients["v"]
  mixed = jax.tree.map(lambda vi, w: 0.0 * vi + w[None], v, state.params)
  _close(mixed, jax.tree.map(lambda w: jnp.broadcast_to(w, (N,) + w.shape), ref))
  np.testing.assert_array_equal(np.asarray(state.clients["alpha"]), 0.0)


def test_apfl_alpha1_equals_local_training():
  data, model = _data(), _model()
  config = _config("apfl", rounds=3)
  exp = pz.build_apfl_experiment(config, data, model, alpha=1.0, adapt_alpha=False)
  state = _run(exp, 3)
  params = model.init(jax.random.key(config.seed))
  own = _local_reference(model, data.train, params, 3, 4, simulation.build_plan(config, data.train.client_sizes), 0.1)
  for c in range(N):
    _close(jax.tree.map(lambda v: v[c], state.clients["v"]), own[c])


def test_apfl_learns_alpha_within_unit_interval():
  data, model = _data(), _model()
  config = _config("apfl", rounds=3)
  exp = pz.build_apfl_experiment(config, data, model, alpha=0.5, adapt_alpha=True, alpha_lr=5.0)
  alpha = np.asarray(_run(exp, 3).clients["alpha"])
  assert np.all((alpha >= 0) & (alpha <= 1)) and not np.allclose(alpha, 0.5)
  assert "mean_alpha" in exp.evaluate(exp.init_state)


def test_ditto_global_is_fedavg_lambda0_is_local_training_and_lambda_pulls_to_global():
  data, model = _data(), _model()
  states = {}
  for lam in (0.0, 5.0):
    config = _config("ditto", rounds=2)
    config.personalization.ditto_lambda = lam
    exp = pz.build_ditto(config, data, model)[0]
    states[lam] = _run(exp, 2)
  _close(states[0.0].params, _fedavg_reference(config, data, model, 2))
  own = _local_reference(model, data.train, model.init(jax.random.key(0)), 2, 4,
                         simulation.build_plan(config, data.train.client_sizes), 0.1)
  for c in range(N):
    _close(jax.tree.map(lambda v: v[c], states[0.0].clients), own[c])
  gaps = []
  for st in states.values():
    pairs = zip(jax.tree.leaves(st.clients), jax.tree.leaves(st.params))
    gaps.append(float(sum(jnp.sum((v - w[None]) ** 2) for v, w in pairs)))
  assert gaps[1] < gaps[0]
  assert np.isfinite(exp.evaluate(states[5.0])["worst10_client_accuracy"])


def test_interpolation_lambda1_is_finetuning_and_chosen_by_validation():
  data, model = _data(), _model()
  config = _config("interpolation", rounds=1)
  config.personalization.interpolation_lambdas = (0.0, 1.0)
  exp = pz.build_interpolation(config, data, model)[0]
  fit, _ = pe.split_validation(data.train, config.personalization.val_fraction, seed=0)
  assert exp.train["sizes"].tolist() == fit.client_sizes.tolist()  # trains on the fit part only
  params = model.init(jax.random.key(1))
  grid = pe.make_finetune(model, fit, optax.sgd(0.1), 2, 1, lambdas=(0.0, 1.0))(params, jax.random.key(4))
  plain = pe.make_finetune(model, fit, optax.sgd(0.1), 2, 1)(params, jax.random.key(4))
  _close(jax.tree.map(lambda g: g[:, 1], grid), plain)  # lambda = 1: own data only = fine-tuning
  assert not np.allclose(np.asarray(jax.tree.leaves(grid)[0][:, 0]), np.asarray(jax.tree.leaves(plain)[0]))
  out = exp.evaluate(exp.init_state)
  assert 0.0 <= out["mean_lambda"] <= 1.0 and np.isfinite(out["mean_client_accuracy"])


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_mixture_gradient_is_the_lambda_mix_of_the_two_halves(lam):
  model = _model()
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, DIM)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, 6), jnp.int32)
  m = jnp.asarray([True, True, False, True, True, True])
  grads, _ = pe.mixture_grad_fn(model.example_losses, lam, 3)(params, None, x, y, m, None)
  mean_loss = lambda p, xs, ys: jnp.mean(model.example_losses(p, xs, ys))
  g_own = jax.grad(mean_loss)(params, x[:2], y[:2])  # own half, masked slot dropped
  g_pool = jax.grad(mean_loss)(params, x[3:], y[3:])
  _close(grads, jax.tree.map(lambda a, b: lam * a + (1 - lam) * b, g_own, g_pool), atol=1e-6)


def test_validation_choice_matches_loop():
  data, model = _data(), _model()
  fit, val = pe.split_validation(data.train, 0.4, seed=0)
  keys = jax.random.split(jax.random.key(0), N * 3)
  stacked = jax.vmap(model.init)(keys)
  stacked = jax.tree.map(lambda p: p.reshape((N, 3) + p.shape[1:]), stacked)
  pick = np.asarray(pe.make_validation_choice(model, val, 3)(stacked))
  for c in range(N):
    d = val.client(c)
    logits = [model.apply(jax.tree.map(lambda p: p[c, g], stacked), d["x"]) for g in range(3)]
    losses = [float(np.sum(models.per_example_loss(l, d["y"]))) for l in logits]
    assert pick[c] == int(np.argmin(losses))


def test_split_validation_partitions_each_client():
  ds = _ds(sizes=(1, 2, 10))
  fit, val = pe.split_validation(ds, 0.3, seed=0)
  np.testing.assert_array_equal(fit.client_sizes, [1, 1, 7])
  np.testing.assert_array_equal(val.client_sizes, [0, 1, 3])
  for c in range(3):
    rows = np.concatenate([fit.client(c)["x"], val.client(c)["x"]])
    assert sorted(map(tuple, rows)) == sorted(map(tuple, ds.client(c)["x"]))
  with pytest.raises(ValueError, match="fraction"):
    pe.split_validation(ds, 1.0)


def test_personal_evaluate_matches_per_client_loop():
  data, model = _data(), _model()
  stacked = jax.vmap(model.init)(jax.random.split(jax.random.key(3), N))
  out = pe.make_personal_evaluate(model, data, width=2)(stacked)
  accs, correct = [], []
  for c in range(N):
    d = data.test.client(c)
    pred = np.argmax(np.asarray(model.apply(jax.tree.map(lambda p: p[c], stacked), d["x"])), -1)
    accs.append(np.mean(pred == d["y"]))
    correct.extend(pred == d["y"])
  np.testing.assert_allclose(out["per_client_accuracy"], accs, atol=1e-6)
  assert out["accuracy"] == pytest.approx(np.mean(correct))
  assert out["worst_client_accuracy"] == pytest.approx(min(accs))
  assert out["worst10_client_accuracy"] == pytest.approx(min(accs))
  assert out["mean_client_accuracy"] == pytest.approx(np.mean(accs))


def test_finetune_equals_local_training_from_global():
  data, model = _data(), _model()
  params = model.init(jax.random.key(0))
  ft = pe.make_finetune(model, data.train, optax.sgd(0.1), 2, 1)
  out = ft(params, jax.random.key(4))
  plan = BatchPlanSpec.create(data.train.client_sizes, 2, num_epochs=1)
  k_plan, k_train, _ = jax.random.split(jax.random.key(4), 3)
  pos, mask = make_batch_plan(k_plan, jnp.asarray(data.train.client_sizes, jnp.int32), plan)
  keys = jax.random.split(k_train, N)
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(0.1))
  train_one = jax.jit(lambda x, y, m, k: client_lib.local_train(trainer, params, x, y, m, k)[0])
  for c in range(N):
    idx = data.train.offsets[c] + np.asarray(pos[c])
    delta = train_one(data.train.x[idx], data.train.y[idx], mask[c], keys[c])
    _close(jax.tree.map(lambda p: p[c], out), client_lib.tree_add(params, delta))


@pytest.mark.parametrize("field, value, msg", [
    ("apfl_alpha", 1.5, "personalization.apfl_alpha must be in"),
    ("apfl_alpha", -0.1, "personalization.apfl_alpha must be in"),
    ("interpolation_lambdas", (0.5, 1.2), "personalization.interpolation_lambdas"),
    ("ditto_lambda", -1.0, "personalization.ditto_lambda"),
    ("personal_layers", "head[", "personal_layers must be a regular expression"),
])
def test_config_validation_names_the_field(field, value, msg):
  config = _config("apfl")
  config.personalization[field] = value
  with pytest.raises(ValueError, match=msg):
    config_validation.validate_config(config)


def test_factories_reject_mixing_weights_outside_unit_interval():
  data, model = _data(), _model()
  with pytest.raises(ValueError, match=r"APFL alpha must be in \[0, 1\]"):
    pz.build_apfl_experiment(_config("apfl"), data, model, alpha=1.1, adapt_alpha=False)
  config = _config("interpolation")
  config.personalization.interpolation_lambdas = (-0.5,)
  with pytest.raises(ValueError, match=r"interpolation lambda must be in \[0, 1\]"):
    pz.build_interpolation(config, data, model)
  config = _config("fedper")
  config.personalization.personal_layers = "^decoder"
  with pytest.raises(ValueError, match="matches no parameter"):
    pz.build_partial_from_config(config, data, model)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["lg_fedavg", "local_only", "finetune"])  # fedper: tests/test_launch.py
def test_heart_disease_personalized_config_runs_end_to_end(algorithm, tmp_path):
  config = load_config("heart_disease_personalized.py", "smoke")
  config.algorithm = algorithm
  summary = simulation.run(config, str(tmp_path), log=lambda s: None)
  final = next(iter(summary["experiments"].values()))
  for key in ("accuracy", "mean_client_accuracy", "worst_client_accuracy", "worst10_client_accuracy", "loss"):
    assert np.isfinite(final[key])
  assert (tmp_path / "metrics.jsonl").exists()
