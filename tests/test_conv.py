import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from fedjax_health import client as client_lib
from fedjax_health import models
from fedjax_health.models import conv

SPEC = ("NHWC", "HWIO", "NHWC")


def _inputs(seed=0, shape=(3, 9, 8, 2), kernel=(3, 2, 2, 5), dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape), dtype), jnp.asarray(rng.normal(size=kernel), dtype))


@pytest.mark.parametrize("padding", ["VALID", "SAME", ((1, 0), (2, 1))])
def test_values_and_gradients_equal_lax(padding):
  with jax.enable_x64(True):  # float64: the comparison is to rounding, not to float32 noise
    _check_equal_lax(padding)


def _check_equal_lax(padding):
  x, w = _inputs(dtype=jnp.float64)

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w, (1, 1), padding, dimension_numbers=SPEC)) ** 2)

  ours, ref = loss(conv.conv_general_dilated), loss(lax.conv_general_dilated)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-12)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

  # Second order (gradient inversion differentiates a gradient w.r.t. the input).
  def grad_norm(fn):
    return lambda x: sum(jnp.sum(g ** 2) for g in jax.tree.leaves(jax.grad(fn, 1)(x, w)))

  np.testing.assert_allclose(jax.grad(grad_norm(ours))(x), jax.grad(grad_norm(ref))(x), rtol=1e-10, atol=1e-12)


def test_other_calls_go_to_lax_unchanged():
  x, w = _inputs(shape=(2, 9, 9, 2), kernel=(3, 3, 2, 4))
  for kw in (dict(window_strides=(2, 2), padding="SAME"), dict(window_strides=(1, 1), padding="VALID", rhs_dilation=(2, 2))):
    np.testing.assert_array_equal(conv.conv_general_dilated(x, w, dimension_numbers=SPEC, **kw),
                                  lax.conv_general_dilated(x, w, dimension_numbers=SPEC, **kw))


def test_cnn_training_in_a_client_scan_uses_only_canonical_convolutions():
  """What the module is for: inside a scan over clients, every convolution of the CNN's training
  step (forward, input and kernel gradients) is in XLA CPU's canonical NHWC/HWIO form, so it runs
  as a library convolution instead of a naive loop (lax's autodiff gives f01b_i01o->01bf there)."""
  model = models.get_model("cnn", 3, (10, 10, 1), features=(2, 3), dense=4)
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(0.1), unroll=True)
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.random((3, 2, 4, 10, 10, 1)), jnp.float32)
  ys, mask = jnp.asarray(rng.integers(0, 3, (3, 2, 4))), jnp.ones((3, 2, 4), bool)

  def scan(p, xs, ys, mask):
    def body(acc, c):
      delta = client_lib.local_train(trainer, p, *c, jax.random.key(0))[0]
      return jax.tree.map(jnp.add, acc, delta), None
    return lax.scan(body, jax.tree.map(jnp.zeros_like, p), (xs, ys, mask))[0]

  hlo = jax.jit(scan).lower(params, xs, ys, mask).compile().as_text()
  labels = re.findall(r"convolution\(.*?dim_labels=([a-z0-9_>-]+)", hlo)
  # 2 steps x (2 forward + 2 kernel gradients + 1 input gradient: the first layer's is not needed)
  assert len(labels) == 10, labels
  assert set(labels) == {"b01f_01io->b01f"}, sorted(set(labels))
