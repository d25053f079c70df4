import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import client as client_lib
from fedjax_health import config_validation, models, simulation
from fedjax_health.aggregators import clustered as agg_cl
from fedjax_health.algorithms import clustered as cl
from fedjax_health.algorithms import fedavg as fa
from fedjax_health.algorithms import personalized as pz
from fedjax_health.config_base import base_config
from fedjax_health.data import synthetic
from fedjax_health.data.federated import make_batch_plan, sample_cohort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name, arg=""):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _config(algorithm, k, rounds=2, lr=0.1, steps=5, batch=8):
  config = cl.add_config(pz.add_config(base_config()))
  config.algorithm = algorithm
  config.num_rounds = rounds
  config.model.name = "logreg"
  config.client.learning_rate = lr
  config.client.num_steps = steps
  config.client.batch_size = batch
  config.clustering.num_clusters = k
  return config


def _synthetic(num_clients=8, k=2, seed=0, size=60, sizes=None):
  sizes = np.full(num_clients, size) if sizes is None else np.asarray(sizes)
  return synthetic.load(num_clients, alpha=1.0, beta=1.0, seed=seed, sizes=sizes, num_clusters=k)


def _run(exp, rounds, rng=jax.random.key(9)):
  state, round_fn = exp.init_state, jax.jit(exp.round_fn)
  for _ in range(rounds):
    state, metrics = round_fn(state, exp.train, rng)
  return state, metrics


def _close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol), a, b)


@pytest.mark.parametrize("algorithm", ["ifca", "multicenter", "cfl"])
def test_one_cluster_is_fedavg(algorithm):
  data = _synthetic()
  config = _config(algorithm, k=1)
  config.cohort_size = 6
  model = simulation.build_model(config, data)
  exp = cl.build_clustered_experiment(config, data, model, algorithm)
  state, _ = _run(exp, 2)
  alg = fa.fedavg(model, num_clients=8, cohort_size=6, plan=simulation.build_plan(config, data.train.client_sizes),
                  client_opt=optax.sgd(0.1))
  ref = alg.init(jax.tree.map(lambda p: p[0], exp.init_state.params))
  for _ in range(2):
    ref, _ = jax.jit(alg.round_fn)(ref, fa.device_train_data(data.train), jax.random.key(9))
  _close(jax.tree.map(lambda p: p[0], state.params), ref.params)


def test_ifca_round_matches_per_client_reference():
  """Ragged clients (1 to 8 steps of one epoch) run in step buckets; the reference loops over
  clients on the padded plan."""
  data = _synthetic(num_clients=6, k=3, sizes=[5, 40, 12, 60, 23, 8])
  config = _config("ifca", k=3)
  config.client.num_epochs = 1
  config.clustering.ifca_reseed_empty = False
  model = simulation.build_model(config, data)
  exp = cl.build_clustered_experiment(config, data, model, "ifca")
  state, _ = _run(exp, 1)
  centers = exp.init_state.params
  rng = jax.random.key(9)
  k_cohort, k_plan, k_clients, _, _ = jax.random.split(jax.random.fold_in(rng, 0), 5)
  cohort = np.asarray(sample_cohort(k_cohort, 6, 6))
  plan = simulation.build_plan(config, data.train.client_sizes)
  pos, mask = make_batch_plan(k_plan, jnp.asarray(data.train.client_sizes, jnp.int32)[cohort], plan)
  keys = jax.random.split(k_clients, 6)
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(0.1))
  train_one = jax.jit(lambda p, x, y, m, key: client_lib.local_train(trainer, p, x, y, m, key)[0])
  chosen, deltas, weights = [], [], []
  for i, c in enumerate(cohort):
    idx = data.train.offsets[c] + np.asarray(pos[i])
    x, y, m = data.train.x[idx], data.train.y[idx], np.asarray(mask[i])
    losses = []
    for k in range(3):
      p = jax.tree.map(lambda a: a[k], centers)
      per = np.asarray(model.example_losses(p, x.reshape(-1, x.shape[-1]), y.reshape(-1)))
      losses.append(per[m.reshape(-1)].mean())
    k = int(np.argmin(losses))
    d = train_one(jax.tree.map(lambda a: a[k], centers), x, y, m, keys[i])
    chosen.append(k), deltas.append(d), weights.append(m.sum())
  np.testing.assert_array_equal(np.asarray(state.clients["cluster"])[cohort], chosen)
  for k in range(3):
    members = [i for i in range(6) if chosen[i] == k]
    if not members:
      _close(jax.tree.map(lambda a: a[k], state.params), jax.tree.map(lambda a: a[k], centers))
      continue
    w = np.array([weights[i] for i in members], np.float64)
    mean = jax.tree.map(lambda *ds: sum(wi * np.asarray(di) for wi, di in zip(w / w.sum(), ds)),
                        *[deltas[i] for i in members])
    _close(jax.tree.map(lambda a: a[k], state.params), jax.tree.map(lambda c, d: c[k] + d, centers, mean))


def test_ifca_recovers_planted_clusters_on_synthetic():
  data = _synthetic(num_clients=12, k=3, seed=1)
  config = _config("ifca", k=3, rounds=8, lr=0.05, steps=10)
  model = simulation.build_model(config, data)
  exp = cl.build_clustered_experiment(config, data, model, "ifca")
  state, _ = _run(exp, 8)
  out = exp.evaluate(state)
  assert out["ari"] >= 0.9, out["ari"]
  assert out["ari"] == agg_cl.adjusted_rand_index(data.client_meta["cluster"], np.asarray(state.clients["cluster"]))


def test_multicenter_recovers_planted_clusters_and_centres_are_cluster_means():
  data = _synthetic(num_clients=8, k=2, seed=2)
  config = _config("multicenter", k=2, rounds=3, lr=0.05, steps=10)
  model = simulation.build_model(config, data)
  exp = cl.build_clustered_experiment(config, data, model, "multicenter")
  state, metrics = _run(exp, 3)
  assert exp.evaluate(state)["ari"] == 1.0
  assert float(metrics["kmeans_objective"]) >= 0


def test_cfl_splits_after_warmup_and_recovers_two_clusters():
  data = _synthetic(num_clients=8, k=2, seed=3)
  config = _config("cfl", k=2, rounds=6, lr=0.05, steps=10)
  config.clustering.cfl_warmup_rounds = 3
  config.clustering.cfl_eps1 = 0.9
  model = simulation.build_model(config, data)
  exp = cl.build_clustered_experiment(config, data, model, "cfl")
  state, round_fn = exp.init_state, jax.jit(exp.round_fn)
  actives = []
  for _ in range(6):
    state, m = round_fn(state, exp.train, jax.random.key(9))
    actives.append(int(m["num_clusters"]))
  assert actives[:3] == [1, 1, 1] and actives[-1] == 2  # no split before the warm-up ends
  out = exp.evaluate(state)
  assert out["ari"] == 1.0 and out["num_clusters"] == 2


def test_reseed_empty_gives_unused_cluster_the_worst_fit_model():
  centers = {"w": jnp.asarray([[0.0], [5.0], [9.0]])}
  updates = {"w": jnp.asarray([[1.0], [2.0], [3.0]])}
  trained = jnp.asarray([0, 0, 1])
  new, assigned, count = cl._reseed_empty(centers, centers, updates, jnp.ones(3), trained, trained,
                                          jnp.asarray([0.1, 0.7, 0.2]), jnp.asarray(3), 3)
  np.testing.assert_allclose(np.asarray(new["w"])[:, 0], [0.0, 5.0, 2.0])  # client 1's model: 0 + 2
  np.testing.assert_array_equal(np.asarray(assigned), [0, 2, 1])
  assert int(count) == 1


def test_cluster_evaluate_matches_per_client_loop():
  data = _synthetic(num_clients=6, k=2)
  model = models.get_model("logreg", 10, (60,))
  stacked = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 3))
  cluster = jnp.asarray([2, 0, 1, 2, 0, 1])
  out = cl.make_cluster_evaluate(model, data)(stacked, cluster)
  for c in range(6):
    d = data.test.client(c)
    pred = np.argmax(np.asarray(model.apply(jax.tree.map(lambda p: p[int(cluster[c])], stacked), d["x"])), -1)
    assert out["per_client_accuracy"][c] == pytest.approx(np.mean(pred == d["y"]))
  assert out["ari"] == pytest.approx(agg_cl.adjusted_rand_index(data.client_meta["cluster"], np.asarray(cluster)))
  assert out["clusters_used"] == 3


def test_more_clusters_than_clients_fails_clearly():
  data = _synthetic(num_clients=4, k=2)
  config = _config("ifca", k=5)
  model = simulation.build_model(config, data)
  with pytest.raises(ValueError, match=r"num_clusters \(5\) must be <= the number of clients \(4\)"):
    cl.build_clustered_experiment(config, data, model, "ifca")
  with pytest.raises(ValueError, match=r"config.clustering.num_clusters must be <= the number of clients \(4\)"):
    config_validation.validate_config(config, data)


@pytest.mark.parametrize("field, value, msg", [("num_clusters", 0, "clustering.num_clusters"),
                                               ("distance", "manhattan", "clustering.distance"),
                                               ("cfl_eps1", 1.5, "clustering.cfl_eps1")])
def test_config_validation_names_the_field(field, value, msg):
  config = _config("cfl", k=2)
  config.clustering[field] = value
  with pytest.raises(ValueError, match=msg):
    config_validation.validate_config(config)


@pytest.mark.slow
@pytest.mark.parametrize("name, algorithm", [("breastmnist_clustered.py", "multicenter"),  # ifca: test_launch.py
                                             ("synthetic_clustered.py", "cfl")])
def test_clustered_configs_run_end_to_end(name, algorithm, tmp_path):
  config = load_config(name, "smoke")
  config.algorithm = algorithm
  summary = simulation.run(config, str(tmp_path), log=lambda s: None)
  final = summary["experiments"][algorithm]
  for key in ("accuracy", "mean_client_accuracy", "worst_client_accuracy", "worst10_client_accuracy", "loss", "ari"):
    assert np.isfinite(final[key]), key


# ---------------------------------------------------------------- partial participation (issue 15)


def test_ifca_choose_is_the_lowest_loss_active_cluster():
  model = models.get_model("logreg", 3, (4,))
  stacked = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 3))
  rng = np.random.default_rng(0)
  x, y = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 10))
  mask = jnp.arange(10) < 7
  k, losses = jax.jit(cl.ifca_choose, static_argnums=0)(model.example_losses, stacked, x, y, mask, 3)
  ref = [np.mean(np.asarray(model.example_losses(jax.tree.map(lambda p: p[j], stacked), x, y))[:7]) for j in range(3)]
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
  assert int(k) == int(np.argmin(ref))
  k2, _ = cl.ifca_choose(model.example_losses, stacked, x, y, mask, num_active=1)
  assert int(k2) == 0


def test_ifca_never_sampled_clients_are_unassigned_and_judged_by_their_own_choice():
  data = _synthetic(num_clients=8, k=2, seed=1)
  config = _config("ifca", k=2, rounds=1)
  config.cohort_size = 3
  model = simulation.build_model(config, data)
  exp = cl.build_clustered_experiment(config, data, model, "ifca")
  state, metrics = _run(exp, 1)
  cluster = np.asarray(state.clients["cluster"])
  cohort = np.asarray(sample_cohort(jax.random.split(jax.random.fold_in(jax.random.key(9), 0), 5)[0], 8, 3))
  absent = np.setdiff1d(np.arange(8), cohort)
  assert np.all(cluster[absent] == -1) and np.all(cluster[cohort] >= 0)  # not "cluster 0"
  assert int(metrics["unassigned_clients"]) == 5
  out = exp.evaluate(state)
  assert out["unassigned_clients"] == 5
  # Each unassigned client is judged with the cluster model of lowest loss on its training data.
  effective = cluster.copy()
  for c in absent:
    d = data.train.client(c)
    losses = [np.mean(np.asarray(model.example_losses(jax.tree.map(lambda p: p[j], state.params), d["x"], d["y"])))
              for j in range(2)]
    effective[c] = int(np.argmin(losses))
  ref = cl.make_cluster_evaluate(model, data)(state.params, effective)
  np.testing.assert_allclose(out["per_client_accuracy"], ref["per_client_accuracy"])
  assert out["ari"] == ref["ari"]


def test_cfl_split_makes_absent_members_unassigned_then_they_choose():
  data = _synthetic(num_clients=8, k=2, seed=3)
  config = _config("cfl", k=2, rounds=3, lr=0.05, steps=10)
  config.cohort_size = 5
  config.clustering.cfl_warmup_rounds = 1
  config.clustering.cfl_eps1 = 1.0
  model = simulation.build_model(config, data)
  exp = cl.build_clustered_experiment(config, data, model, "cfl")
  rng = jax.random.key(9)
  cohort_of = lambda r: set(np.asarray(sample_cohort(jax.random.split(jax.random.fold_in(rng, r), 5)[0], 8, 5)))
  state, round_fn = exp.init_state, jax.jit(exp.round_fn)
  state, m0 = round_fn(state, exp.train, rng)
  before = np.asarray(state.clients["cluster"])
  state, m1 = round_fn(state, exp.train, rng)
  assert int(m1["split"]) == 1
  after = np.asarray(state.clients["cluster"])
  orphans = sorted((cohort_of(0) - cohort_of(1)))
  assert orphans and np.all(before[orphans] == 0) and np.all(after[orphans] == -1)
  assert int(m1["orphaned_by_split"]) == len(orphans)
  present = sorted(cohort_of(1))
  assert set(after[present]) == {0, 1}  # the split placed the clients it saw
  state, _ = round_fn(state, exp.train, rng)
  back = sorted(set(orphans) & cohort_of(2))
  assert back and np.all(np.asarray(state.clients["cluster"])[back] >= 0)  # they chose a cluster
