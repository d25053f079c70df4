import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import client as client_lib
from fedjax_health import lowrank
from fedjax_health import models
from fedjax_health.aggregators import robust
from fedjax_health.algorithms import fedavg as fa
from fedjax_health.data.federated import BatchPlanSpec, from_client_arrays

MODELS = [("mlp", dict(hidden=(16, 8)), 3), ("logreg", {}, 2), ("mlp", dict(hidden=(12,), activation="tanh"), 2),
          ("mlp", dict(hidden=(6,), binary_single_logit=True), 2)]


def _client_batch(k=4, b=3, dim=7, num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  xs = jnp.asarray(rng.normal(size=(k, b, dim)), jnp.float32)
  ys = jnp.asarray(rng.integers(0, num_classes, (k, b)))
  mask = jnp.asarray(rng.random((k, b)) > 0.3).at[2].set(False)  # ragged batches and one empty step
  return xs, ys, mask


@pytest.mark.parametrize("name,kw,num_classes", MODELS)
@pytest.mark.parametrize("momentum,prox_mu", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.5), (0.5, 0.3)])
@pytest.mark.parametrize("dense_tail", [None, False])  # these models' later layers: dense, factored
def test_local_train_equals_dense_training(name, kw, num_classes, momentum, prox_mu, dense_tail):
  model = models.get_model(name, num_classes, (7,), **kw)
  params = model.init(jax.random.key(0))
  xs, ys, mask = _client_batch(num_classes=num_classes)
  train = jax.jit(lambda p, x, y, m: lowrank.local_train(lowrank.dense_chain(model), p, x, y, m, learning_rate=0.3,
                                                         momentum=momentum, prox_mu=prox_mu, dense_tail=dense_tail))
  factors, aux = train(params, xs, ys, mask)
  n_dense = sum(len(f) == 2 for f in factors)
  assert n_dense == (0 if dense_tail is False else len(factors) - 1)
  reg = client_lib.prox_regularizer(prox_mu) if prox_mu else None
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses, reg),
                                     optax.sgd(0.3, momentum=momentum or None))
  delta, ref_aux = client_lib.local_train(trainer, params, xs, ys, mask, jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               lowrank.dense_delta(lowrank.dense_chain(model), factors), delta)
  np.testing.assert_allclose(aux["loss"], ref_aux["loss"], rtol=1e-5)
  np.testing.assert_allclose(aux["sq_norm"], client_lib.tree_sq_norm(delta), rtol=1e-5)
  assert int(aux["num_steps"]) == int(ref_aux["num_steps"]) == 3
  assert float(aux["num_examples"]) == float(ref_aux["num_examples"])


@pytest.mark.parametrize("name,kw,num_classes", [MODELS[0], MODELS[3]])
@pytest.mark.parametrize("momentum,prox_mu", [(0.0, 0.0), (0.5, 0.3)])
@pytest.mark.parametrize("dense_tail", [None, False])
def test_rolled_local_train_equals_dense_training(name, kw, num_classes, momentum, prox_mu, dense_tail):
  """Beyond ``MAX_STEPS`` unrolled steps the rolled scan (fixed factor buffers) gives the same delta."""
  k = lowrank.MAX_STEPS + 3
  model = models.get_model(name, num_classes, (7,), **kw)
  params = model.init(jax.random.key(0))
  xs, ys, mask = _client_batch(k=k, num_classes=num_classes)
  factors, aux = jax.jit(lambda p: lowrank.local_train(lowrank.dense_chain(model), p, xs, ys, mask, learning_rate=0.3,
                                                       momentum=momentum, prox_mu=prox_mu,
                                                       dense_tail=dense_tail))(params)
  assert sum(len(f) == 2 for f in factors) == (0 if dense_tail is False else len(factors) - 1)
  reg = client_lib.prox_regularizer(prox_mu) if prox_mu else None
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses, reg),
                                     optax.sgd(0.3, momentum=momentum or None))
  delta, ref_aux = client_lib.local_train(trainer, params, xs, ys, mask, jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
               lowrank.dense_delta(lowrank.dense_chain(model), factors), delta)
  np.testing.assert_allclose(aux["loss"], ref_aux["loss"], rtol=1e-5)
  np.testing.assert_allclose(aux["sq_norm"], client_lib.tree_sq_norm(delta), rtol=1e-5)
  assert k > lowrank.MAX_STEPS and int(aux["num_steps"]) == int(ref_aux["num_steps"]) >= 1


@pytest.mark.parametrize("k", [4, lowrank.MAX_STEPS + 3])  # unrolled, rolled
@pytest.mark.parametrize("momentum,prox_mu", [(0.0, 0.0), (0.5, 0.3)])
def test_mixed_factored_and_dense_layers_equal_dense_training(k, momentum, prox_mu):
  """A wide hidden layer stays factored while the head trains dense (``dense_layers``' automatic
  choice): the client's delta still equals dense SGD's."""
  model = models.get_model("mlp", 3, (7,), hidden=(64, 64))
  chain, params = lowrank.dense_chain(model), model.init(jax.random.key(0))
  assert lowrank.dense_layers(chain, params, k, 3) == (False, False, True)
  xs, ys, mask = _client_batch(k=k)
  factors, aux = jax.jit(lambda p: lowrank.local_train(chain, p, xs, ys, mask, learning_rate=0.3, momentum=momentum,
                                                       prox_mu=prox_mu))(params)
  assert [len(f) for f in factors] == [3, 3, 2]
  reg = client_lib.prox_regularizer(prox_mu) if prox_mu else None
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses, reg),
                                     optax.sgd(0.3, momentum=momentum or None))
  delta, ref_aux = client_lib.local_train(trainer, params, xs, ys, mask, jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), lowrank.dense_delta(chain, factors), delta)
  np.testing.assert_allclose(aux["loss"], ref_aux["loss"], rtol=1e-5)
  np.testing.assert_allclose(aux["sq_norm"], client_lib.tree_sq_norm(delta), rtol=1e-5)
  # The rule: a later layer trains dense once its weights are no larger than its factors.
  assert lowrank.dense_layers(chain, params, 20, 4) == (False, True, True)  # 80 * (64 + 64) >= 64 * 64


@pytest.mark.parametrize("k", [3, lowrank.MAX_STEPS + 2])
def test_delta_norm_is_never_negative(k, monkeypatch):
  """Plain SGD sums per-step increments of the squared norm (some negative): a rounding-negative
  total is clamped at 0, since its square root (the client's norm) would be NaN."""
  model = models.get_model("mlp", 3, (7,), hidden=(16,))
  chain, params = lowrank.dense_chain(model), model.init(jax.random.key(0))
  xs, ys, mask = _client_batch(k=k)
  monkeypatch.setattr(lowrank, "_sq_norm_increment", lambda *a: jnp.float32(-1e6))  # a large negative sum
  _, aux = lowrank.local_train(chain, params, xs, ys, mask, learning_rate=0.3)
  assert float(aux["sq_norm"]) == 0.0
  monkeypatch.setattr(lowrank, "_sq_norm_increment", lambda *a: jnp.float32(jnp.nan))
  _, aux = lowrank.local_train(chain, params, xs, ys, mask, learning_rate=0.3)
  assert np.isnan(float(aux["sq_norm"]))  # a non-finite norm still rejects the client


@pytest.mark.parametrize("dense_tail", ["yes", 1, jnp.asarray(True)])
def test_local_train_refuses_a_dense_tail_that_is_not_a_bool(dense_tail):
  model = models.get_model("mlp", 3, (7,), hidden=(16,))
  xs, ys, mask = _client_batch(k=2)
  with pytest.raises(ValueError, match="dense_tail must be None, True or False, got"):
    lowrank.local_train(lowrank.dense_chain(model), model.init(jax.random.key(0)), xs, ys, mask,
                        learning_rate=0.1, dense_tail=dense_tail)


@pytest.mark.parametrize("b", [1, 10, lowrank.OUTER_SUM_MAX_BATCH + 1])
def test_outer_sum_equals_contraction(b):
  """A dense layer's gradient h^T g, unrolled over the batch (or contracted past the unroll limit),
  for one client and vmapped over a chunk of them."""
  rng = np.random.default_rng(b)
  h, g = rng.normal(size=(3, b, 6)).astype(np.float32), rng.normal(size=(3, b, 4)).astype(np.float32)
  expected = np.einsum("kbi,kbo->kio", h, g)
  np.testing.assert_allclose(lowrank._outer_sum(h[0], g[0]), expected[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.vmap(lowrank._outer_sum)(h, g), expected, rtol=1e-5, atol=1e-5)


def test_weighted_sum_equals_sum_of_dense_deltas():
  model = models.get_model("mlp", 3, (7,), hidden=(5,))
  chain = lowrank.dense_chain(model)
  params = model.init(jax.random.key(1))
  train = jax.jit(lambda p, x, y, m: lowrank.local_train(chain, p, x, y, m, learning_rate=0.2))  # one compile
  per_client = [train(params, *_client_batch(seed=s))[0] for s in range(3)]
  w = jnp.array([2.0, 0.5, 1.0])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_client)
  expected = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d)),
                          *[lowrank.dense_delta(chain, f) for f in per_client])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               lowrank.weighted_sum(chain, stacked, w), expected)


def _data(sizes=(5, 9, 0, 3, 7, 4, 6, 8), dim=12, seed=0, poison=None):
  rng = np.random.default_rng(seed)
  arrays = [{"x": rng.normal(size=(n, dim)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}
            for n in sizes]
  if poison is not None:
    arrays[poison]["x"][0, 0] = np.inf
  return from_client_arrays(arrays)


_ROUND_FNS = {}


def _round_fn(fast_path, client_sizes, dim, *, cohort, width, server, momentum, prox_mu, mesh, num_steps):
  """Returns (model, algorithm, jitted round) for these settings, built and compiled once per session:
  runs that differ only in their data's values (a poisoned client) share it."""
  key = (fast_path, tuple(int(n) for n in client_sizes), dim, cohort, width, server, momentum, prox_mu, mesh,
         num_steps)
  if key not in _ROUND_FNS:
    model = models.get_model("mlp", 3, (dim,), hidden=(16,))
    plan = (BatchPlanSpec.create(client_sizes, 2, num_epochs=None, num_steps=num_steps) if num_steps
            else BatchPlanSpec.create(client_sizes, 2, num_epochs=2))
    alg = fa.fedavg(model, num_clients=len(client_sizes), cohort_size=cohort, plan=plan,
                    client_opt=client_lib.sgd(0.1, momentum), prox_mu=prox_mu,
                    server_opt=fa.server_optimizer(server, 1.0 if server == "sgd" else 0.05),
                    fast_path=fast_path, lowrank_width=width, mesh=mesh)
    _ROUND_FNS[key] = (model, alg, jax.jit(alg.round_fn))
  return _ROUND_FNS[key]


def _run(fast_path, ds, *, rounds=2, cohort=6, width=None, server="sgd", momentum=0.0, prox_mu=0.0, mesh=None,
         num_steps=None, gram=False, corrupt_gram=False):
  model, alg, round_fn = _round_fn(fast_path, ds.client_sizes, ds.x.shape[1], cohort=cohort, width=width,
                                   server=server, momentum=momentum, prox_mu=prox_mu, mesh=mesh, num_steps=num_steps)
  assert alg.path == ("plain" if fast_path == "off" else "lowrank")
  state = alg.init(model.init(jax.random.key(0)))
  train = fa.device_train_data(ds, alg.gram_rows if gram else 0)
  if corrupt_gram:  # off the probed rows, whose diagonal entries every round checks
    probed = np.zeros(train["gram"].shape[0], bool)
    probed[np.asarray(train[fa.GRAM_PROBE][0])] = True
    train["gram"] = jnp.where(probed[:, None], train["gram"], train["gram"] * 1.5)
  history = []
  for _ in range(rounds):
    state, metrics = round_fn(state, train, jax.random.key(3))
    history.append(metrics)
  return state, history


def _assert_same_rounds(a, b):
  (sa, ha), (sb, hb) = a, b
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6), sa.params, sb.params)
  for ma, mb in zip(ha, hb):
    assert set(ma) == set(mb)
    for key in ma:
      np.testing.assert_allclose(ma[key], mb[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("setting", [dict(), dict(width=1, cohort=8, momentum=0.9),
                                     dict(width=4, prox_mu=0.3, server="adam"), dict(num_steps=5)])
def test_round_equals_plain_path(setting):
  ds = _data()
  _assert_same_rounds(_run("lowrank", ds, **setting), _run("off", ds, **setting))


@pytest.mark.parametrize("setting", [dict(), dict(width=4, prox_mu=0.3, momentum=0.5, server="adam")])
def test_round_with_gram_table_equals_plain_path(setting, monkeypatch):
  ds = _data()
  _, alg, _ = _round_fn("lowrank", ds.client_sizes, ds.x.shape[1], cohort=6, width=setting.get("width"),
                        server=setting.get("server", "sgd"), momentum=setting.get("momentum", 0.0),
                        prox_mu=setting.get("prox_mu", 0.0), mesh=None, num_steps=None)
  # every bucket of the 2-epoch plan: a client of 9 steps of 2 holds at most 9 examples
  assert alg.gram_rows == alg.plan.num_steps * alg.plan.batch_size // 2 == 9 == max(ds.client_sizes)
  with_table = _run("lowrank", ds, gram=True, **setting)
  _assert_same_rounds(with_table, _run("off", ds, **setting))
  # Entries corrupted off the fixed probe's rows: the round's random entries catch them; with the
  # checks off, the round reads the table (its result changes).
  with pytest.raises(Exception, match=r"train\['gram'\] does not match"):
    jax.block_until_ready(_run("lowrank", ds, gram=True, corrupt_gram=True, **setting))
  monkeypatch.setattr(fa, "_check_gram_probe", lambda *a: None)
  monkeypatch.setitem(globals(), "_ROUND_FNS", {})  # traced again, without the checks
  corrupted = _run("lowrank", ds, gram=True, corrupt_gram=True, **setting)
  assert not np.allclose(jax.tree.leaves(corrupted[0].params)[0], jax.tree.leaves(with_table[0].params)[0], atol=1e-4)


def test_gram_table_is_not_used_where_a_bucket_can_hold_larger_clients():
  ds = _data()
  _, alg, _ = _round_fn("lowrank", ds.client_sizes, ds.x.shape[1], cohort=6, width=None, server="sgd", momentum=0.0,
                        prox_mu=0.0, mesh=None, num_steps=5)
  assert alg.gram_rows == 0  # fixed steps: a 5-step client may hold any number of examples
  stacked = _fedavg(models.get_model("mlp", 3, (12,), hidden=(16,)), aggregator=robust.coordinate_median())
  assert stacked.gram_rows == 0  # a stacked aggregator trains dense copies


def test_gram_table_equals_slow_loop_and_slot_gram_equals_gathered_product():
  rng = np.random.default_rng(0)
  sizes = [3, 0, 5, 9, 1, 4]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  x = rng.normal(size=(offsets[-1], 2, 3)).astype(np.float32)
  table = lowrank.gram_table(x, offsets, 5, block_bytes=1)  # one client per block
  np.testing.assert_allclose(lowrank.gram_table(x, offsets, 5), table)
  flat = x.reshape(len(x), -1)
  expect = np.zeros((len(x), 5), np.float32)
  for c, n in enumerate(sizes):
    if n <= 5:
      for i in range(n):
        for j in range(n):
          expect[offsets[c] + i, j] = flat[offsets[c] + i] @ flat[offsets[c] + j]
  np.testing.assert_allclose(table, expect, rtol=1e-5, atol=1e-5)
  assert not table[offsets[3]:offsets[4]].any()  # 9 examples > 5: no entries
  pos = jnp.asarray([[2, 0, 4], [1, 0, 0]])  # client 2, last slots masked (position 0)
  batch = jnp.take(jnp.asarray(flat), offsets[2] + pos.reshape(-1), axis=0)
  np.testing.assert_allclose(lowrank.slot_gram(jnp.asarray(table), offsets[2], pos), batch @ batch.T, rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match="max_rows"):
    lowrank.gram_table(x, offsets, 0)
  with pytest.raises(ValueError, match="offsets"):
    lowrank.gram_table(x, offsets[::-1], 5)


def test_device_train_data_checks_gram_rows_and_round_checks_the_table():
  ds = _data()
  for bad in (-1, True, 2.0):
    with pytest.raises(ValueError, match="gram_rows"):
      fa.device_train_data(ds, bad)
  model, alg, round_fn = _round_fn("lowrank", ds.client_sizes, ds.x.shape[1], cohort=6, width=None, server="sgd",
                                   momentum=0.0, prox_mu=0.0, mesh=None, num_steps=None)
  train = fa.device_train_data(ds, alg.gram_rows)
  assert train["gram"].shape[0] == 42  # every client is covered here
  train["gram"] = jnp.concatenate([train["gram"], train["gram"][:1]])
  with pytest.raises(ValueError, match="has 43 rows, more than the arrays' 42"):
    alg.round_fn(alg.init(model.init(jax.random.key(0))), train, jax.random.key(3))


def test_gram_table_left_out_past_its_memory_budget(monkeypatch, caplog):
  """A table larger than GRAM_TABLE_BUDGET and half the inputs is not built; the round forms the
  products and trains the same."""
  ds = _data()
  model, alg, round_fn = _round_fn("lowrank", ds.client_sizes, ds.x.shape[1], cohort=6, width=None, server="sgd",
                                   momentum=0.0, prox_mu=0.0, mesh=None, num_steps=None)
  x = np.asarray(ds.x)
  table_bytes = len(x) * alg.gram_rows * 4
  assert table_bytes > x.nbytes / 2  # 12 features, more rows per client: the table outgrows half the inputs
  assert "gram" in fa.device_train_data(ds, alg.gram_rows)  # under the budget: built
  monkeypatch.setattr(fa, "GRAM_TABLE_BUDGET", table_bytes - 1)
  with caplog.at_level("INFO"):
    train = fa.device_train_data(ds, alg.gram_rows)
  assert "gram" not in train and "no input Gram table" in caplog.text
  monkeypatch.setattr(fa, "GRAM_TABLE_BUDGET", table_bytes)
  assert "gram" in fa.device_train_data(ds, alg.gram_rows)  # exactly at the budget: built
  state = alg.init(model.init(jax.random.key(0)))
  got, _ = round_fn(state, train, jax.random.key(3))
  want, _ = round_fn(state, fa.device_train_data(ds), jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got.params, want.params)


def test_round_rejects_non_finite_client_like_plain_path():
  ds = _data(poison=1)
  low, plain = _run("lowrank", ds, cohort=8, width=3), _run("off", ds, cohort=8)
  _assert_same_rounds(low, plain)
  assert int(low[1][0]["num_nonfinite"]) == 1 and np.all(np.isfinite(jax.tree.leaves(low[0].params)[0]))


def test_round_sharded_equals_single_device(require_host_devices):
  require_host_devices(4)
  ds = _data()
  mesh = client_lib.make_client_mesh(4)
  plain = _run("off", ds, cohort=8)
  _assert_same_rounds(_run("lowrank", ds, cohort=8, width=2, mesh=mesh), plain)
  _assert_same_rounds(_run("lowrank", ds, cohort=8, width=2, mesh=mesh, gram=True), plain)


def _fedavg(model, **kw):
  ds = _data()
  plan = BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=1)
  args = dict(num_clients=ds.num_clients, cohort_size=4, plan=plan, client_opt=client_lib.sgd(0.1))
  args.update(kw)
  return fa.fedavg(model, **args)


@pytest.mark.parametrize("kw,match", [
    (dict(client_opt=optax.adam(0.1)), "client optimiser is not client.sgd"),
    (dict(client_opt=optax.sgd(0.1)), "client optimiser is not client.sgd"),
    (dict(aggregator=robust.coordinate_median()), "stacked aggregator"),
    (dict(projection=lambda p, a, c: p), "projection"),
    (dict(grad_fn=client_lib.make_grad_fn(lambda p, x, y: jnp.zeros(x.shape[0]))), "custom grad_fn"),
])
def test_forced_lowrank_names_what_prevents_it(kw, match):
  model = models.get_model("mlp", 3, (12,), hidden=(16,))
  with pytest.raises(ValueError, match=match):
    _fedavg(model, fast_path="lowrank", **kw)
  assert _fedavg(model, fast_path="auto", **kw).path == "plain"


def test_forced_lowrank_refuses_conv_models_and_bad_values():
  with pytest.raises(ValueError, match="not a chain of dense layers"):
    _fedavg(models.get_model("lenet", 3, (8, 8, 1)), fast_path="lowrank")
  with pytest.raises(ValueError, match="fast_path must be one of"):
    _fedavg(models.get_model("mlp", 3, (12,)), fast_path="fast")
  with pytest.raises(ValueError, match="momentum must be in"):
    client_lib.sgd(0.1, momentum=1.0)


def test_auto_picks_lowrank_only_when_factors_are_small():
  wide = BatchPlanSpec.create(np.full(4, 20), 10, num_epochs=1)  # W1 shape: k*b = 20 << 784
  w1 = models.get_model("mlp", 10, (784,), hidden=(200,))
  heart = models.get_model("logreg", 2, (13,))  # 13 features: any local data outranks the layer
  args = dict(num_clients=4, cohort_size=4, client_opt=client_lib.sgd(0.1))
  assert fa.fedavg(w1, plan=wide, **args).path == "lowrank"
  assert fa.fedavg(heart, plan=BatchPlanSpec.create(np.full(4, 100), 4, num_epochs=None, num_steps=100),
                   **args).path == "plain"
  assert fa.fedavg(w1, plan=wide, fast_path="off", **args).path == "plain"
  many_steps = BatchPlanSpec.create(np.full(4, 40), 1, num_epochs=1)  # 40 steps: the rolled loop
  assert fa.fedavg(w1, plan=many_steps, **args).path == "lowrank"
  # 64 steps of batch 10: buckets of <= 32 steps have small factors, the longer ones train dense
  long = BatchPlanSpec.create(np.array([1, 50, 20, 640]), 10, num_epochs=1)
  assert fa.fedavg(w1, plan=long, **args).path == "plain+lowrank"
  chain, shapes = lowrank.dense_chain(w1), jax.eval_shape(w1.init, jax.random.key(0))
  # The 200x10 head trains dense (dense_layers): it counts as its weights, the first layer as factors.
  assert lowrank.dense_layers(chain, shapes, 1, 10) == (False, True)
  assert lowrank.factor_fraction(chain, shapes, 8, 10) == pytest.approx((80 * 984 + 200 + 2010) / 159010)
  assert lowrank.suitable(chain, shapes, 32, 10) and not lowrank.suitable(chain, shapes, 64, 10)
  assert not lowrank.suitable(chain, shapes, 32, 10, max_fraction=1.5)


def _dp_run(aggregator, fast_path):
  """Returns (params, metrics) after two DP-FedAvg rounds with ``aggregator`` on ``fast_path``."""
  ds = _data()
  model = models.get_model("mlp", 3, (12,), hidden=(16,))
  plan = BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=2)

  def ctx_fn(cohort, round_idx, rng):  # Poisson-style participation flags
    return {"participating": jax.random.bernoulli(jax.random.fold_in(rng, 1), 0.7, cohort.shape)}

  alg = fa.fedavg(model, num_clients=ds.num_clients, cohort_size=6, plan=plan, client_opt=client_lib.sgd(0.3),
                  aggregator=aggregator, client_ctx_fn=ctx_fn, fast_path=fast_path, lowrank_width=4)
  state = alg.init(model.init(jax.random.key(0)))
  round_fn = jax.jit(alg.round_fn)
  for _ in range(2):
    state, metrics = round_fn(state, fa.device_train_data(ds), jax.random.key(5))
  return state.params, metrics


@pytest.mark.parametrize("noise_multiplier", [0.0, 0.7])
def test_streaming_dp_fedavg_equals_stacked(noise_multiplier):
  """DP-FedAvg's clipped, noised, fixed-denominator mean computed streaming, on the plain and on the
  low-rank path, equals the stacked aggregator: same clipping, same participation, same noise draw.
  Both paths are checked against one stacked reference run (compiled once)."""
  from fedjax_health.privacy import dp
  stacked = (dp.central_gaussian_mean(0.05, noise_multiplier, 4.2) if noise_multiplier
             else dp.clipped_fixed_mean(0.05, 4.2))
  p_ref, m_ref = _dp_run(stacked, "off")
  for fast_path in ("off", "lowrank"):
    p, m = _dp_run(dp.central_gaussian_streaming(0.05, noise_multiplier, 4.2), fast_path)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, err_msg=fast_path), p, p_ref)
    for key in ("num_participating", "clipped_fraction", "noise_std", "train_loss", "mean_update_norm"):
      np.testing.assert_allclose(m[key], m_ref[key], rtol=1e-5, err_msg=f"{fast_path}: {key}")
    assert 0 < float(m["clipped_fraction"]) <= 1  # the clip norm binds: the test exercises clipping


def test_streaming_dp_validates_arguments():
  from fedjax_health.privacy import dp
  with pytest.raises(ValueError, match="clip_norm"):
    dp.central_gaussian_streaming(0.0, 1.0, 10)
  with pytest.raises(ValueError, match="noise_multiplier"):
    dp.central_gaussian_streaming(1.0, -1.0, 10)


def test_simulation_builds_the_gram_table_for_its_lowrank_round():
  """The launch path (``registry``) gives the round the table the algorithm asks for."""
  from fedjax_health import simulation
  from fedjax_health.config_base import base_config
  from fedjax_health.data import synthetic
  config = base_config()
  config.model.name = "mlp"
  config.client.num_epochs, config.client.batch_size = 1, 4
  config.num_clients = config.cohort_size = 6
  data = synthetic.load(6, alpha=1.0, beta=1.0, seed=0, sizes=np.array([3, 5, 8, 2, 7, 4]))
  from fedjax_health.algorithms import registry
  (exp,) = registry.build_fedavg(config, data, simulation.build_model(config, data))
  assert "lowrank" in exp.round_path
  assert exp.train["gram"].shape == (data.train.num_examples, 8)  # two steps of 4: every bucket
  with pytest.raises(ValueError, match="arrays\\['x'\\]"):
    fa.device_train_data(from_client_arrays([{"u": np.zeros((2, 3), np.float32)}]), 4)


# --- the first layer's products once per round (fedavg(first_layer_products=...)) ---

def test_local_train_from_products_equals_from_inputs():
  """``xw`` (the first layer's x W) and ``gram_x`` instead of the inputs: the same factors, no H."""
  model = models.get_model("mlp", 3, (7,), hidden=(6, 4))
  chain = lowrank.dense_chain(model)
  params = model.init(jax.random.key(0))
  for k, tail in [(3, False), (lowrank.MAX_STEPS + 2, False), (3, None), (lowrank.MAX_STEPS + 2, None)]:
    # unrolled and rolled; later layers factored and dense
    train = jax.jit(lambda xs, ys, m, xw=None, g=None, tail=tail: lowrank.local_train(
        chain, params, xs, ys, m, learning_rate=0.3, momentum=0.5, prox_mu=0.2, xw=xw, gram_x=g, dense_tail=tail))
    xs, ys, mask = _client_batch(k=k)
    x = xs.reshape(-1, 7)
    ref, ref_aux = train(xs, ys, mask)
    got, aux = train(None, ys, mask, xs @ params["body_0"]["kernel"], x @ x.T)
    assert got[0][0] is None and ref[0][0] is not None
    assert [len(f) for f in got] == [3, 3 if tail is False else 2, 3 if tail is False else 2]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got[0][1:], ref[0][1:])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got[1:], ref[1:])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), aux, ref_aux)
  with pytest.raises(ValueError, match="needs xs, or xw and gram_x"):
    lowrank.local_train(chain, params, None, ys, mask, learning_rate=0.3)
  with pytest.raises(ValueError, match="without xs needs gram_x"):
    lowrank.local_train(chain, params, None, ys, mask, learning_rate=0.3, xw=xs @ params["body_0"]["kernel"])
  with pytest.raises(ValueError, match=r"xw must be \[k, b, d_out\]"):
    lowrank.local_train(chain, params, xs, ys, mask, learning_rate=0.3, xw=xs)


def test_scattered_first_layer_equals_weighted_sum():
  """U scattered at the examples' rows, then x^T buf, equals sum_c w_c H_c^T U_c: repeated rows (an
  example in two steps) add up, rows past the buffer (masked slots) are dropped."""
  model = models.get_model("mlp", 3, (7,), hidden=(5,))
  chain = lowrank.dense_chain(model)
  params = model.init(jax.random.key(1))
  rng = np.random.default_rng(0)
  data = rng.normal(size=(18, 7)).astype(np.float32)
  k, b = 4, 3
  rows = np.stack([rng.integers(0, 6, (k, b)) + 6 * c for c in range(3)])  # 3 clients, rows repeat
  rows[0, 3] = 18  # masked slots point past the buffer
  mask = rows < 18
  train = jax.jit(lambda xs, ys, m: lowrank.local_train(chain, params, xs, ys, m, learning_rate=0.2))
  ys = rng.integers(0, 3, (k, b))
  factors = [train(jnp.asarray(data[np.minimum(r, 17)]), ys, mask[c])[0] for c, r in enumerate(rows)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *factors)
  w = jnp.array([2.0, 0.5, 1.0])
  expected = lowrank.weighted_sum(chain, stacked, w)["body_0"]["kernel"]
  buf = lowrank.scatter_first_layer(jnp.zeros((18, 5)), jnp.asarray(rows), stacked[0][1], w)
  padded = np.concatenate([data, np.ones((3, 7), np.float32)])  # rows past the buffer's are not read
  for block in (None, 4, 7, 18):  # one partial block; full blocks and a rest; full blocks only
    np.testing.assert_allclose(lowrank.first_layer_delta(jnp.asarray(padded), buf, block), expected, atol=1e-5)
    # every row of x (one product; the buffer's extra rows zero)
    np.testing.assert_allclose(lowrank.first_layer_delta(jnp.asarray(padded), jnp.pad(buf, ((0, 3), (0, 0))), block),
                               expected, atol=1e-5)
    for n in (21, 18, 5, 0):
      np.testing.assert_allclose(lowrank.first_layer_products(jnp.asarray(padded), params["body_0"]["kernel"], n, block),
                                 padded[:n] @ params["body_0"]["kernel"], atol=1e-5)
  with pytest.raises(ValueError, match="rows must be in"):
    lowrank.first_layer_products(jnp.asarray(padded), params["body_0"]["kernel"], 22)
  with pytest.raises(ValueError, match="buf has 18 rows, x only 5"):
    lowrank.first_layer_delta(jnp.asarray(padded[:5]), buf)
  no_kernel = lowrank.weighted_sum(chain, ((None, stacked[0][1], stacked[0][2]),) + tuple(stacked[1:]), w)
  assert "kernel" not in no_kernel["body_0"] and "kernel" in no_kernel["head"]


def _mixed_data(sizes=(1, 2, 3, 4, 6, 8, 13, 0, 30, 2, 40, 5, 7, 1), dim=64, poison=None):
  """A heavy-tailed population on which ``auto`` trains short clients low-rank and long ones dense
  (``_mixed_run``'s default first layer of 8 units, batch 4: buckets of <= 4 steps low-rank)."""
  rng = np.random.default_rng(1)
  arrays = [{"x": rng.normal(size=(n, dim)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}
            for n in sizes]
  if poison is not None:
    arrays[poison]["x"][0, 3] = np.inf
  return from_client_arrays(arrays)


def _mixed_run(ds, products, *, fast_path="auto", epochs=1, cohort=None, momentum=0.0, prox_mu=0.0, rounds=2,
               trace_only=False, lr=0.1, hidden=8, densify_steps=None):
  model = models.get_model("mlp", 3, (ds.x.shape[1],), hidden=(hidden,))
  plan = BatchPlanSpec.create(ds.client_sizes, 4, num_epochs=epochs)
  alg = fa.fedavg(model, num_clients=ds.num_clients, cohort_size=cohort or ds.num_clients, plan=plan,
                  client_opt=client_lib.sgd(lr, momentum), prox_mu=prox_mu, fast_path=fast_path,
                  first_layer_products=products, lowrank_width=3, densify_steps=densify_steps)
  state = alg.init(model.init(jax.random.key(0)))
  train = fa.device_train_data(ds, alg.gram_rows)
  if trace_only:
    return jax.eval_shape(alg.round_fn, state, train, jax.random.key(0)), alg
  round_fn = jax.jit(alg.round_fn)
  history = []
  for r in range(rounds):
    state, metrics = round_fn(state, train, jax.random.key(r))
    history.append(metrics)
  return (state, history), alg


@pytest.mark.parametrize("setting", [dict(), dict(epochs=2, momentum=0.5, prox_mu=0.3, cohort=9)])
def test_round_with_first_layer_products_equals_per_chunk_and_dense(setting, monkeypatch):
  """Products once per round (narrow, 1- and 2-step low-rank buckets beside dense clients; examples
  repeated over 2 epochs; a partial cohort) equal the per-chunk products and dense training."""
  ds = _mixed_data()
  monkeypatch.setattr(lowrank, "PRODUCT_BLOCK_ROWS", 8)  # the products' and the sum's loops over row blocks
  calls = []
  scatter = lowrank.scatter_first_layer
  monkeypatch.setattr(lowrank, "scatter_first_layer", lambda *a: calls.append(1) or scatter(*a))
  with_products, alg = _mixed_run(ds, True, **setting)
  assert alg.path == "plain+lowrank" and 0 < alg.gram_rows < max(ds.client_sizes)
  assert len(calls) >= 2  # traced: narrow and full buckets scatter into the round's buffer
  calls.clear()
  per_chunk, _ = _mixed_run(ds, False, **setting)
  assert not calls
  _assert_same_rounds(with_products, per_chunk)
  if not setting:
    _assert_same_rounds(with_products, _mixed_run(ds, None, fast_path="off")[0])


def test_round_with_first_layer_products_rejects_a_non_finite_client(monkeypatch):
  """A non-finite input in the table's rows: device_train_data leaves FINITE_TABLE_INPUTS out, so the
  round forms the products per chunk (whose rejected clients' factors are selected away) and rejects
  the client like the plain path; forcing the round-wide products over it would make the sum NaN."""
  ds = _mixed_data(poison=2)  # a 3-example client (low-rank, covered by the table) reads an inf input
  assert fa.FINITE_TABLE_INPUTS in fa.device_train_data(_mixed_data(), 8)
  assert fa.FINITE_TABLE_INPUTS not in fa.device_train_data(ds, 8)
  calls = []
  products = lowrank.first_layer_products
  monkeypatch.setattr(lowrank, "first_layer_products", lambda *a: calls.append(1) or products(*a))
  with_products, _ = _mixed_run(ds, True)
  assert not calls
  _assert_same_rounds(with_products, _mixed_run(ds, None, fast_path="off")[0])
  assert int(with_products[1][0]["num_nonfinite"]) == 1
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(with_products[0].params))


def test_device_train_data_puts_the_table_clients_first():
  """Clients of at most gram_rows examples come first; every client's rows, in order, follow its
  offset; the table covers exactly their rows."""
  ds = _mixed_data()
  train = fa.device_train_data(ds, 8)
  sizes = np.asarray(ds.client_sizes)
  small = sizes <= 8
  covered = int(sizes[small].sum())
  offsets = np.asarray(train["offsets"])
  assert train["gram"].shape == (covered, 8)
  assert np.all(offsets[:-1][small] + sizes[small] <= covered) and np.all(offsets[:-1][~small] >= covered)
  for c in range(ds.num_clients):
    for key in ("x", "y"):
      np.testing.assert_array_equal(np.asarray(train["arrays"][key])[offsets[c]:offsets[c] + sizes[c]],
                                    ds.arrays[key][ds.offsets[c]:ds.offsets[c + 1]])
  np.testing.assert_array_equal(train["sizes"], sizes)
  x = np.asarray(train["arrays"]["x"])
  c = 5  # 6 examples
  np.testing.assert_allclose(train["gram"][offsets[c]:offsets[c] + 6, :6],
                             x[offsets[c]:offsets[c] + 6] @ x[offsets[c]:offsets[c] + 6].T, rtol=1e-5, atol=1e-4)
  assert "gram" not in fa.device_train_data(ds, 0) and np.array_equal(fa.device_train_data(ds, 0)["offsets"],
                                                                       ds.offsets)


def test_first_layer_products_refused_where_they_cannot_apply(require_host_devices):
  model = models.get_model("mlp", 3, (12,), hidden=(16,))
  with pytest.raises(ValueError, match="first_layer_products must be None, True or False"):
    _fedavg(model, first_layer_products="yes")
  with pytest.raises(ValueError, match="first_layer_products=True cannot be used: the round has no low-rank"):
    _fedavg(model, first_layer_products=True, fast_path="off")
  ds = _data()
  fixed = BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=None, num_steps=5)
  with pytest.raises(ValueError, match="no low-rank bucket covered by the input Gram table"):
    _fedavg(model, first_layer_products=True, plan=fixed)
  require_host_devices(2)
  with pytest.raises(ValueError, match="a client mesh is set"):
    _fedavg(model, first_layer_products=True, fast_path="lowrank", mesh=client_lib.make_client_mesh(2))


def test_first_layer_products_automatic_with_most_clients_in_the_cohort(monkeypatch):
  ds = _mixed_data()  # 14 clients
  calls = []
  products = lowrank.first_layer_products
  monkeypatch.setattr(lowrank, "first_layer_products", lambda *a: calls.append(1) or products(*a))
  _mixed_run(ds, None, cohort=11, trace_only=True)  # >= FIRST_LAYER_MIN_COHORT (0.75) of the clients
  assert calls
  calls.clear()
  _mixed_run(ds, None, cohort=10, trace_only=True)
  assert not calls


def test_round_with_first_layer_products_rejects_diverging_clients():
  """Finite inputs, a learning rate that overflows the clients' updates: every client is rejected and
  the round-wide buffer stays finite (a rejected client's NaN U is not scattered, even at weight 0)."""
  ds = _mixed_data()
  (state, history), _ = _mixed_run(ds, True, epochs=2, lr=1e30, rounds=1)
  assert int(history[0]["num_nonfinite"]) == int(np.sum(np.asarray(ds.client_sizes) > 0))
  model = models.get_model("mlp", 3, (ds.x.shape[1],), hidden=(8,))
  jax.tree.map(np.testing.assert_array_equal, state.params, model.init(jax.random.key(0)))


def test_first_layer_products_left_out_past_their_memory_budget(monkeypatch):
  """Products and U buffer larger than the table's rows of inputs and GRAM_TABLE_BUDGET: the round
  forms the products per chunk (and trains the same)."""
  ds = _mixed_data()  # 64 input features; a first layer of 40 units: 2 * 40 > 64
  calls = []
  products = lowrank.first_layer_products
  monkeypatch.setattr(lowrank, "first_layer_products", lambda *a: calls.append(1) or products(*a))
  _mixed_run(ds, True, hidden=40, trace_only=True)
  assert calls  # within the budget (256 MB): formed
  calls.clear()
  monkeypatch.setattr(fa, "GRAM_TABLE_BUDGET", 0)
  left_out, _ = _mixed_run(ds, True, hidden=40, rounds=1)
  assert not calls
  _assert_same_rounds(left_out, _mixed_run(ds, False, hidden=40, rounds=1)[0])


@pytest.mark.parametrize("name,kw,num_classes", MODELS)
def test_densified_local_train_equals_dense_training(name, kw, num_classes):
  """Blocks of k steps from the weights the earlier blocks reached (the last block part-masked; ragged
  batches and an empty step) equal plain dense SGD; fewer blocks equal the dense run of their steps."""
  model = models.get_model(name, num_classes, (7,), **kw)
  chain = lowrank.dense_chain(model)
  params = model.init(jax.random.key(0))
  k, steps = 4, 11
  xs, ys, mask = _client_batch(k=steps, num_classes=num_classes)
  pad = lambda a: jnp.pad(a, ((0, -steps % k),) + ((0, 0),) * (a.ndim - 1)).reshape((-1, k) + a.shape[1:])
  blocks = tuple(pad(a) for a in (xs, ys, mask))
  train = jax.jit(lambda p, n: lowrank.local_train_densified(chain, p, lambda i: tuple(a[i] for a in blocks), n,
                                                             learning_rate=0.3))
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(0.3))
  for num_blocks, ref_steps in [(3, steps), (2, 2 * k)]:
    delta, aux = train(params, jnp.asarray(num_blocks))
    ref, ref_aux = client_lib.local_train(trainer, params, xs[:ref_steps], ys[:ref_steps], mask[:ref_steps],
                                          jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), delta, ref)
    np.testing.assert_allclose(aux["loss"], ref_aux["loss"], rtol=1e-5)
    assert int(aux["num_steps"]) == int(ref_aux["num_steps"])
    assert float(aux["num_examples"]) == float(ref_aux["num_examples"])
  assert int(ref_aux["num_steps"]) == 7  # step 2 is empty: the loss is a mean over the active steps


@pytest.mark.parametrize("setting", [dict(), dict(epochs=3, cohort=9, products=False)])
def test_round_densifies_long_plain_sgd_clients(setting, monkeypatch):
  """Long clients (too many steps for the factors) of plain local SGD train in densified blocks, and
  the round equals dense training of them (densify_steps=0) and the dense path; with momentum or a
  proximal term they train dense."""
  ds = _mixed_data()
  products = setting.pop("products", None)
  calls = []
  densified = lowrank.local_train_densified
  monkeypatch.setattr(lowrank, "local_train_densified", lambda *a, **k: calls.append(1) or densified(*a, **k))
  # 30 and 40 examples of batch 4 in blocks of 3 steps: part-masked last blocks
  blocks, alg = _mixed_run(ds, products, densify_steps=3, **setting)
  assert alg.path == "plain+lowrank" and calls
  calls.clear()
  step_by_step, _ = _mixed_run(ds, products, densify_steps=0, **setting)
  assert not calls
  _assert_same_rounds(blocks, step_by_step)
  _assert_same_rounds(blocks, _mixed_run(ds, None, fast_path="off", **setting)[0])
  for kw in (dict(momentum=0.5), dict(prox_mu=0.3)):
    _mixed_run(ds, products, trace_only=True, densify_steps=3, **setting, **kw)
    assert not calls, kw
  for bad in (-1, 2.0, True):
    with pytest.raises(ValueError, match="densify_steps must be an int >= 0"):
      _mixed_run(ds, products, trace_only=True, densify_steps=bad)


def test_round_checks_the_gram_table_against_its_inputs():
  """A table that does not match the inputs the round reads (inputs normalised after
  device_train_data, a corrupted table, no probe) is refused naming what is wrong; non-finite inputs
  (whose client the round rejects) are not a mismatch."""
  ds = _mixed_data()
  (_, history), alg = _mixed_run(ds, None, rounds=1)
  model = models.get_model("mlp", 3, (ds.x.shape[1],), hidden=(8,))
  state = alg.init(model.init(jax.random.key(0)))
  train = fa.device_train_data(ds, alg.gram_rows)
  probe = np.asarray(train[fa.GRAM_PROBE])
  covered = train["gram"].shape[0]
  assert probe.shape[0] == 2 and probe[0, 0] == 0 and probe[0, -1] == covered - 1
  x = np.asarray(train["arrays"]["x"])
  np.testing.assert_allclose(np.asarray(train["gram"])[probe[0], probe[1]], np.sum(x[probe[0]] ** 2, 1), rtol=1e-5)
  round_fn = jax.jit(alg.round_fn)
  for name, change in [("x", lambda t: {**t, "arrays": {**t["arrays"], "x": t["arrays"]["x"] / 255.0}}),
                       ("gram", lambda t: {**t, "gram": t["gram"].at[int(probe[0, 3])].multiply(1.01)})]:
    with pytest.raises(Exception, match=r"train\['gram'\] does not match train\['arrays'\]\['x'\] at row"):
      jax.block_until_ready(round_fn(state, change(train), jax.random.key(0)))
  for probe_value in (None, train[fa.GRAM_PROBE][0], train[fa.GRAM_PROBE].astype(jnp.float32)):
    bad_probe = {k: v for k, v in train.items() if k != fa.GRAM_PROBE}
    if probe_value is not None:
      bad_probe[fa.GRAM_PROBE] = probe_value
    with pytest.raises(ValueError, match="train\\['gram_probe'\\] must be device_train_data's \\[2, P\\] int"):
      alg.round_fn(state, bad_probe, jax.random.key(0))
  # Client 0's first row, the table's row 0 (probed), reads an inf: its diagonal entry is inf too.
  bad = fa.device_train_data(_mixed_data(poison=0), alg.gram_rows)
  assert int(np.asarray(bad[fa.GRAM_PROBE])[0, 0]) == 0 and not np.isfinite(np.asarray(bad["gram"])[0, 0])
  _, metrics = round_fn(state, bad, jax.random.key(0))
  assert int(metrics["num_nonfinite"]) == 1


def test_random_gram_entries_are_pairs_of_one_covered_clients_examples():
  """The round's random probe picks entries of the table's clients only (a client past the table's
  width or without examples never), pairs of one client's examples, whose values are their inner products."""
  ds = _mixed_data()
  _, alg = _mixed_run(ds, None, trace_only=True)
  train = fa.device_train_data(ds, alg.gram_rows)
  gram, offsets, sizes = (np.asarray(train[k]) for k in ("gram", "offsets", "sizes"))
  cohort = jnp.arange(ds.num_clients)
  rows, cols, partners, valid = (np.asarray(a) for a in fa._random_gram_entries(
      jax.random.key(3), train["gram"], train["offsets"], train["sizes"], cohort, num=400))
  client = np.searchsorted(np.sort(offsets[:-1]), rows, "right") - 1
  client = np.argsort(offsets[:-1], kind="stable")[client]
  covered = (sizes > 0) & (sizes <= gram.shape[1])
  np.testing.assert_array_equal(valid, covered[client] & valid)
  assert set(np.unique(client[valid])) == set(np.flatnonzero(covered))  # 400 draws reach every covered client
  assert not np.any(valid & ~covered[client])
  v = valid
  np.testing.assert_array_equal(partners[v] - offsets[client[v]], cols[v])
  assert np.all((cols[v] < sizes[client[v]]) & (rows[v] - offsets[client[v]] < sizes[client[v]]))
  x = np.asarray(train["arrays"]["x"])
  np.testing.assert_allclose(gram[rows[v], cols[v]], np.sum(x[rows[v]] * x[partners[v]], 1), rtol=1e-4, atol=1e-4)
  assert len(np.unique(cols[v] != rows[v] - offsets[client[v]])) == 2  # off-diagonal entries and diagonal ones


def test_round_catches_inputs_changed_off_the_fixed_probe_rows():
  """Inputs changed after device_train_data on every row the fixed probe does not read pass the
  fixed probe; the round's random entries catch them."""
  ds = _mixed_data()
  (_, _), alg = _mixed_run(ds, None, rounds=1)
  model = models.get_model("mlp", 3, (ds.x.shape[1],), hidden=(8,))
  state = alg.init(model.init(jax.random.key(0)))
  train = fa.device_train_data(ds, alg.gram_rows)
  probe_rows = np.asarray(train[fa.GRAM_PROBE])[0]
  scale = np.full((train["arrays"]["x"].shape[0], 1), 1.5, np.float32)
  scale[probe_rows] = 1.0
  changed = {**train, "arrays": {**train["arrays"], "x": train["arrays"]["x"] * scale}}
  round_fn = jax.jit(alg.round_fn)
  jax.block_until_ready(round_fn(state, train, jax.random.key(0)))
  with pytest.raises(Exception, match=r"train\['gram'\] does not match train\['arrays'\]\['x'\] at row \d+, column"):
    jax.block_until_ready(round_fn(state, changed, jax.random.key(0)))
