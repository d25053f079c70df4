import dataclasses

import jax
import numpy as np
import pytest

from fedjax_health import config_validation, simulation
from fedjax_health.config_base import base_config
from fedjax_health.data.federated import FederatedData, from_client_arrays
from fedjax_health.heterogeneous import algorithms as hetero
from fedjax_health.heterogeneous import groups as groups_lib
from fedjax_health.heterogeneous import public_data
from fedjax_health.heterogeneous import transforms as T
from fedjax_health.models import predict_labels

SIZES = (10, 7, 12, 6)


def tiny_data(seed=0, sizes=SIZES, test_size=8, dim=5, public=24) -> FederatedData:
  """Two classes; client 3 holds class 0 only (a client missing a class)."""
  rng = np.random.default_rng(seed)

  def part(n, only0):
    y = np.zeros(n, np.int32) if only0 else rng.integers(0, 2, n).astype(np.int32)
    return {"x": (rng.normal(size=(n, dim)) + 1.5 * y[:, None]).astype(np.float32), "y": y}

  train = from_client_arrays([part(n, c == 3) for c, n in enumerate(sizes)])
  test = from_client_arrays([part(test_size, c == 3) for c in range(len(sizes))])
  pub = part(public, False)
  return FederatedData(train, test, 2, "tiny", public=pub)


def tiny_config(algorithm, groups=({"name": "logreg", "binary_single_logit": False}, {"name": "mlp", "hidden": (5,)})):
  config = hetero.add_config(base_config())
  config.algorithm = algorithm
  config.dataset.name = "heart_disease_public"
  config.hetero.model_groups = groups
  config.client.num_steps = 2
  config.client.batch_size = 4
  config.fast_path = "off"  # the dense per-client path: the low-rank one compiles longer
  config.client.learning_rate = 0.1
  config.hetero.feddf_steps = 6
  config.hetero.feddf_eval_every = 2
  config.hetero.fedmd_pretrain_epochs = 1
  return config


_JITTED = {}


def jitted(exp):
  """Returns ``exp``'s jitted round, compiled once per experiment (test_resume.py reuses it)."""
  return _JITTED.setdefault(id(exp), (exp, jax.jit(exp.round_fn)))[1]


def run(exp, rounds=2):
  fn = jitted(exp)
  state, metrics = exp.init_state, None
  for _ in range(rounds):
    state, metrics = fn(state, exp.train, jax.random.key(7))
  return state, metrics


def build(config, data):
  config_validation.validate_config(config)
  config_validation.validate_config(config, data)
  [exp] = simulation.ALGORITHMS[config.algorithm](config, data, None)
  return exp


def leaves_close(a, b, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def leaves_differ(a, b):
  return any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


_RUNS = {}


def cached_run(algorithm, **hetero_fields):
  """Returns (experiment, state, metrics) after 2 rounds; each setting compiles once per test session."""
  key = (algorithm, tuple(sorted(hetero_fields.items())))
  if key not in _RUNS:
    config = tiny_config(algorithm)
    for k, v in hetero_fields.items():
      config.hetero[k] = v
    exp = build(config, tiny_data())
    _RUNS[key] = (exp,) + run(exp)
  return _RUNS[key]


@pytest.mark.parametrize("method,field", [("fd", "fd_weight"), ("fedproto", "proto_weight")])
def test_weight_zero_equals_local_only(method, field):
  _, local, _ = cached_run("hetero_local")
  _, zero, _ = cached_run(method, **{field: 0.0})
  leaves_close(zero.clients, local.clients, atol=1e-6)
  _, one, _ = cached_run(method)  # weight 1; round 2 has a teacher / prototypes, so the term acts
  assert leaves_differ(one.clients, local.clients)


def test_feddf_without_distillation_equals_fedavg_within_groups():
  _, df, _ = cached_run("feddf", feddf_steps=0)
  _, fa, _ = cached_run("hetero_fedavg")
  leaves_close(df.clients, tuple(s.params for s in fa), atol=1e-5)
  _, distilled, m = cached_run("feddf")
  assert leaves_differ(distilled.clients, df.clients)
  assert all(int(v) > 0 for k, v in m.items() if k.endswith("distill_steps"))


def test_client_models_are_judged_on_their_own_test_split():
  data = tiny_data()
  exp, state, _ = cached_run("hetero_local")
  out = exp.evaluate(state)
  groups = hetero.build_groups(tiny_config("hetero_local"), data)
  acc = np.zeros(data.num_clients)
  for g, stacked in zip(groups, state.clients):
    for j, c in enumerate(g.clients):
      params = jax.tree.map(lambda a: a[j], stacked)
      t = data.test.client(c)
      acc[c] = np.mean(np.asarray(predict_labels(g.model.apply(params, t["x"]))) == t["y"])
  np.testing.assert_allclose(out["per_client_accuracy"], acc, atol=1e-6)
  assert out["mean_client_accuracy"] == pytest.approx(acc.mean())
  assert out["worst10_client_accuracy"] == pytest.approx(acc.min())


def test_bytes_per_round_equal_closed_forms():
  n = len(SIZES)
  sizes = {"fd": T.fd_bytes(2)[0], "fedproto": T.fedproto_bytes(2, 5)[0], "hetero_local": 0}
  for method, want in sizes.items():
    _, _, m = cached_run(method)
    assert float(m["bytes_up_per_client"]) == want and float(m["bytes_down_per_client"]) == want
    assert float(m["bytes_up_per_round"]) == want * n
  _, _, m = cached_run("fedmd", fedmd_public_per_round=10)
  assert float(m["bytes_up_per_client"]) == 10 * 2 * 4
  # FedDF: each client moves its group's model; round robin puts clients 0, 2 on logreg (5*2+2
  # values) and 1, 3 on the MLP (5*5+5+5*2+2).
  _, _, m = cached_run("feddf")
  assert float(m["bytes_up_per_round"]) == 4 * (2 * 12 + 2 * 42)
  # The FedAvg family logs the same accounting: a dense update per client.
  config = base_config()
  config.client.num_steps = 2
  ds = dataclasses.replace(tiny_data(), public=None)
  model = simulation.build_model(config, ds)
  [exp] = simulation.ALGORITHMS["fedavg"](config, ds, model)
  _, m = run(exp, 1)
  assert float(m["bytes_up_per_client"]) == 4 * (5 * 1 + 1)
  assert exp.evaluate(exp.init_state)["bytes_down_per_round"] == 4 * 6 * n


def test_group_assignment_rules():
  names = ["a", "b"]
  np.testing.assert_array_equal(groups_lib.assign_groups(SIZES, names, "round_robin"), [0, 1, 0, 1])
  np.testing.assert_array_equal(groups_lib.assign_groups(SIZES, names, "by_size"), [1, 0, 1, 0])
  np.testing.assert_array_equal(groups_lib.assign_groups(SIZES, names, "explicit", (1, 1, 0, 1)), [1, 1, 0, 1])
  with pytest.raises(ValueError, match="explicit_groups"):
    groups_lib.assign_groups(SIZES, names, "explicit", (0, 1))


def _check(config, data=None):
  config_validation.validate_config(config)
  if data is not None:
    config_validation.validate_config(config, data)


def test_bad_inputs_fail_before_compiling_naming_the_field():
  data = tiny_data()
  config = tiny_config("fd", ({"name": "logreg"}, {"name": "resnet"}))
  with pytest.raises(ValueError, match=r"hetero\.model_groups\[1\]\.name"):
    _check(config)  # before any data is loaded
  config = tiny_config("fd")
  config.hetero.assignment = "explicit"
  config.hetero.explicit_groups = (0, 0, 0, 0)
  with pytest.raises(ValueError, match=r"leaves config\.hetero\.model_groups\[1\]"):
    _check(config, data)
  config = tiny_config("fedproto", ({"name": "logreg"}, {"name": "mlp", "hidden": (7,)}))
  with pytest.raises(ValueError, match=r"config\.hetero\.model_groups.*embedding"):
    _check(config, data)
  leaky = dataclasses.replace(data, public={"x": np.concatenate([data.public["x"], data.train.x[:1]]),
                                            "y": np.concatenate([data.public["y"], data.train.y[:1]])})
  with pytest.raises(ValueError, match="overlaps the clients' private data"):
    _check(tiny_config("feddf"), leaky)
  unlabelled = dataclasses.replace(data, public={"x": data.public["x"], "y": -np.ones(24, np.int32)})
  with pytest.raises(ValueError, match=r"config\.dataset\.public_source"):
    _check(tiny_config("fedmd"), unlabelled)
  config = tiny_config("fedmd")
  config.dataset.name = "heart_disease"
  with pytest.raises(ValueError, match=r"config\.dataset\.name"):
    _check(config)
  config = tiny_config("fd")
  config.cohort_size = 2
  with pytest.raises(ValueError, match=r"config\.cohort_size"):
    _check(config, data)
  config = tiny_config("feddf")
  config.hetero.feddf_temperature = 0.0
  with pytest.raises(ValueError, match=r"config\.hetero\.feddf_temperature"):
    _check(config)


def test_public_hospital_is_held_out_and_may_not_be_a_client():
  data = public_data.heart_disease_with_public("cleveland")
  assert data.train.client_ids == ("hungarian", "switzerland", "va")
  assert len(data.public["y"]) == 303  # Cleveland's train and test rows
  with pytest.raises(ValueError, match="dataset.private_sites includes the public site"):
    public_data.heart_disease_with_public("cleveland", ("hungarian", "cleveland"))
  with pytest.raises(ValueError, match="dataset.public_site must be one of"):
    public_data.heart_disease_with_public("mayo")


def test_out_of_domain_public_images_are_converted_and_unlabelled():
  pub = public_data.medmnist_public("breastmnist", "other")
  assert pub["x"].shape[1:] == (28, 28, 1) and np.all(pub["y"] == public_data.UNLABELLED)
  with pytest.raises(ValueError, match="dataset.public_source"):
    public_data.medmnist_public("breastmnist", "imagenet")
