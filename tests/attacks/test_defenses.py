import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_health import client as client_lib
from fedjax_health import models
from fedjax_health.attacks import defenses


def _data(seed=0, n=12):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, n))


def test_sanitizing_grad_fn_drops_examples_the_global_model_finds_implausible():
  model = models.get_model("mlp", 3, (4,), hidden=(6,))
  anchor = model.init(jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.1, anchor)
  x, y = _data()
  mask = jnp.ones(12, bool).at[11].set(False)
  p_label = np.asarray(jax.nn.softmax(model.apply(anchor, x)))[np.arange(12), np.asarray(y)]
  threshold = float(np.median(p_label[:11]))
  keep = (p_label >= threshold) & np.asarray(mask)
  g, loss = defenses.sanitizing_grad_fn(model.example_losses, threshold)(params, anchor, x, y, mask, None)
  g_ref, loss_ref = client_lib.make_grad_fn(model.example_losses)(params, anchor, x, y, jnp.asarray(keep), None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, g_ref)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert 0 < keep.sum() < 11
  # A threshold no label falls below keeps everything: the plain gradient.
  g_all, _ = defenses.sanitizing_grad_fn(model.example_losses, 1e-9)(params, anchor, x, y, mask, None)
  g_plain, _ = client_lib.make_grad_fn(model.example_losses)(params, anchor, x, y, mask, None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_all, g_plain)
  with pytest.raises(ValueError, match="min_label_prob"):
    defenses.sanitizing_grad_fn(model.example_losses, 1.0)


def _np_mlp_hidden(params, x):
  return np.maximum(np.asarray(x) @ np.asarray(params["body_0"]["kernel"])
                    + np.asarray(params["body_0"]["bias"]), 0)


def test_pruning_removes_the_least_active_hidden_units():
  model = models.get_model("mlp", 3, (4,), hidden=(10,))
  params = model.init(jax.random.key(1))
  x, _ = _data(1, 50)
  layer, act = defenses.mean_activations(model, params, x)
  assert layer == "body_0"
  h = _np_mlp_hidden(params, x)
  np.testing.assert_allclose(act, h.mean(0), rtol=1e-5, atol=1e-7)
  pruned_params, pruned = defenses.prune_dormant_units(model, params, x, 0.3)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(pruned)), np.sort(np.argsort(h.mean(0))[:3]))
  # The pruned network equals the original with those units' outputs removed.
  hp = h * ~np.asarray(pruned)
  logits = hp @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  np.testing.assert_allclose(model.apply(pruned_params, x), logits, rtol=1e-5, atol=1e-6)
  unchanged, none = defenses.prune_dormant_units(model, params, x, 0.0)
  assert not np.any(np.asarray(none))
  jax.tree.map(np.testing.assert_array_equal, unchanged, params)


def test_pruning_finds_the_dense_layer_of_the_cnn_and_rejects_logreg():
  cnn = models.get_model("cnn", 2, (8, 8, 1), features=(2, 3), dense=5)
  p = cnn.init(jax.random.key(0))
  assert defenses.last_hidden_layer(p) == "body_dense"
  _, pruned = defenses.prune_dormant_units(cnn, p, jnp.ones((3, 8, 8, 1)), 0.4)
  assert int(np.sum(np.asarray(pruned))) == 2
  logreg = models.get_model("logreg", 2, (4,))
  with pytest.raises(ValueError, match="hidden dense layer"):
    defenses.prune_dormant_units(logreg, logreg.init(jax.random.key(0)), jnp.ones((2, 4)), 0.5)
  with pytest.raises(ValueError, match="fraction"):
    defenses.prune_dormant_units(cnn, p, jnp.ones((3, 8, 8, 1)), 1.0)


def test_pruning_finds_the_last_hidden_layer_of_a_deep_mlp():
  # 11 hidden layers of one width: their names sorted as text put body_9 after body_10.
  model = models.get_model("mlp", 3, (4,), hidden=(5,) * 11)
  params = model.init(jax.random.key(0))
  assert defenses.last_hidden_layer(params) == "body_10"
  assert sorted(["body_10", "body_9", "body_2"], key=defenses.natural_key) == ["body_2", "body_9", "body_10"]
  layer, act = defenses.mean_activations(model, params, _data(0, 8)[0])
  assert layer == "body_10" and act.shape == (5,)
