"""DP-SGD: per-example clipped, noised gradients vs a slow loop; Poisson batch plans."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import client as client_lib
from fedjax_health import models
from fedjax_health.privacy import dp, dp_sgd


def _setup(batch=7, seed=0):
  model = models.get_model("mlp", 3, (4,), hidden=(5,))
  params = model.init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, 4)) * 3, jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, batch), jnp.int32)
  mask = jnp.asarray(rng.random(batch) < 0.7)
  return model, params, x, y, mask


def _slow_reference(model, params, x, y, mask, clip, denom):
  total = jax.tree.map(jnp.zeros_like, params)
  grad_one = jax.jit(jax.grad(lambda p, xi, yi: model.example_losses(p, xi, yi)[0]))
  for i in range(x.shape[0]):  # one example at a time, the obvious way
    if not bool(mask[i]):
      continue
    g = grad_one(params, x[i:i + 1], y[i:i + 1])
    norm = float(np.sqrt(sum(float(jnp.sum(l ** 2)) for l in jax.tree.leaves(g))))
    s = min(1.0, clip / max(norm, 1e-12))
    total = jax.tree.map(lambda t, gl: t + s * gl, total, g)
  return jax.tree.map(lambda t: t / denom, total)


@pytest.mark.parametrize("clip", [0.05, 0.5, 50.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_per_example_path_equals_slow_loop(clip, seed):
  model, params, x, y, mask = _setup(seed=seed)
  grad_fn = dp_sgd.dp_sgd_grad_fn(model.example_losses, clip, None, 3.5)
  g, loss = jax.jit(grad_fn)(params, params, x, y, mask, jax.random.key(0))
  ref = _slow_reference(model, params, x, y, mask, clip, 3.5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, ref)
  m = np.asarray(mask)
  np.testing.assert_allclose(loss, np.asarray(model.example_losses(params, x, y))[m].mean(), rtol=1e-5)


def test_noise_is_z_c_over_denominator_from_the_given_key():
  model, params, x, y, mask = _setup()
  clip, z, denom = 0.5, 1.7, 3.0
  key = jax.random.key(5)
  noisy, _ = dp_sgd.dp_sgd_grad_fn(model.example_losses, clip, z, denom)(params, params, x, y, mask, key)
  clean, _ = dp_sgd.dp_sgd_grad_fn(model.example_losses, clip, None, denom)(params, params, x, y, mask, key)
  expected = dp.gaussian_like(key, clean, z * clip)
  jax.tree.map(lambda n, c, e: np.testing.assert_allclose(n - c, e / denom, rtol=1e-4, atol=1e-6), noisy, clean,
               expected)
  again, _ = dp_sgd.dp_sgd_grad_fn(model.example_losses, clip, z, denom)(params, params, x, y, mask, key)
  jax.tree.map(np.testing.assert_array_equal, noisy, again)  # deterministic given the key


def test_step_slot_is_ignored_and_regularizer_added():
  model, params, x, y, mask = _setup()
  reg = client_lib.prox_regularizer(0.3)
  anchor = jax.tree.map(lambda p: p + 0.1, params)
  base = dp_sgd.dp_sgd_grad_fn(model.example_losses, 1.0, None, 2.0, reg)
  slot = dp_sgd.dp_sgd_grad_fn(model.example_losses, 1.0, None, 2.0, reg, step_slot=True)
  xs = jnp.concatenate([x, 100 * jnp.ones((1, 4))])
  ys = jnp.concatenate([y, jnp.zeros(1, jnp.int32)])
  ms = jnp.concatenate([mask, jnp.ones(1, bool)])
  g1, _ = base(params, anchor, x, y, mask, jax.random.key(0))
  g2, _ = slot(params, anchor, xs, ys, ms, jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g1, g2)
  plain, _ = dp_sgd.dp_sgd_grad_fn(model.example_losses, 1.0, None, 2.0)(params, anchor, x, y, mask, jax.random.key(0))
  jax.tree.map(lambda a, b, p, q: np.testing.assert_allclose(a - b, 0.3 * (p - q), rtol=1e-4, atol=1e-7),
               g1, plain, params, anchor)


def test_poisson_plan_rate_validity_and_step_slot():
  sizes = jnp.array([0, 3, 50], jnp.int32)
  q, steps = 0.3, 400
  pos, mask = jax.jit(dp_sgd.poisson_batch_plan(q, steps, 50))(jax.random.key(0), sizes)
  assert pos.shape == (3, steps, 51) and mask.shape == (3, steps, 51)
  m = np.asarray(mask)
  assert not m[0].any()  # empty client: nothing, not even the step slot
  assert m[1:, :, -1].all()  # step slot always on for non-empty clients
  assert not m[1, :, 3:50].any()  # only the client's own examples
  p = np.asarray(pos)[:, :, :-1]
  assert np.all(p[1][m[1, :, :-1]] < 3) and np.all(p[2][m[2, :, :-1]] < 50)
  rate = m[2, :, :50].mean()
  assert abs(rate - q) < 4 * np.sqrt(q * (1 - q) / (steps * 50))
  # Independent across steps: batch sizes have the binomial variance.
  sizes_per_step = m[2, :, :50].sum(1)
  assert abs(sizes_per_step.var() / (50 * q * (1 - q)) - 1) < 0.25
  with pytest.raises(ValueError):
    dp_sgd.poisson_batch_plan(0.0, 5, 10)


def test_empty_poisson_batches_still_take_a_noised_step():
  model, params, _, _, _ = _setup()
  plan_fn = dp_sgd.poisson_batch_plan(1e-6, 4, 1)  # one example, practically never sampled
  pos, mask = plan_fn(jax.random.key(0), jnp.array([1]))
  assert not np.asarray(mask[0, :, :-1]).any()
  x = jnp.ones((4, 2, 4))
  y = jnp.zeros((4, 2), jnp.int32)
  trainer = client_lib.ClientTrainer(dp_sgd.dp_sgd_grad_fn(model.example_losses, 1.0, 1.0, 1.0, step_slot=True),
                                     optax.sgd(0.1))
  delta, aux = client_lib.local_train(trainer, params, x, y, mask[0], jax.random.key(1))
  assert int(aux["num_steps"]) == 4
  assert float(client_lib.tree_sq_norm(delta)) > 0  # the noise moved the model although no example was used


@pytest.mark.parametrize("kwargs", [dict(clip_norm=0.0), dict(noise_multiplier=0.0), dict(noise_multiplier=-1.0),
                                    dict(denominator=0.0)])
def test_bad_hyperparameters(kwargs):
  args = dict(clip_norm=1.0, noise_multiplier=1.0, denominator=1.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=list(kwargs)[0]):
    dp_sgd.dp_sgd_grad_fn(lambda p, x, y: x, **args)
