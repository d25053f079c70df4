import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from fedjax_health import client as client_lib
from fedjax_health import models
from fedjax_health.aggregators import base as agg_base
from fedjax_health.aggregators import robust
from fedjax_health.attacks import model_poisoning as mp


def _ctx(malicious):
  return {"client_ctx": {"malicious": jnp.asarray(malicious, bool)}, "params": None, "round": 0}


def _stack(flat):
  flat = jnp.asarray(flat, jnp.float32)
  return {"a": flat[:, :3], "b": flat[:, 3:].reshape(flat.shape[0], -1, 1)}  # flattens back in order


def _flat(tree):
  return np.asarray(agg_base.flatten_updates(tree))


def _flat1(tree):
  """One (unstacked) aggregate as a vector."""
  return np.concatenate([np.asarray(l).ravel() for l in jax.tree.leaves(tree)])


def _run(t, flat, malicious, weights=None, seed=0):
  w = jnp.ones(len(malicious)) if weights is None else jnp.asarray(weights, jnp.float32)
  out, w2, _, info = t.apply(_stack(flat), w, t.init(None), jax.random.key(seed), _ctx(malicious))
  return _flat(out), info


def test_pgd_projection_keeps_malicious_clients_inside_the_ball():
  rng = np.random.default_rng(0)
  anchor = {"a": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=4))}
  far = jax.tree.map(lambda x: x + 5.0, anchor)
  near = jax.tree.map(lambda x: x + 0.01, anchor)
  proj = mp.pgd_projection(0.5)
  dist = lambda p: float(jnp.sqrt(client_lib.tree_sq_norm(client_lib.tree_sub(p, anchor))))
  assert abs(dist(proj(far, anchor, {"malicious": True})) - 0.5) < 1e-5
  delta_dir = client_lib.tree_sub(proj(far, anchor, {"malicious": True}), anchor)  # direction kept
  np.testing.assert_allclose(delta_dir["a"] / delta_dir["a"][0, 0], np.ones((3, 2)), rtol=1e-5)
  jax.tree.map(np.testing.assert_allclose, proj(near, anchor, {"malicious": True}), near)
  jax.tree.map(np.testing.assert_allclose, proj(far, anchor, {"malicious": False}), far)


def test_pgd_local_training_stays_inside_the_ball_after_every_step():
  model = models.get_model("mlp", 3, (4,), hidden=(5,))
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.normal(size=(6, 8, 4)) * 10, jnp.float32)
  ys = jnp.asarray(rng.integers(0, 3, (6, 8)))
  mask = jnp.ones((6, 8), bool)
  radius = 0.05
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(1.0),
                                     projection=mp.pgd_projection(radius))
  norm = lambda d: float(jnp.sqrt(client_lib.tree_sq_norm(d)))
  honest, _ = client_lib.local_train(trainer, params, xs, ys, mask, jax.random.key(2), {"malicious": False})
  assert norm(honest) > 10 * radius  # honest clients are not projected
  # The state after step s of the scan is the result of the first s steps (grad_fn ignores keys).
  for s in range(1, 7):
    d, _ = client_lib.local_train(trainer, params, xs[:s], ys[:s], mask[:s], jax.random.key(2), {"malicious": True})
    assert norm(d) <= radius * (1 + 1e-5)


@pytest.mark.parametrize("attackers, eta", [([2], 1.0), ([0, 3], 1.0), ([2], 0.25)])
def test_model_replacement_makes_fedavg_return_the_attackers_model_exactly(attackers, eta):
  """Others send zero updates: the weighted mean after boosting is exactly X - G, so server SGD
  with lr 1 lands on the attacker's model X."""
  rng = np.random.default_rng(0)
  global_model = rng.normal(size=7).astype(np.float32)
  target = rng.normal(size=7).astype(np.float32)
  weights = np.array([3.0, 7.0, 2.0, 11.0, 5.0])
  flat = np.zeros((5, 7), np.float32)
  flat[attackers] = target - global_model
  mal = np.isin(np.arange(5), attackers)
  agg_fn = agg_base.chain(mp.model_replacement(server_learning_rate=eta), agg_base.weighted_mean())
  agg, _, info = agg_fn.apply(_stack(flat), jnp.asarray(weights), agg_fn.init(None), jax.random.key(0), _ctx(mal))
  params = {"a": jnp.asarray(global_model[:3]), "b": jnp.asarray(global_model[3:]).reshape(-1, 1)}
  sgd = optax.sgd(eta)
  upd, _ = sgd.update(jax.tree.map(jnp.negative, agg), sgd.init(params), params)
  new = optax.apply_updates(params, upd)
  np.testing.assert_allclose(np.concatenate([new["a"], new["b"].ravel()]), target, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(info["replacement_scale"]),
                             weights.sum() / (len(attackers) * weights[attackers].min() * eta), rtol=1e-6)


def test_model_replacement_with_fixed_scale_only_scales_attackers():
  flat = np.arange(10, dtype=np.float32).reshape(2, 5)
  out, _ = _run(mp.model_replacement(scale=4.0), flat, [False, True])
  np.testing.assert_allclose(out.reshape(2, 5), [flat[0], 4 * flat[1]])


def test_sign_flip_gaussian_ipm_replace_only_malicious_rows():
  rng = np.random.default_rng(0)
  flat = rng.normal(size=(4, 6)).astype(np.float32)
  mal = [False, True, False, True]
  out, _ = _run(mp.sign_flip(2.0), flat, mal)
  np.testing.assert_allclose(out.reshape(4, 6), np.where(np.array(mal)[:, None], -2 * flat, flat), rtol=1e-6)
  out, _ = _run(mp.ipm(0.3), flat, mal)  # Xie et al.: the mean of the honest clients' updates
  np.testing.assert_allclose(out.reshape(4, 6)[1], -0.3 * flat[[0, 2]].mean(0), rtol=1e-5)
  out, _ = _run(mp.ipm(0.3, include_attackers=True), flat, mal)
  np.testing.assert_allclose(out.reshape(4, 6)[1], -0.3 * flat.mean(0), rtol=1e-5)
  out, _ = _run(mp.ipm(0.3, knowledge="partial"), flat, mal)
  np.testing.assert_allclose(out.reshape(4, 6)[3], -0.3 * flat[[1, 3]].mean(0), rtol=1e-5)
  big = np.zeros((3, 30000), np.float32)
  t = mp.gaussian(0.7)
  g, _, _, _ = t.apply({"u": jnp.asarray(big)}, jnp.ones(3), t.init(None), jax.random.key(0), _ctx([0, 1, 0]))
  assert abs(float(jnp.std(g["u"][1])) - 0.7) < 0.02
  assert float(jnp.abs(g["u"][0]).max()) == 0.0 and float(jnp.abs(g["u"][2]).max()) == 0.0


def test_alie_z_matches_baruch_et_al():
  # Baruch et al. 2019: n=50 workers, m=12 corrupted -> s = 26 - 12 = 14, z = Phi^-1(36/50).
  np.testing.assert_allclose(float(mp.alie_z(50, 12)), scipy.stats.norm.ppf(36 / 50), rtol=1e-5)
  assert float(mp.alie_z(10, 1)) == pytest.approx(0.0, abs=1e-6)


def test_alie_sends_mean_minus_z_std_of_the_reference_updates():
  rng = np.random.default_rng(1)
  flat = rng.normal(size=(6, 6)).astype(np.float32)
  mal = [True, False, False, True, False, False]
  out, info = _run(mp.alie(z=1.5), flat, mal)  # Baruch et al.: honest clients, sample std
  honest = flat[[1, 2, 4, 5]]
  expect = honest.mean(0) - 1.5 * honest.std(0, ddof=1)
  np.testing.assert_allclose(out.reshape(6, 6)[[0, 3]], [expect, expect], rtol=1e-5, atol=1e-6)
  out, info = _run(mp.alie(z=1.5, include_attackers=True, ddof=0), flat, mal)  # the earlier form
  expect = flat.mean(0) - 1.5 * flat.std(0)
  np.testing.assert_allclose(out.reshape(6, 6)[[0, 3]], [expect, expect], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.reshape(6, 6)[[1, 2, 4, 5]], flat[[1, 2, 4, 5]])
  out, info = _run(mp.alie(), flat, mal)
  z = scipy.stats.norm.ppf((6 - (np.floor(6 / 2 + 1) - 2)) / 6)
  np.testing.assert_allclose(float(info["alie_z"]), z, rtol=1e-5)


def test_fang_trimmed_mean_values_lie_beyond_the_benign_extremes_against_the_direction():
  rng = np.random.default_rng(2)
  flat = rng.normal(size=(8, 6)).astype(np.float32) + np.array([2, -2, 0.5, -0.5, 3, -3], np.float32)
  mal = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
  out, _ = _run(mp.fang_trimmed_mean(b=2.0), flat, mal)
  out = out.reshape(8, 6)
  mu, hi, lo = flat.mean(0), flat.max(0), flat.min(0)
  for j in range(6):
    for i in (0, 1):
      v = out[i, j]
      if mu[j] > 0:
        a, c = (lo[j] / 2, lo[j]) if lo[j] > 0 else (2 * lo[j], lo[j])
      else:
        a, c = (hi[j], 2 * hi[j]) if hi[j] > 0 else (hi[j] / 2, hi[j])
      assert min(a, c) - 1e-5 <= v <= max(a, c) + 1e-5
      assert (v <= lo[j] + 1e-6) if mu[j] > 0 else (v >= hi[j] - 1e-6)
  # The attack drags the trimmed mean against the benign direction.
  tm = robust.trimmed_mean(8, num_trim=2)
  clean, _, _ = tm.apply(_stack(flat), jnp.ones(8), tm.init(None), jax.random.key(0), {})
  bad, _, _ = tm.apply(_stack(out), jnp.ones(8), tm.init(None), jax.random.key(0), {})
  assert np.all(np.sign(mu) * (_flat1(bad) - _flat1(clean)) < 0)


def test_fang_krum_gets_an_attacker_selected_with_the_largest_lambda():
  rng = np.random.default_rng(3)
  flat = (rng.normal(size=(10, 6)) + 0.2).astype(np.float32)  # noisy updates, a weak common direction
  mal = np.zeros(10, bool)
  mal[[2, 7]] = True
  out, info = _run(mp.fang_krum(num_halvings=30), flat, mal)
  out = out.reshape(10, 6)
  lam = float(info["fang_lambda"])
  np.testing.assert_allclose(out[2], -lam * np.sign(flat.mean(0)), rtol=1e-5)
  krum = robust.krum(2, 10)
  _, _, kinfo = krum.apply(_stack(out), jnp.ones(10), krum.init(None), jax.random.key(0), {})
  assert np.flatnonzero(~np.asarray(kinfo["rejected"]))[0] in (2, 7)
  # Doubling lambda (the previous candidate of the halving search) no longer gets selected.
  out2 = out.copy()
  out2[[2, 7]] = -2 * lam * np.sign(flat.mean(0))
  _, _, kinfo2 = krum.apply(_stack(out2), jnp.ones(10), krum.init(None), jax.random.key(0), {})
  assert np.flatnonzero(~np.asarray(kinfo2["rejected"]))[0] not in (2, 7)


def test_nonfinite_updates_are_rejected_counted_and_never_averaged():
  rng = np.random.default_rng(4)
  flat = rng.normal(size=(5, 6)).astype(np.float32)
  mal = np.array([0, 1, 0, 0, 1], bool)
  for final in (agg_base.weighted_mean(), robust.coordinate_median(), robust.krum(1, 5)):
    agg_fn = agg_base.chain(mp.nonfinite(), agg_base.reject_nonfinite(), final)
    agg, _, info = agg_fn.apply(_stack(flat), jnp.ones(5), agg_fn.init(None), jax.random.key(0), _ctx(mal))
    assert np.all(np.isfinite(_flat1(agg)))
    assert int(info["num_nonfinite"]) == 2
    assert np.all(np.asarray(info["rejected"])[mal])
  mean_fn = agg_base.chain(mp.nonfinite(), agg_base.reject_nonfinite(), agg_base.weighted_mean())
  agg, _, _ = mean_fn.apply(_stack(flat), jnp.ones(5), mean_fn.init(None), jax.random.key(0), _ctx(mal))
  np.testing.assert_allclose(_flat1(agg), flat[~mal].mean(0), rtol=1e-5)


@pytest.mark.parametrize("factory", [lambda: mp.pgd_projection(0.0), lambda: mp.model_replacement(-1.0),
                                     lambda: mp.alie(knowledge="some"), lambda: mp.fang_trimmed_mean(b=1.0),
                                     lambda: mp.ipm(0.0), lambda: mp.gaussian(0.0)])
def test_bad_attack_hyperparameters_raise(factory):
  with pytest.raises(ValueError):
    factory()
