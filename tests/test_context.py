"""The context convention: one set of keys, errors that name the missing key, chain without key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_health import context
from fedjax_health.aggregators import base, detection, robust
from fedjax_health.aggregators import clustered as agg_clustered
from fedjax_health.attacks import model_poisoning as mp


def _stack(c=4, d=3, seed=0):
  return {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(c, d)), jnp.float32)}


@pytest.mark.parametrize("transform, ctx, message", [
    (mp.sign_flip(), {}, r"sign_flip needs ctx\['client_ctx'\]\['malicious'\]"),
    (mp.alie(), {"malicious": jnp.zeros(4, bool)}, r"alie needs ctx\['client_ctx'\]\['malicious'\].*top level"),
    (detection.loss_rejection(lambda p, x: x @ p["w"], np.ones((2, 3)), np.zeros(2, int), 1), {},
     r"loss_rejection \(loss\) needs ctx\['params'\]"),
    (agg_clustered.per_cluster_mean(2), context.server_ctx(), r"per_cluster_mean needs ctx\['client_ctx'\]\['cluster'\]"),
    (detection.track_rejections(base.weighted_mean(), 8), {}, r"track_rejections needs ctx\['cohort'\]"),
])
def test_missing_context_keys_are_named(transform, ctx, message):
  with pytest.raises(context.MissingContextKey, match=message):
    transform.apply(_stack(), jnp.ones(4), transform.init(None), jax.random.key(0), ctx)


def test_client_level_hooks_name_their_key_and_the_level():
  proj = mp.pgd_projection(1.0)
  p = {"w": jnp.ones(3)}
  with pytest.raises(context.MissingContextKey, match=r"pgd_projection needs ctx\['malicious'\].*server-level form"):
    proj(p, p, context.server_ctx(malicious=[True]))
  np.testing.assert_allclose(proj({"w": jnp.full(3, 5.0)}, p, {"malicious": True})["w"], 1 + 1 / np.sqrt(3), rtol=1e-6)


def test_server_ctx_drives_attacks_and_detectors():
  ctx = context.server_ctx(params={"w": jnp.zeros(3)}, cohort=[4, 5, 6, 7], malicious=[False, True, False, False])
  out, _, _, _ = mp.sign_flip().apply(_stack(), jnp.ones(4), None, None, ctx)
  np.testing.assert_allclose(out["w"][1], -_stack()["w"][1])
  agg = detection.track_rejections(base.weighted_mean(), 8)
  _, (_, stats), _ = agg.apply(_stack(), jnp.ones(4), agg.init(None), None, ctx)
  np.testing.assert_array_equal(stats.sampled, [0, 0, 0, 0, 1, 1, 1, 1])


def test_chain_of_deterministic_rules_needs_no_key_and_may_end_without_aggregator():
  stack, w = _stack(7, 3), jnp.ones(7)
  transforms = base.chain(base.reject_nonfinite(), robust.norm_bound(0.5))
  assert isinstance(transforms, base.UpdateTransform)
  clipped, w2, _, info = transforms.apply(stack, w, transforms.init(None))
  assert float(jnp.max(jnp.linalg.norm(clipped["w"], axis=1))) <= 0.5 + 1e-6
  assert "rejected" in info and "fraction_clipped" in info
  full = base.chain(transforms, robust.krum(1, 7))
  agg, _, _ = full.apply(stack, w, full.init(None))
  ref, _, _ = robust.krum(1, 7).apply(clipped, w2, None, None, None)
  np.testing.assert_allclose(agg["w"], ref["w"])
  noisy = base.chain(robust.weak_dp(1.0, 0.1))
  with pytest.raises(ValueError, match="weak_dp .* needs a PRNG key"):
    noisy.apply(stack, w, noisy.init(None))
  with pytest.raises(TypeError, match="part 0 is a Aggregator"):
    base.chain(base.weighted_mean(), base.weighted_mean())
