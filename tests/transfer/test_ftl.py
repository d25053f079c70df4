"""The plaintext FTL protocol: its gradients and loss equal jax.grad of the stated loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fedjax_health.transfer import ftl


def _setup(n_a=20, n=8, f_a=3, f_b=4, d=4, hidden=(3,), seed=0):
  rng = np.random.default_rng(seed)
  x_a = jnp.asarray(rng.normal(size=(n_a, f_a)), jnp.float32)
  y_a = jnp.asarray(rng.integers(0, 2, n_a), jnp.float32)
  x_b = jnp.asarray(rng.normal(size=(n, f_b)), jnp.float32)
  net_a, net_b = ftl.party_network(hidden, d), ftl.party_network(hidden, d)
  p_a = net_a.init(jax.random.key(seed), x_a[:1])
  p_b = net_b.init(jax.random.key(seed + 1), x_b[:1])
  return net_a, net_b, p_a, p_b, x_a, y_a, x_b


@pytest.mark.parametrize("alignment,hidden", [("squared", (3,)), ("dot", ())])
def test_protocol_gradients_and_loss_equal_jax_grad(alignment, hidden):
  net_a, net_b, p_a, p_b, x_a, y_a, x_b = _setup(hidden=hidden)
  hp = ftl.FTLHyper(alpha=1.3, gamma=0.7, lam=0.05, alignment=alignment)
  fns, _ = ftl.make_party_fns(net_a, net_b, p_a, p_b, hp)
  pa, pb = ftl.compute_parties(fns, ravel_pytree(p_a)[0], ravel_pytree(p_b)[0], x_a, y_a, x_b)
  g_a, g_b, loss = ftl.protocol_gradients(pa, pb)
  ref_a, ref_b = jax.grad(lambda a, b: ftl.ftl_loss(a, b, net_a, net_b, x_a, y_a, x_b, hp), argnums=(0, 1))(p_a, p_b)
  np.testing.assert_allclose(g_a, ravel_pytree(ref_a)[0], atol=2e-6, rtol=1e-4)
  np.testing.assert_allclose(g_b, ravel_pytree(ref_b)[0], atol=2e-6, rtol=1e-4)
  ref_loss = ftl.ftl_loss(p_a, p_b, net_a, net_b, x_a, y_a, x_b, hp._replace(lam=0.0))
  np.testing.assert_allclose(loss, float(ref_loss), rtol=1e-5)
  # A sends d*d + N*d values, B sends N*d + d*d: the exchanged components of the paper.
  assert pa.v.shape == pb.v.shape == (16 + 8 * 4,)


def test_stated_loss_is_the_taylor_expansion_of_the_logistic_loss():
  phi = jnp.linspace(-0.2, 0.2, 9)
  for y in (-1.0, 1.0):
    exact = jnp.log1p(jnp.exp(-y * phi))
    np.testing.assert_allclose(ftl.taylor_logistic(y, phi), exact, atol=1e-5)  # error O(phi^4)
  # Class representation: mean of y u with y in {-1, +1}.
  u = jnp.array([[1.0, 2.0], [3.0, 5.0]])
  np.testing.assert_allclose(ftl.class_representation(u, jnp.array([0.0, 1.0])), [1.0, 1.5])


def test_training_lowers_the_loss_and_predict_uses_phi():
  net_a, net_b, p_a, p_b, x_a, y_a, x_b = _setup()
  hp = ftl.FTLHyper(gamma=0.1)
  res = ftl.train_ftl(net_a, net_b, p_a, p_b, x_a, y_a, x_b, hp, epochs=30, lr=0.05, log_every=0)
  assert res.losses[-1] < res.losses[0]
  scores = ftl.predict_b(net_b, res.params_b, res.phi, np.asarray(x_b))
  np.testing.assert_allclose(scores, np.asarray(net_b.apply(res.params_b, x_b)) @ res.phi, rtol=1e-6)


def test_bad_inputs():
  net_a, net_b, p_a, p_b, x_a, y_a, x_b = _setup()
  with pytest.raises(ValueError, match="ftl.alignment"):
    ftl.make_party_fns(net_a, net_b, p_a, p_b, ftl.FTLHyper(alignment="cosine"))
  with pytest.raises(ValueError, match="ftl.gamma"):
    ftl.check_hyper(ftl.FTLHyper(gamma=-1.0))
  with pytest.raises(ValueError, match="overlap is empty"):
    ftl.train_ftl(net_a, net_b, p_a, p_b, x_a, y_a, x_b[:0], ftl.FTLHyper(), epochs=1, lr=0.1)
  with pytest.raises(ValueError, match="ftl.dim"):
    ftl.party_network((), 0)
