"""Inversion edge cases (issue 15): given labels, any flax model's output bias, bounds, batch checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_health import models
from fedjax_health.attacks import inversion as inv
from fedjax_health.attacks import inversion_objective as ino
from fedjax_health.attacks import inversion_run

SHAPE = (4, 4, 1)


class MyNet(nn.Module):
  """A researcher's own model: default flax layer names, hidden width equal to the class count."""

  @nn.compact
  def __call__(self, x):
    x = nn.sigmoid(nn.Dense(3)(x.reshape(x.shape[0], -1)))
    x = nn.sigmoid(nn.Dense(3)(x))
    return nn.Dense(3)(x)


def _grad(apply_fn, params, x, y):
  return jax.grad(lambda p: ino.batch_mean_loss(apply_fn, p, x, y))(params)


@pytest.fixture(scope="module")
def mynet():
  net = MyNet()
  params = net.init(jax.random.key(0), jnp.zeros((1,) + SHAPE))["params"]
  return (lambda p, x: net.apply({"params": p}, x)), params


def test_output_bias_of_any_flax_model_is_found_by_its_jacobian(mynet):
  apply_fn, params = mynet
  assert "head" not in params
  # Three 1-D biases of size 3: only the last one shifts the logits one to one.
  assert ino.find_output_bias(apply_fn, params, SHAPE) == ("Dense_2", "bias")
  x = jax.random.uniform(jax.random.key(1), (1,) + SHAPE)
  path = ("Dense_2", "bias")
  for label in range(3):  # the label rule on the found layer, for every class
    g = _grad(apply_fn, params, x, jnp.array([label]))
    assert int(ino.idlg_label(ino.head_bias(g, path))) == label
  rec = inv.idlg(apply_fn, params, g, jax.random.key(0), input_shape=SHAPE, num_classes=3, num_steps=2)
  assert int(rec.labels[0]) == 2  # end to end through the public wrapper


def test_given_labels_are_honoured_by_inverting_gradients():
  m = models.get_model("mlp", 2, SHAPE, hidden=(5,))
  p = m.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (1,) + SHAPE)
  g = _grad(m.apply, p, x, jnp.array([1]))
  rec = inv.inverting_gradients(m, p, g, jax.random.key(0), batch_size=1, input_shape=SHAPE, num_classes=2,
                                labels=np.array([0]), num_steps=2, num_restarts=1)
  assert int(rec.labels[0]) == 0  # the given label, not iDLG's (which reads 1)
  spec = inv.inverting_gradients_spec(1, SHAPE, 2, num_steps=2)
  with pytest.raises(ValueError, match="labels were passed but spec.labels='idlg' would ignore them"):
    inv.invert(m, p, g, jax.random.key(0), spec, labels=np.array([0]))


def test_idlg_refuses_batches_clearly():
  with pytest.raises(ValueError, match="batch_size 1 only"):
    inv.idlg_spec(SHAPE, 3, batch_size=4)
  m = models.get_model("mlp", 3, SHAPE, hidden=(6,), activation="sigmoid")
  p = m.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (4,) + SHAPE)
  g4 = _grad(m.apply, p, x, jnp.array([0, 1, 2, 1]))
  with pytest.raises(ValueError, match="gradient of ONE example"):
    inv.idlg(m, p, g4, jax.random.key(0), input_shape=SHAPE, num_classes=3, num_steps=2)
  same = _grad(m.apply, p, x, jnp.array([2, 2, 2, 2]))  # one negative bias entry: the kernel's rank tells
  with pytest.raises(ValueError, match="rank > 1"):
    inv.idlg(m, p, same, jax.random.key(0), input_shape=SHAPE, num_classes=3, num_steps=2)
  g1 = _grad(m.apply, p, x[:1], jnp.array([2]))
  assert int(inv.idlg(m, p, g1, jax.random.key(0), input_shape=SHAPE, num_classes=3, num_steps=2).labels[0]) == 2


def test_lbfgs_projects_every_iterate_onto_the_bounds(monkeypatch):
  seen = []
  project = ino.project_dummy

  def recording(spec, z):
    out = project(spec, z)
    jax.debug.callback(lambda lo, hi: seen.append((float(lo), float(hi))), jnp.min(out["x"]), jnp.max(out["x"]))
    return out

  monkeypatch.setattr(inv, "project_dummy", recording)
  m = models.get_model("mlp", 2, (6,), hidden=(4,))
  p = m.init(jax.random.key(0))
  x = jnp.asarray([[3.0, -2.0, 0.5, 4.0, -1.0, 2.0]])  # outside the bounds: the unconstrained optimum leaves them
  g = _grad(m.apply, p, x, jnp.array([1]))
  spec = inv.dlg_spec(1, (6,), 2, num_steps=4, bounds=(0.0, 1.0), labels="given")
  rec = inv.invert(m, p, g, jax.random.key(0), spec, labels=np.array([1]))
  assert len(seen) == 4 + 1  # after each of the 4 L-BFGS steps, and the final one
  assert all(0.0 <= lo and hi <= 1.0 for lo, hi in seen)
  assert float(rec.x.min()) >= 0.0 and float(rec.x.max()) <= 1.0


def test_tv_weight_default_is_the_same_in_the_function_and_the_config():
  spec = inv.inverting_gradients_spec(1, (8, 8, 3), 5)
  assert spec.tv_weight == inversion_run.inversion_config().tv_weight
  assert spec.num_steps == inversion_run.inversion_config().num_steps
