import importlib.util
import os

import jax
import numpy as np
import pytest

from fedjax_health import simulation
from fedjax_health.attacks import attack_defense as ad
from fedjax_health.config_validation import validate_config
from fedjax_health.data import heart_disease

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name, arg="smoke"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def heart():
  return heart_disease.load(normalize="pooled")


@pytest.mark.parametrize("field, value, message", [
    ("attack.fraction", 1.0, r"config.attack.fraction must be in \[0, 1\)"),
    ("attack.kind", "poison", "config.attack.kind"),
    ("defense.aggregator", "krum", r"n > 2f \+ 2"),
    ("defense.aggregator", "bulyan", r"n >= 4f \+ 3"),
    ("attack.trigger", "patch", "'features' for tabular"),
    ("defense.prune_fraction", 1.0, "config.defense.prune_fraction"),
])
def test_bad_attack_defense_configs_fail_naming_the_field(heart, field, value, message):
  config = _config("heart_disease_attack")
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    validate_config(config, heart)


def test_sanitisation_against_model_poisoning_is_refused(heart):
  config = _config("heart_disease_attack")
  config.defense.sanitize = True  # the config's attack uses PGD + replacement
  with pytest.raises(ValueError, match="defense.sanitize"):
    validate_config(config, heart)


def test_trimmed_mean_that_trims_everything_is_refused(heart):
  config = _config("heart_disease_attack")
  config.defense.aggregator = "trimmed_mean"
  config.defense.trim_fraction = 0.5
  with pytest.raises(ValueError, match="trim_fraction"):
    validate_config(config, heart)


def test_carve_server_val_moves_a_share_of_every_client(heart):
  new = ad.carve_server_val(heart, 0.1, seed=0)
  moved = heart.train.client_sizes - new.train.client_sizes
  np.testing.assert_array_equal(moved, np.round(0.1 * heart.train.client_sizes).astype(int))
  assert len(new.server_val["y"]) == moved.sum()
  assert new.train.num_examples + moved.sum() == heart.train.num_examples


@pytest.mark.slow
def test_heart_smoke_config_runs_end_to_end(tmp_path):
  summary = simulation.run(_config("heart_disease_attack"), str(tmp_path), log=lambda s: None)
  (m,) = summary["experiments"].values()
  assert 0.0 <= m["asr"] <= 1.0 and np.isfinite(m["accuracy"])
  # The median rejects no client (a coordinate-wise rule) and the attack runs from round 1, so the
  # malicious hospital's participations are counted and none is rejected: TPR 0, FPR 0.
  assert m["detection_tpr"] == 0.0 and m["detection_fpr"] == 0.0
  assert len(m["rejection_rate_per_client"]) == 4


@pytest.mark.slow
def test_breastmnist_smoke_with_detector_and_pruning_runs_end_to_end(tmp_path):
  config = _config("breastmnist_attack")
  config.defense.aggregator = "mean"
  config.defense.detector = "lrr"
  config.defense.prune_fraction = 0.25
  summary = simulation.run(config, str(tmp_path), log=lambda s: None)
  (m,) = summary["experiments"].values()
  assert {"asr", "unpruned_asr", "unpruned_accuracy", "detection_tpr", "detection_fpr"} <= set(m)
  assert 0.0 <= m["detection_fpr"] <= 1.0


@pytest.mark.slow
def test_nan_attack_is_rejected_and_counted_end_to_end(heart):
  config = _config("heart_disease_attack")
  config.attack.kind = "nonfinite"
  config.attack.pgd_radius = 0.0
  config.attack.replacement = False
  config.defense.aggregator = "mean"
  model = simulation.build_model(config, heart)
  exp = ad.build_experiment(config, heart, model)
  state, rng = exp.init_state, jax.random.key(0)
  round_fn = jax.jit(exp.round_fn)
  counts = []
  for _ in range(3):
    state, metrics = round_fn(state, exp.train, rng)
    counts.append(int(metrics["num_nonfinite"]))
  assert counts == [0, 1, 1]  # the attack starts in round 1 (0-based); hospital 1 sends NaN
  assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(state.params))
  m = exp.evaluate(state)
  assert m["detection_tpr"] == 1.0 and m["detection_fpr"] == 0.0


# ---------------------------------------------------------------- the builder's wiring (issue 15)


def _builder_aggregate(heart, config, updates, weights, malicious):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fedjax_health import context  # pylint: disable=import-outside-toplevel
  model = simulation.build_model(config, heart)
  comp = ad.build_components(config, heart, model)
  agg = comp.aggregator
  params = model.init(jax.random.key(0))
  ctx = context.server_ctx(params=params, cohort=jnp.arange(4), malicious=jnp.asarray(malicious))
  out, _, info = agg.apply({"u": jnp.asarray(updates, jnp.float32)}, jnp.asarray(weights, jnp.float32),
                           agg.init(params), jax.random.key(0), ctx)
  return np.asarray(out["u"]), info


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_builder_applies_model_replacement_with_the_server_learning_rate(heart, server_lr):
  config = _config("heart_disease_attack")
  config.defense.aggregator = "mean"
  config.server.learning_rate = server_lr
  weights = np.array([3.0, 5.0, 2.0, 6.0])
  updates = np.zeros((4, 3))
  updates[1] = [1.0, -2.0, 0.5]  # the attacker (hospital 1); honest updates ~0
  out, info = _builder_aggregate(heart, config, updates, weights, [False, True, False, False])
  # n_S / (n_i eta) boost: the server's lr-eta step lands exactly on the attacker's model.
  np.testing.assert_allclose(server_lr * out, updates[1], rtol=1e-6)
  config.attack.replacement = False
  out, _ = _builder_aggregate(heart, config, updates, weights, [False, True, False, False])
  np.testing.assert_allclose(out, weights[1] / weights.sum() * updates[1], rtol=1e-6)


def test_builder_norm_bound_defence_clips_every_update(heart):
  config = _config("heart_disease_attack")
  config.attack.replacement = False
  config.defense.aggregator = "norm_bound"
  config.defense.max_norm = 0.5
  updates = np.array([[3.0, 4.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.3, 0.4], [0.0, 0.0, -2.0]])
  weights = np.array([1.0, 2.0, 3.0, 4.0])
  out, info = _builder_aggregate(heart, config, updates, weights, [False] * 4)
  norms = np.linalg.norm(updates, axis=1)
  clipped = updates * np.minimum(1.0, 0.5 / norms)[:, None]
  np.testing.assert_allclose(out, weights @ clipped / weights.sum(), rtol=1e-6)
  assert float(info["fraction_clipped"]) == 0.5
