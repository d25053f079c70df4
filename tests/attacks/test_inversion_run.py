"""The inversion run mode: recorded engine updates, victim data, config checks, end to end."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import client as client_lib
from fedjax_health import models, simulation
from fedjax_health.attacks import inversion_run as ir
from fedjax_health.config_validation import validate_config
from fedjax_health.data.federated import from_client_arrays

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _config(name, arg=""):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_recorded_round_updates_equal_local_train_per_client():
  """The capture transform sees exactly each victim's local update (3 full-batch SGD steps)."""
  config = _config("inversion_heart_disease", "smoke")
  config.inversion.batch_size, config.inversion.local_steps = 2, 3
  r = np.random.default_rng(0)
  victims = from_client_arrays([{"x": r.normal(size=(2, 13)).astype(np.float32), "y": np.array([0, 1], np.int32)}
                                for _ in range(3)])
  m = models.get_model("mlp", 2, (13,), hidden=(4,), activation="sigmoid", binary_single_logit=True)
  p = m.init(jax.random.key(0))
  got = ir.record_round(config, victims, m, p)
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(m.example_losses), optax.sgd(config.client.learning_rate))
  for v in range(3):
    d = victims.client(v)
    xs, ys = np.stack([d["x"]] * 3), np.stack([d["y"]] * 3)
    want, _ = client_lib.local_train(trainer, p, xs, ys, jnp.ones((3, 2), bool), jax.random.key(1))
    chex.assert_trees_all_close(jax.tree.map(lambda u: u[v], got), want, atol=1e-6)


def test_victim_dataset_takes_each_batch_from_one_real_client():
  train = from_client_arrays([{"x": np.full((n, 2), c, np.float32), "y": np.zeros(n, np.int32)}
                              for c, n in enumerate([5, 1, 3])])
  ds, x, y = ir.victim_dataset(train, 4, 2, np.random.default_rng(0))
  assert x.shape == (4, 2, 2) and y.shape == (4, 2) and ds.num_clients == 4
  np.testing.assert_array_equal(x[:, :, 0], [[0, 0], [2, 2], [0, 0], [2, 2]])  # client 1 is too small
  np.testing.assert_array_equal(ds.x.reshape(4, 2, 2), x)
  with pytest.raises(ValueError, match="batch_size=9"):
    ir.victim_dataset(train, 2, 9, np.random.default_rng(0))


def test_downsample_keeps_range_and_shape():
  x = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
  out = ir.downsample(x, 8)
  assert out.shape == (3, 8, 8, 1) and out.min() >= 0 and out.max() <= 1
  np.testing.assert_allclose(out.mean(), x.mean(), atol=0.02)
  assert ir.downsample(x, 0) is x


@pytest.mark.parametrize("field,value,match", [
    ("attack", "breaching", "inversion.attack"),
    ("noise_multiplier", 0.1, "inversion.clip_norm"),
    ("secure_agg_group", 3, "inversion.secure_agg_group"),
    ("resolution", 2, "inversion.resolution"),
    ("labels", "hard", "inversion.labels"),
    ("num_victims", 0, "inversion.num_victims"),
])
def test_config_check_names_the_field(field, value, match):
  config = _config("inversion_breastmnist", "smoke")
  config.inversion[field] = value
  with pytest.raises(ValueError, match=match):
    validate_config(config)


def test_idlg_attack_needs_one_example_per_upload():
  config = _config("inversion_breastmnist", "smoke")
  config.inversion.attack, config.inversion.batch_size = "idlg", 2
  with pytest.raises(ValueError, match="inversion.batch_size"):
    validate_config(config)


@pytest.mark.slow
def test_breastmnist_smoke_end_to_end(tmp_path):
  summary = simulation.run(_config("inversion_breastmnist", "smoke"), str(tmp_path), log=lambda s: None)
  for name in ("summary.json", "reconstructions.npz", "inversion_grid.png", "config.json"):
    assert os.path.exists(os.path.join(tmp_path, name)), name
  with open(os.path.join(tmp_path, "summary.json")) as f:
    assert json.load(f)["num_attacks"] == 4
  assert summary["label_accuracy"] == 1.0  # iDLG
  assert 0 < summary["psnr_mean"] < 200 and -1 <= summary["ssim_mean"] <= 1


@pytest.mark.slow
def test_heart_disease_smoke_with_noise_and_secure_aggregation():
  """Local DP (privacy.dp.local_gaussian) and SecAgg groups of 2 run through the same path."""
  config = _config("inversion_heart_disease", "smoke")
  config.inversion.update(noise_multiplier=0.5, clip_norm=1.0, secure_agg_group=2, local_steps=2, labels="soft")
  validate_config(config)
  out = ir.attack_round(config, log=lambda s: None)
  assert out["x_rec"].shape == (2, 2, 13) and out["x_true"].shape == (2, 2, 13)
  assert out["epsilon_one_upload"] > 1.0  # z/2 = 0.25: a weak single-release guarantee
  assert 0 <= out["recovered_fraction"] <= 1 and np.isfinite(out["feature_mae"])
  assert set(out["per_feature_mae_raw"].shape) == {13}
