import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_health import models
from fedjax_health.aggregators import base as agg_base
from fedjax_health.aggregators import detection as det


def _ctx(malicious=None, params=None, cohort=None):
  n = len(malicious) if malicious is not None else 0
  return {"client_ctx": {"malicious": jnp.asarray(malicious, bool)} if malicious is not None else {},
          "params": params, "round": 0, "cohort": jnp.arange(n) if cohort is None else jnp.asarray(cohort)}


def _np_two_means(v):
  """Brute force over every 2-partition by a threshold between sorted values."""
  s = np.sort(v)
  best = None
  for t in range(1, len(s)):
    sse = ((s[:t] - s[:t].mean()) ** 2).sum() + ((s[t:] - s[t:].mean()) ** 2).sum()
    if best is None or sse < best[0] - 1e-12:
      best = (sse, t, s[t:].mean() - s[:t].mean())
  return best


@pytest.mark.parametrize("seed", range(4))
def test_two_means_1d_is_the_exact_optimum(seed):
  rng = np.random.default_rng(seed)
  v = np.concatenate([rng.normal(size=5), rng.normal(size=3) + 3]).astype(np.float64)
  valid = np.ones(8, bool)
  valid[seed] = False
  in_low, gap, within = det.two_means_1d(jnp.asarray(v, jnp.float32), jnp.asarray(valid))
  sse, t, ref_gap = _np_two_means(v[valid])
  assert int(np.sum(in_low)) == t
  np.testing.assert_allclose(float(gap), ref_gap, rtol=1e-4)
  np.testing.assert_allclose(float(within), np.sqrt(sse / valid.sum()), rtol=1e-3)
  thr = np.sort(v[valid])[t - 1]
  np.testing.assert_array_equal(np.asarray(in_low), valid & (v <= thr))
  # Brute force over *all* 2-partitions (not just thresholds) gives the same optimum.
  vv = v[valid]
  best = min(((vv[list(a)] - vv[list(a)].mean()) ** 2).sum() + ((np.delete(vv, a) - np.delete(vv, a).mean()) ** 2).sum()
             for r in range(1, len(vv)) for a in itertools.combinations(range(len(vv)), r))
  np.testing.assert_allclose(sse, best, rtol=1e-9)


def test_clustering_detection_flags_a_planted_cluster_and_spares_honest_noise():
  rng = np.random.default_rng(0)
  honest = rng.normal(size=(10, 200)).astype(np.float32)
  bad = honest[:2] * 0.1 + 4.0  # two colluding attackers pushing the same direction
  flat = np.concatenate([honest, bad])
  t = det.clustering_detection(num_features=64)
  _, w, _, info = t.apply({"u": jnp.asarray(flat)}, jnp.ones(12), t.init(None), jax.random.key(0), _ctx())
  np.testing.assert_array_equal(np.asarray(info["rejected"]), np.arange(12) >= 10)
  np.testing.assert_array_equal(np.asarray(w), (np.arange(12) < 10).astype(np.float32))
  for seed in range(3):  # pure noise: nothing indicative, nobody rejected
    noise = np.random.default_rng(seed + 10).normal(size=(12, 200)).astype(np.float32)
    _, _, _, info = t.apply({"u": jnp.asarray(noise)}, jnp.ones(12), t.init(None), jax.random.key(0), _ctx())
    assert not np.any(np.asarray(info["rejected"]))


def test_autoencoder_errors_equal_numpy_forward():
  p = det._ae_init(jax.random.key(0), 6, 3)
  z = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  h = np.tanh(z @ np.asarray(p["enc"]["w"]) + np.asarray(p["enc"]["b"]))
  rec = h @ np.asarray(p["dec"]["w"]) + np.asarray(p["dec"]["b"])
  np.testing.assert_allclose(det.autoencoder_errors(p, jnp.asarray(z)), ((rec - z) ** 2).mean(1), rtol=1e-5)


def test_autoencoder_detection_learns_benign_structure_then_flags_off_manifold_updates():
  rng = np.random.default_rng(1)
  basis = rng.normal(size=(2, 40)).astype(np.float32)

  def benign(n):
    return (rng.normal(size=(n, 2)) @ basis + 0.05 * rng.normal(size=(n, 40))).astype(np.float32)

  t = det.autoencoder_detection(dim=64, hidden=4, learning_rate=0.02, steps_per_round=50, warmup_rounds=4)
  state = t.init({"u": jnp.zeros(40)})
  apply = jax.jit(t.apply)
  for r in range(4):  # warm-up: trains, rejects nobody
    _, _, state, info = apply({"u": jnp.asarray(benign(12))}, jnp.ones(12), state, jax.random.key(r), _ctx())
    assert not np.any(np.asarray(info["rejected"]))
  x = benign(12)
  off = rng.normal(size=(2, 40)).astype(np.float32)
  x[[3, 8]] = off / np.linalg.norm(off, axis=1, keepdims=True) * np.median(np.linalg.norm(x, axis=1))
  _, w, state, info = apply({"u": jnp.asarray(x)}, jnp.ones(12), state, jax.random.key(9), _ctx())
  rej = np.asarray(info["rejected"])
  assert rej[3] and rej[8]
  assert rej.sum() <= 5  # the mean threshold also flags some honest clients (Li et al.'s design)
  assert int(state.rounds) == 5


def _np_log_loss(params, x, y):
  z = x @ np.asarray(params["head"]["kernel"])[:, 0] + float(params["head"]["bias"][0])
  return np.mean(np.logaddexp(0, z) - y * z)


@pytest.mark.parametrize("metric", ["loss", "error"])
def test_loss_rejection_equals_leave_one_out_reference(metric):
  rng = np.random.default_rng(2)
  model = models.get_model("logreg", 2, (3,))
  params = {"head": {"kernel": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32), "bias": jnp.zeros(1)}}
  vx = rng.normal(size=(40, 3)).astype(np.float32)
  vy = (vx @ np.array([1.0, -1.0, 0.5]) > 0).astype(np.int32)
  ups = rng.normal(size=(6, 4)).astype(np.float32) * 0.5
  ups[4] = -5.0 * np.concatenate([[1.0, -1.0, 0.5], [0.0]])  # an update that reverses the task
  w = np.array([3, 5, 2, 4, 6, 1.0])
  stack = {"head": {"bias": jnp.asarray(ups[:, 3:]), "kernel": jnp.asarray(ups[:, :3, None])}}
  t = det.loss_rejection(model.apply, vx, vy, num_reject=2, metric=metric)
  _, new_w, _, info = jax.jit(t.apply)(stack, jnp.asarray(w), t.init(None), jax.random.key(0), _ctx(params=params))

  def metric_of(delta):
    p = {"head": {"bias": params["head"]["bias"] + delta[3:], "kernel": params["head"]["kernel"] + delta[:3, None]}}
    if metric == "loss":
      return _np_log_loss(p, vx, vy)
    z = vx @ np.asarray(p["head"]["kernel"])[:, 0] + float(p["head"]["bias"][0])
    return np.mean((z > 0).astype(int) != vy)

  full = metric_of((w[:, None] * ups).sum(0) / w.sum())
  impact = []
  for i in range(6):
    keep = np.arange(6) != i
    impact.append(full - metric_of((w[keep, None] * ups[keep]).sum(0) / w[keep].sum()))
  rej = np.asarray(info["rejected"])
  assert rej.sum() == 2 and rej[4]
  if metric == "loss":  # the error rate has ties; the loss ranks strictly
    np.testing.assert_array_equal(np.flatnonzero(rej), np.sort(np.argsort(impact)[::-1][:2]))
  np.testing.assert_allclose(float(info[f"val_{metric}"]), full, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(new_w), np.where(rej, 0.0, w))


def test_track_rejections_counts_per_client_and_per_role():
  rejected_rounds = [np.array([1, 0, 0, 1], bool), np.array([0, 1, 0, 0], bool)]

  def fake_apply(updates, weights, state, rng, ctx):
    return updates, weights, state, {"rejected": jnp.asarray(rejected_rounds[ctx["round"]])}

  agg = det.track_rejections(agg_base.chain(agg_base.UpdateTransform(lambda p: (), fake_apply),
                                            agg_base.weighted_mean()), num_clients=6)
  state = agg.init(None)
  cohorts = [np.array([0, 2, 3, 5]), np.array([5, 0, 1, 4])]
  malicious = [np.array([1, 0, 1, 0], bool), np.array([1, 1, 0, 0], bool)]
  weights = [np.array([1, 1, 1, 1.0]), np.array([1, 1, 0, 1.0])]  # client 1 sends nothing in round 1
  for r in range(2):
    ctx = {"client_ctx": {"malicious": jnp.asarray(malicious[r])}, "cohort": jnp.asarray(cohorts[r]), "round": r}
    _, state, info = agg.apply({"u": jnp.ones((4, 2))}, jnp.asarray(weights[r]), state, jax.random.key(r), ctx)
  st = state[1]
  np.testing.assert_array_equal(st.sampled, [2, 0, 1, 1, 1, 2])
  np.testing.assert_array_equal(st.rejected, [2, 0, 0, 0, 0, 1])  # client 0 twice, client 5 once
  assert int(st.malicious_sent) == 4 and int(st.malicious_rejected) == 2
  assert int(st.honest_sent) == 3 and int(st.honest_rejected) == 1  # client 5 (honest) in round 0
  rates = det.detection_rates(st)
  assert rates["tpr"] == 0.5 and rates["fpr"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("factory", [lambda: det.clustering_detection(num_features=0),
                                     lambda: det.clustering_detection(vote_threshold=1.0),
                                     lambda: det.autoencoder_detection(dim=0),
                                     lambda: det.loss_rejection(lambda p, x: x, np.zeros((0, 2)), np.zeros(0), 1),
                                     lambda: det.loss_rejection(lambda p, x: x, np.zeros((3, 2)), np.zeros(3), 1, "auc")])
def test_bad_detector_hyperparameters_raise(factory):
  with pytest.raises(ValueError):
    factory()



def test_autoencoder_rejects_exactly_errors_above_factor_times_the_mean():
  # Li et al.'s dynamic threshold: reject when the reconstruction error exceeds factor x the
  # round's mean error over valid clients (after the warm-up), on median-norm-scaled surrogates.
  # The factors are put 1% on either side of one client's error ratio, so any other threshold
  # (a different multiple, the median instead of the mean, >= for >) changes the answer.
  rng = np.random.default_rng(0)
  flat = rng.normal(size=(12, 40)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(12, 1)).astype(np.float32)
  weights = np.ones(12, np.float32)
  weights[5] = 0.0
  valid = weights > 0
  probe = det.autoencoder_detection(dim=16, hidden=3, warmup_rounds=0, seed=1)
  state = probe.init({"u": jnp.zeros(40)})
  z = flat[:, np.asarray(state.coords)]
  z = z / np.median(np.linalg.norm(z, axis=1)[valid])
  err = np.asarray(det.autoencoder_errors(state.params, jnp.asarray(z)), np.float64)
  ratio = err / err[valid].mean()
  j = int(np.argsort(np.where(valid, ratio, -1))[-3])  # the third largest ratio: >= 2 above it
  for factor, j_rejected in ((0.99 * ratio[j], True), (1.01 * ratio[j], False)):
    t = det.autoencoder_detection(dim=16, hidden=3, warmup_rounds=0, factor=float(factor), seed=1)
    _, w2, _, info = t.apply({"u": jnp.asarray(flat)}, jnp.asarray(weights), t.init({"u": jnp.zeros(40)}),
                             jax.random.key(0), {})
    expected = valid & (ratio > factor)
    assert bool(expected[j]) == j_rejected
    np.testing.assert_array_equal(np.asarray(info["rejected"]), expected)
    np.testing.assert_array_equal(np.asarray(w2), np.where(expected, 0.0, weights))
