import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import client as client_lib
from fedjax_health import models


def _setup(seed=0, n_clients=6, steps=4, batch=3, dim=5):
  rng = np.random.default_rng(seed)
  model = models.get_model("mlp", 3, (dim,), hidden=(4,))
  params = model.init(jax.random.key(seed))
  xs = rng.normal(size=(n_clients, steps, batch, dim)).astype(np.float32)
  ys = rng.integers(0, 3, (n_clients, steps, batch)).astype(np.int32)
  mask = np.ones((n_clients, steps, batch), bool)
  mask[1, 2:] = False  # client 1: last two steps padded
  mask[2, 0, 1:] = False  # client 2: a partial batch
  mask[3] = False  # client 3: no examples
  return model, params, xs, ys, mask


def _reference_local_sgd(model, params, xs, ys, mask, lr, momentum):
  """Plain per-step Python loop: momentum SGD, skipping steps with no example."""
  p = jax.tree.map(np.asarray, params)
  v = jax.tree.map(np.zeros_like, p)
  for s in range(xs.shape[0]):
    if not mask[s].any():
      continue
    m = mask[s].astype(np.float32)
    g = jax.grad(lambda q: jnp.sum(model.example_losses(q, xs[s], ys[s]) * m) / m.sum())(p)
    v = jax.tree.map(lambda a, b: momentum * a + np.asarray(b), v, g)
    p = jax.tree.map(lambda a, b: a - lr * b, p, v)
  return jax.tree.map(lambda a, b: a - b, p, jax.tree.map(np.asarray, params))


def _trainer(model, lr=0.1, momentum=0.9):
  return client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(lr, momentum=momentum))


def _jitted_local_train(trainer):
  """``client.local_train`` for one client, compiled once for all clients of a loop. Called eagerly,
  each call re-traces and recompiles its scan: seconds per client on CPU."""
  return jax.jit(functools.partial(client_lib.local_train, trainer))


def test_local_train_matches_python_loop_with_momentum_and_masks():
  model, params, xs, ys, mask = _setup()
  train = _jitted_local_train(_trainer(model))
  for c in range(xs.shape[0]):
    delta, aux = train(params, xs[c], ys[c], mask[c], jax.random.key(c))
    ref = _reference_local_sgd(model, params, xs[c], ys[c], mask[c], 0.1, 0.9)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), delta, ref)
    assert int(aux["num_steps"]) == int(mask[c].any(axis=1).sum())
    assert float(aux["num_examples"]) == mask[c].sum()


def test_masked_steps_change_nothing():
  """Appending fully-masked steps (with garbage data) leaves the update identical."""
  model, params, xs, ys, mask = _setup()
  trainer = _trainer(model)
  d1, _ = client_lib.local_train(trainer, params, xs[0], ys[0], mask[0], jax.random.key(0))
  xs2 = np.concatenate([xs[0], 100 * np.ones_like(xs[0])])
  ys2 = np.concatenate([ys[0], ys[0]])
  mask2 = np.concatenate([mask[0], np.zeros_like(mask[0])])
  d2, _ = client_lib.local_train(trainer, params, xs2, ys2, mask2, jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), d1, d2)


def test_empty_client_gives_zero_update_not_nan():
  model, params, xs, ys, mask = _setup()
  delta, aux = client_lib.local_train(_trainer(model), params, xs[3], ys[3], mask[3], jax.random.key(0))
  for leaf in jax.tree.leaves(delta):
    np.testing.assert_array_equal(leaf, 0.0)
  assert np.isfinite(float(aux["loss"]))


def test_prox_regularizer_gradient():
  reg = client_lib.prox_regularizer(0.5)
  p = {"w": jnp.array([1.0, 2.0])}
  a = {"w": jnp.array([0.0, 4.0])}
  np.testing.assert_allclose(jax.grad(reg)(p, a)["w"], [0.5, -1.0])
  with pytest.raises(ValueError, match="mu"):
    client_lib.prox_regularizer(-1.0)


@functools.lru_cache(maxsize=None)
def _per_client_reference(n_clients):
  """Each client of ``_setup(n_clients=...)`` trained alone, in a Python loop (computed once per
  session: the parametrised cases below share it)."""
  model, params, xs, ys, mask = _setup(n_clients=n_clients)
  train = _jitted_local_train(_trainer(model))
  outs = [train(params, xs[c], ys[c], mask[c], jax.random.key(c))[0] for c in range(n_clients)]
  return jax.tree.map(lambda *a: np.stack(a), *outs)


@pytest.mark.parametrize("width", [1, 2, 4, 6, 100])
def test_map_clients_every_width_equals_python_reference(width):
  model, params, xs, ys, mask = _setup()
  trainer = _trainer(model)
  keys = jax.random.split(jax.random.key(0), 6)
  keys = jnp.stack([jax.random.key_data(jax.random.key(c)) for c in range(6)])

  def fn(inp):
    x, y, m, k = inp
    return client_lib.local_train(trainer, params, x, y, m, jax.random.wrap_key_data(k))[0]

  got = jax.jit(lambda inp: client_lib.map_clients(fn, inp, width))((xs, ys, mask, keys))
  ref = _per_client_reference(6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, ref)


@pytest.mark.parametrize("num_devices, width", [(4, 1), (4, 2), (2, 3), (8, 1)])
def test_shard_map_equals_single_device(num_devices, width, require_host_devices):
  require_host_devices(num_devices)
  model, params, xs, ys, mask = _setup(n_clients=16)
  trainer = _trainer(model)
  keys = jnp.stack([jax.random.key_data(jax.random.key(c)) for c in range(16)])
  mesh = client_lib.make_client_mesh(num_devices)

  def fn(shared, inp):
    p = shared
    x, y, m, k = inp
    return client_lib.local_train(trainer, p, x, y, m, jax.random.wrap_key_data(k))[0]

  got = jax.jit(lambda p, inp: client_lib.map_clients_sharded(fn, p, inp, width, mesh))(params, (xs, ys, mask, keys))
  ref = _per_client_reference(16)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, ref)


def test_shard_map_rejects_indivisible_cohort(require_host_devices):
  require_host_devices(4)
  mesh = client_lib.make_client_mesh(4)
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    client_lib.map_clients_sharded(lambda s, x: x, 0.0, jnp.zeros((6, 2)), 1, mesh)


def test_make_client_mesh_rejects_too_many_devices():
  with pytest.raises(ValueError, match="num_devices"):
    client_lib.make_client_mesh(jax.device_count() + 1)


@pytest.mark.parametrize("width", [1, 4, 5, 12, 50])
def test_map_sum_clients_equals_stacked_sum(width):
  xs = jnp.arange(12 * 3, dtype=jnp.float32).reshape(12, 3)
  fn = lambda x: ({"s": x * 2.0}, jnp.sum(x))
  total, small = jax.jit(lambda a: client_lib.map_sum_clients(fn, a, width))(xs)
  np.testing.assert_allclose(total["s"], 2.0 * xs.sum(0))
  np.testing.assert_allclose(small, xs.sum(1))


def test_map_sum_clients_sharded_psums_across_devices(require_host_devices):
  require_host_devices(4)
  mesh = client_lib.make_client_mesh(4)
  xs = jnp.arange(8 * 2, dtype=jnp.float32).reshape(8, 2)
  w = jnp.array([1.0, -1.0])
  total, small = jax.jit(lambda a: client_lib.map_sum_clients_sharded(
      lambda shared, x: (x * shared, jnp.sum(x)), w, a, 3, mesh))(xs)
  np.testing.assert_allclose(total, (xs * w).sum(0))
  np.testing.assert_allclose(small, xs.sum(1))


def test_unrolled_local_train_equals_scan():
  model, params, xs, ys, mask = _setup()
  base = _trainer(model)
  unrolled = client_lib.ClientTrainer(base.grad_fn, base.optimizer, unroll=True)
  train_scan, train_unrolled = _jitted_local_train(base), _jitted_local_train(unrolled)
  for c in range(3):
    a, _ = train_scan(params, xs[c], ys[c], mask[c], jax.random.key(c))
    b, _ = train_unrolled(params, xs[c], ys[c], mask[c], jax.random.key(c))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), a, b)


def test_map_sum_clients_unrolled_equals_scan():
  xs = jnp.arange(10 * 3, dtype=jnp.float32).reshape(10, 3)
  fn = lambda x: ({"s": jnp.sin(x)}, jnp.sum(x))
  a = client_lib.map_sum_clients(fn, xs, 3)
  b = client_lib.map_sum_clients(fn, xs, 3, unroll=True)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), a, b)


def test_local_train_dynamic_equals_scan_and_runs_only_its_steps():
  """Exactly ``length`` steps with per-step gathers: same update, loss, counts and per-step keys as
  the scan over the padded steps; steps past ``length`` are never read (their data is NaN)."""
  model, params, xs, ys, mask = _setup(steps=5)
  mask[4, 1] = False  # an empty step in the middle (Poisson batches): skipped, momentum untouched
  mask[:, 3] = False  # no client uses step 3 of the plan...
  mask[:, 4] = True  # ...and step 4 is past every client's length: running it would change the update
  xs[:, 4] = 100.0

  def noisy_grad(p, anchor, x, y, m, key):  # uses the step key: keys must line up with the scan's
    g, loss = client_lib.make_grad_fn(model.example_losses)(p, anchor, x, y, m, key)
    return jax.tree.map(lambda a: a + 0.01 * jax.random.normal(key, a.shape), g), loss

  trainer = client_lib.ClientTrainer(noisy_grad, optax.sgd(0.1, momentum=0.9))
  scan = jax.jit(lambda x, y, m, k: client_lib.local_train(trainer, params, x, y, m, k, num_keys=5))
  dynamic = jax.jit(lambda x, y, m, k, n: client_lib.local_train_dynamic(
      trainer, params, lambda t: (x[t], y[t], m[t]), n, 5, k))
  for c in range(xs.shape[0]):
    length = int(np.max(np.nonzero(mask[c, :4].any(axis=1))[0], initial=-1)) + 1
    d_ref, a_ref = scan(xs[c, :4], ys[c, :4], mask[c, :4], jax.random.key(c))
    d, a = dynamic(xs[c], ys[c], mask[c], jax.random.key(c), jnp.int32(length))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), d, d_ref)
    for k in ("loss", "num_steps", "num_examples"):
      np.testing.assert_allclose(a[k], a_ref[k], rtol=1e-6, err_msg=k)
