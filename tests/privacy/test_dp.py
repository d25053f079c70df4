"""Client-level DP transforms: clipping bound, noise scale, fixed denominator, adaptive clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_health.aggregators import base as agg_base
from fedjax_health.privacy import dp


def _updates(cohort=6, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(cohort, 5, 3)) * scale, jnp.float32),
          "b": jnp.asarray(rng.normal(size=(cohort, 3)) * scale, jnp.float32)}


def _np_flat(u):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(u)], axis=1)


@pytest.mark.parametrize("clip", [0.1, 1.0, 5.0, 100.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_norms_never_exceed_c_and_small_updates_are_unchanged(clip, seed):
  u = _updates(seed=seed)
  out, _, _, info = dp.clip_updates(clip).apply(u, jnp.ones(6), (), jax.random.key(0), {})
  norms_in = np.linalg.norm(_np_flat(u), axis=1)
  norms_out = np.linalg.norm(_np_flat(out), axis=1)
  assert np.all(norms_out <= clip * (1 + 1e-6))
  ref = _np_flat(u) * np.minimum(1.0, clip / norms_in)[:, None]  # the obvious formula
  np.testing.assert_allclose(_np_flat(out), ref, rtol=1e-5, atol=1e-6)
  assert float(info["clipped_fraction"]) == pytest.approx(np.mean(norms_in > clip))


def _central_setup(z=1.3, clip=0.7, cohort=5, dim=40_000, seed=3):
  rng = np.random.default_rng(seed)
  u = {"w": jnp.asarray(rng.normal(size=(cohort, dim)), jnp.float32)}
  return u, z, clip


def test_central_noise_std_matches_z_times_c_within_2_percent():
  u, z, clip = _central_setup()
  denom = 4.0
  agg, _, info = dp.central_gaussian_mean(clip, z, denom).apply(u, jnp.ones(5), (), jax.random.key(11), {})
  clipped_sum = (_np_flat(u) * np.minimum(1.0, clip / np.linalg.norm(_np_flat(u), axis=1))[:, None]).sum(0)
  noise = np.asarray(agg["w"]) * denom - clipped_sum  # what the server added to the clipped sum
  assert abs(np.std(noise) / (z * clip) - 1) < 0.02
  assert abs(np.mean(noise)) < 4 * z * clip / math.sqrt(noise.size)
  assert float(info["noise_std"]) == pytest.approx(z * clip)


def test_central_mean_uses_fixed_denominator_and_only_participants():
  u, _, clip = _central_setup(dim=10)
  part = jnp.array([True, False, True, True, False])
  weights = jnp.array([1.0, 1.0, 0.0, 5.0, 1.0])  # client 2 rejected upstream (weight 0)
  agg, _, info = dp.clipped_fixed_mean(clip, 7.0).apply(u, weights, (), jax.random.key(0),
                                                        {"client_ctx": {"participating": part}})
  flat = _np_flat(u)
  clipped = flat * np.minimum(1.0, clip / np.linalg.norm(flat, axis=1))[:, None]
  np.testing.assert_allclose(np.asarray(agg["w"]), (clipped[0] + clipped[3]) / 7.0, rtol=1e-5, atol=1e-7)
  assert int(info["num_participating"]) == 2


def test_local_and_distributed_noise_scales():
  u = {"w": jnp.zeros((8, 20_000), jnp.float32)}
  z, clip = 0.9, 2.0
  out, _, _, _ = dp.local_gaussian(clip, z).apply(u, jnp.ones(8), (), jax.random.key(1), {})
  per_client = np.std(np.asarray(out["w"]), axis=1)
  np.testing.assert_allclose(per_client, z * clip, rtol=0.03)
  out, _, _, _ = dp.distributed_gaussian(clip, z, num_shares=8).apply(u, jnp.ones(8), (), jax.random.key(2), {})
  assert abs(np.std(np.asarray(out["w"]).sum(0)) / (z * clip) - 1) < 0.02  # 8 shares sum to z C
  assert abs(np.std(np.asarray(out["w"])) / (z * clip / math.sqrt(8)) - 1) < 0.02


def test_adaptive_noise_split_costs_exactly_one_gaussian_of_z():
  z, sigma_b = 1.1, 2.5
  z_delta = dp.adaptive_update_noise_multiplier(z, sigma_b)
  assert z_delta > z
  # Count of centred bits has sensitivity 1/2: multiplier 2 sigma_b.
  pair = dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(z_delta), dp_event.GaussianDpEvent(2 * sigma_b)])
  one = dp_event.GaussianDpEvent(z)
  for delta in (1e-5, 1e-3):
    e_pair = rdp_privacy_accountant.RdpAccountant().compose(dp_event.SelfComposedDpEvent(pair, 20)).get_epsilon(delta)
    e_one = rdp_privacy_accountant.RdpAccountant().compose(dp_event.SelfComposedDpEvent(one, 20)).get_epsilon(delta)
    assert e_pair == pytest.approx(e_one, rel=1e-9)
  with pytest.raises(ValueError, match="clipped_count_stddev"):
    dp.adaptive_update_noise_multiplier(3.0, 1.0)


def test_adaptive_clip_follows_geometric_quantile_update():
  cohort = 10
  norms = np.linspace(0.5, 5.0, cohort)
  dirs = np.random.default_rng(0).normal(size=(cohort, 4))
  u = {"w": jnp.asarray(dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * norms[:, None], jnp.float32)}
  # Tiny noise so the released fraction is (almost) exact.
  agg = dp.adaptive_clip_gaussian_mean(1.0, 1e-4, float(cohort), target_quantile=0.5, learning_rate=0.2,
                                       clipped_count_stddev=1e-3)
  state = agg.init(None)
  clip = 1.0
  for r in range(30):
    _, state, info = agg.apply(u, jnp.ones(cohort), state, jax.random.key(r), {})
    frac = np.mean(norms <= clip)
    assert float(info["unclipped_fraction_estimate"]) == pytest.approx(frac, abs=1e-3)
    clip = clip * math.exp(-0.2 * (frac - 0.5))
    assert float(state.clip_norm) == pytest.approx(clip, rel=1e-3)
  assert 2.0 < float(state.clip_norm) < 3.6  # near the median norm (2.75)


def test_public_weighted_mean_ignores_data_dependent_weights():
  u = _updates(cohort=4)
  table = np.array([1.0, 2.0, 0.0, 1.0, 4.0])
  cohort = jnp.array([4, 1, 2, 0])
  agg, _, _ = dp.public_weighted_mean(table).apply(u, jnp.array([9.0, 1.0, 3.0, 2.0]), (), jax.random.key(0),
                                                   {"cohort": cohort})
  w = table[np.asarray(cohort)] / table[np.asarray(cohort)].sum()
  np.testing.assert_allclose(np.asarray(agg["b"]), np.einsum("c,cd->d", w, np.asarray(u["b"])), rtol=1e-5)


def test_composes_with_chain():
  u = _updates()
  agg = agg_base.chain(agg_base.reject_nonfinite(), dp.clip_updates(1.0), dp.central_gaussian_mean(1.0, 0.5, 6.0))
  out, state, info = jax.jit(agg.apply)(u, jnp.ones(6), agg.init(None), jax.random.key(0), {})
  assert np.all(np.isfinite(np.asarray(out["w"]))) and "clip_norm" in info and "noise_std" in info


@pytest.mark.parametrize("factory", [
    lambda: dp.clip_updates(0.0),
    lambda: dp.clip_updates(-1.0),
    lambda: dp.central_gaussian_mean(1.0, 0.0, 4.0),
    lambda: dp.central_gaussian_mean(1.0, -2.0, 4.0),
    lambda: dp.central_gaussian_mean(0.0, 1.0, 4.0),
    lambda: dp.central_gaussian_mean(1.0, 1.0, 0.0),
    lambda: dp.local_gaussian(1.0, 0.0),
    lambda: dp.distributed_gaussian(1.0, 1.0, 0),
    lambda: dp.adaptive_clip_gaussian_mean(1.0, 1.0, 10.0, target_quantile=1.5),
    lambda: dp.adaptive_clip_gaussian_mean(-1.0, 1.0, 10.0),
    lambda: dp.clip_updates(float("nan")),
])
def test_bad_hyperparameters_raise_at_construction(factory):
  with pytest.raises(ValueError):
    factory()
