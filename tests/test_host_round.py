"""fedavg(host_threads=n): the round's client map split into n parts run from n host threads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_health import client as client_lib
from fedjax_health import models
from fedjax_health import step_buckets as sb
from fedjax_health.aggregators import robust
from fedjax_health.algorithms import fedavg as fa
from fedjax_health.data.federated import BatchPlanSpec
from tests.test_lowrank import _mixed_data
from tests.test_step_buckets import _assert_same

SIZES = (1, 2, 3, 4, 6, 8, 13, 0, 30, 2, 40, 5, 7, 1, 3, 9, 2)


def _data(poison=None):
  return _mixed_data(SIZES, dim=32, poison=poison)


def _alg(ds, host_threads=1, momentum=0.0, fast_path="auto", epochs=1, **kw):
  model = models.get_model("mlp", 3, (ds.x.shape[1],), hidden=(8,))
  plan = BatchPlanSpec.create(ds.client_sizes, 4, num_epochs=epochs)
  alg = fa.fedavg(model, num_clients=ds.num_clients, cohort_size=kw.pop("cohort", ds.num_clients), plan=plan,
                  client_opt=client_lib.sgd(0.1, momentum), fast_path=fast_path, lowrank_width=3,
                  host_threads=host_threads, **kw)
  return alg, alg.init(model.init(jax.random.key(0))), fa.device_train_data(ds, alg.gram_rows)


def _run(ds, host_threads, rounds=2, **kw):
  alg, state, train = _alg(ds, host_threads, **kw)
  round_fn = alg.host_round_fn if host_threads > 1 else jax.jit(alg.round_fn)
  history = []
  for r in range(rounds):
    state, metrics = round_fn(state, train, jax.random.key(r))
    history.append(metrics)
  return alg, state, history


@pytest.mark.parametrize("n", [2, 3])
def test_host_round_equals_the_round(n, monkeypatch):
  """Low-rank short clients (narrow and full buckets, the round's first-layer products), long plain-SGD
  clients in densified blocks: every client runs in exactly one part, and the sums add up."""
  ds = _data()
  parts = []
  split = sb.split_parts
  monkeypatch.setattr(sb, "split_parts", lambda *a: parts.append(a[-1]) or split(*a))
  threaded = _run(ds, n)
  assert threaded[0].path == "plain+lowrank" and threaded[0].gram_rows > 0
  assert sorted(set(parts)) == [(i, n) for i in range(n)]  # traced once per part
  _assert_same(threaded, _run(ds, 1))


def test_host_round_equals_the_round_on_the_dense_path_with_momentum_and_a_partial_cohort():
  ds = _data()
  kw = dict(fast_path="off", momentum=0.5, prox_mu=0.2, cohort=11, epochs=2)
  _assert_same(_run(ds, 2, **kw), _run(ds, 1, **kw))


def test_host_round_rejects_a_non_finite_client_like_the_round():
  ds = _data(poison=3)
  threaded, single = _run(ds, 2), _run(ds, 1)
  _assert_same(threaded, single)
  assert int(threaded[2][0]["num_nonfinite"]) == 1


def test_split_parts_deals_each_buckets_clients_in_turn():
  bidx = jnp.asarray([0, 1, 0, 0, 2, 1, 0, 3, 1, 0], jnp.int32)  # 3: longer than every bucket
  order, starts, _ = sb.assign_index(bidx, 3)
  owners = [np.asarray(sb.split_parts(bidx, order, starts, 3, (i, 3))) for i in range(3)]
  for b in range(3):
    members = np.flatnonzero(np.asarray(bidx) == b)
    counts = [int(np.sum(o[members] == b)) for o in owners]
    assert sum(counts) == len(members) and max(counts) - min(counts) <= 1, (b, counts)
  ran = np.stack([o < 3 for o in owners])
  np.testing.assert_array_equal(ran.sum(0), np.asarray(bidx) < 3)  # each client once; bucket 3 nowhere
  # Dealt back and forth: bucket 0's clients 0, 2, 3, 6, 9 go to parts 0, 1, 2, 2, 1.
  np.testing.assert_array_equal([int(np.flatnonzero(ran[:, c])[0]) for c in (0, 2, 3, 6, 9)], [0, 1, 2, 2, 1])
  with pytest.raises(ValueError, match="part must be"):
    sb.split_parts(bidx, order, starts, 3, (3, 3))


def test_combine_parts_adds_numbers_and_ors_booleans():
  a = {"x": jnp.asarray([1.0, 0.0]), "ok": jnp.asarray([True, False])}
  b = {"x": jnp.asarray([0.0, 2.5]), "ok": jnp.asarray([False, True])}
  out = sb.combine_parts([a, b])
  np.testing.assert_array_equal(out["x"], [1.0, 2.5])
  np.testing.assert_array_equal(out["ok"], [True, True])


def test_host_threads_misuse_is_refused():
  ds = _data()
  for bad in (0, True, 1.5):
    with pytest.raises(ValueError, match="host_threads must be an int >= 1"):
      _alg(ds, bad)
  with pytest.raises(ValueError, match="host_threads=2 cannot be used: the aggregator is not streaming"):
    _alg(ds, 2, aggregator=robust.coordinate_median())
  alg, state, train = _alg(ds, 2)
  assert _alg(ds, 1)[0].host_round_fn is None
  with pytest.raises(ValueError, match="call it outside jit"):
    jax.jit(alg.host_round_fn)(state, train, jax.random.key(0))


def _skewed_smoke(**overrides):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic_skewed_1000.py")
  spec = importlib.util.spec_from_file_location("synthetic_skewed_1000", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("smoke")
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def test_simulation_with_host_threads_equals_one_program(tmp_path, monkeypatch):
  from fedjax_health import simulation
  parts = []
  split = sb.split_parts
  monkeypatch.setattr(sb, "split_parts", lambda *a: parts.append(a[-1]) or split(*a))
  rows = {}
  for n in (1, 2):
    summary = simulation.run(_skewed_smoke(host_threads=n), str(tmp_path / str(n)), log=lambda s: None)
    rows[n] = summary["experiments"]["fedavg"]
    assert sorted(set(parts)) == ([] if n == 1 else [(0, 2), (1, 2)])  # the host round ran
  assert set(rows[1]) == set(rows[2])
  for key, value in rows[1].items():
    if isinstance(value, float):
      np.testing.assert_allclose(rows[2][key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_host_threads_config_is_checked():
  from fedjax_health import config_validation
  with pytest.raises(ValueError, match="host_threads must be an int >= 1"):
    config_validation.validate_config(_skewed_smoke(host_threads=0))
  config = _skewed_smoke(host_threads=2)
  config.algorithm = "ifca"
  with pytest.raises(ValueError, match="host_threads must be 1 for algorithm 'ifca'"):
    config_validation.validate_config(config)
  config = _skewed_smoke(host_threads=2, num_seeds=3)
  with pytest.raises(ValueError, match="host_threads must be 1 with config.num_seeds > 1"):
    config_validation.validate_config(config)
  config_validation.validate_config(_skewed_smoke(host_threads=2))
