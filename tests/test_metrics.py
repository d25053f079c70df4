import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_health import metrics, models
from fedjax_health.data.federated import from_client_arrays


def test_roc_auc_matches_sklearn_with_ties():
  sk = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  for _ in range(5):
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding creates ties
    assert metrics.roc_auc(s, y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
  assert np.isnan(metrics.roc_auc(np.arange(3.0), np.ones(3)))


def test_evaluator_per_client_matches_loop():
  rng = np.random.default_rng(0)
  sizes = [4, 0, 9, 6]
  ds = from_client_arrays([{"x": rng.normal(size=(n, 3)).astype(np.float32),
                            "y": rng.integers(0, 4, n).astype(np.int32)} for n in sizes])
  model = models.get_model("mlp", 4, (3,), hidden=(5,))
  params = model.init(jax.random.key(0))
  ev = metrics.make_evaluator(model.apply, 4, 4, chunk=4)  # chunk < N exercises the chunked path
  out = ev(params, metrics.device_eval_data(ds))
  accs = []
  for c in range(4):
    d = ds.client(c)
    if len(d["y"]):
      pred = np.argmax(np.asarray(model.apply(params, d["x"])), -1)
      accs.append(np.mean(pred == d["y"]))
      assert out["per_client_accuracy"][c] == pytest.approx(accs[-1])
  assert out["mean_client_accuracy"] == pytest.approx(np.mean(accs))
  assert out["worst_client_accuracy"] == pytest.approx(np.min(accs))
  pred = np.argmax(np.asarray(model.apply(params, ds.x)), -1)
  assert out["accuracy"] == pytest.approx(np.mean(pred == ds.y))
  assert "auc" not in out


def test_binary_single_logit_loss_and_auc():
  logits = jnp.array([[2.0], [-1.0], [0.5]])
  y = jnp.array([1, 0, 0])
  expected = -np.log(1 / (1 + np.exp(-2.0))), -np.log(1 - 1 / (1 + np.exp(1.0))), -np.log(1 - 1 / (1 + np.exp(-0.5)))
  np.testing.assert_allclose(models.per_example_loss(logits, y), expected, rtol=1e-5)
  np.testing.assert_array_equal(models.predict_labels(logits), [1, 0, 1])


def test_worst_fraction_and_bytes():
  assert metrics.worst_fraction_mean(np.arange(20.0), 0.1) == pytest.approx(0.5)
  assert metrics.bytes_per_update({"a": jnp.zeros((10, 3)), "b": jnp.zeros(2)}) == 128
