import numpy as np
import pytest

from fedjax_health import config_validation
from fedjax_health.config_base import base_config
from fedjax_health.data import registry, shifts, shifts_registry


def _images(n=5, seed=0):
  rng = np.random.default_rng(seed)
  return (0.3 + 0.4 * rng.random((n, 8, 9, 2))).astype(np.float32)  # away from 0 and 1: no clipping


def test_identity_and_contrast_and_brightness():
  x = _images()
  rng = np.random.default_rng(0)
  np.testing.assert_allclose(shifts.apply_shift(x, shifts.ShiftSpec(), rng), x, atol=1e-6)
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(shifts.apply_shift(x, shifts.ShiftSpec(contrast=-1.0), rng), 2 * mean - x, atol=1e-6)
  np.testing.assert_allclose(shifts.apply_shift(x, shifts.ShiftSpec(contrast=0.5), rng), mean + 0.5 * (x - mean),
                             atol=1e-6)
  np.testing.assert_allclose(shifts.apply_shift(x, shifts.ShiftSpec(brightness=0.1), rng), x + 0.1, atol=1e-6)
  out = shifts.apply_shift(x, shifts.ShiftSpec(brightness=0.9), rng)
  assert out.max() <= 1.0 and out.dtype == np.float32


@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.0, 1.7])
def test_blur_matches_scipy_gaussian_filter(sigma):
  ndimage = pytest.importorskip("scipy.ndimage")
  x = _images(seed=1)
  ref = ndimage.gaussian_filter(x.astype(np.float64), sigma=(0, sigma, sigma, 0), mode="reflect", truncate=3.0)
  np.testing.assert_allclose(shifts.gaussian_blur(x, sigma), ref, atol=1e-5)


def test_noise_has_the_requested_std_and_is_seeded():
  x = np.full((20, 16, 16, 1), 0.5, np.float32)
  a = shifts.apply_shift(x, shifts.ShiftSpec(noise=0.05), np.random.default_rng(3))
  b = shifts.apply_shift(x, shifts.ShiftSpec(noise=0.05), np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)
  assert np.std(a - x) == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize("kw, msg", [(dict(contrast=5.0), "contrast"), (dict(brightness=-2.0), "brightness"),
                                     (dict(blur=-1.0), "blur"), (dict(noise=-0.1), "noise")])
def test_shift_spec_validates(kw, msg):
  with pytest.raises(ValueError, match=msg):
    shifts.ShiftSpec(**kw)


def test_cluster_hook_applies_the_cluster_shift_with_fresh_noise_per_split():
  specs = (shifts.ShiftSpec(), shifts.ShiftSpec(contrast=-1.0), shifts.ShiftSpec(noise=0.1))
  hook = shifts.cluster_feature_shift(shifts.planted_clusters(6, 3), specs, seed=0)
  x = _images()
  np.testing.assert_allclose(hook(x, 3), x, atol=1e-6)  # client 3 is in cluster 0
  np.testing.assert_allclose(hook(x, 4), shifts.apply_shift(x, specs[1], None), atol=1e-6)
  first, second = hook(x, 5), hook(x, 5)  # train then test split of client 5: independent noise
  assert not np.allclose(first, second)
  with pytest.raises(ValueError, match="cluster ids"):
    shifts.cluster_feature_shift([0, 3], specs)


def test_clustered_label_skew_shares_label_mix_within_clusters():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 4000)
  clusters = shifts.planted_clusters(8, 2)
  order, offsets = shifts.clustered_label_skew(labels, clusters, 0.3, np.random.default_rng(1))
  assert sorted(order.tolist()) == list(range(4000)) and offsets[-1] == 4000
  mixes = [np.bincount(labels[order[offsets[c]:offsets[c + 1]]], minlength=4) for c in range(8)]
  mixes = [m / m.sum() for m in mixes]
  within = np.mean([np.abs(mixes[a] - mixes[b]).sum() for a in range(8) for b in range(8)
                    if a < b and clusters[a] == clusters[b]])
  across = np.mean([np.abs(mixes[a] - mixes[b]).sum() for a in range(8) for b in range(8)
                    if clusters[a] != clusters[b]])
  assert within < 0.2 < across
  with pytest.raises(ValueError, match="alpha"):
    shifts.clustered_label_skew(labels, clusters, 0.0, rng)


def test_load_clustered_medmnist_plants_clusters_in_both_splits():
  data = shifts.load_clustered_medmnist("breastmnist", num_clients=8, num_clusters=4, seed=0)
  np.testing.assert_array_equal(data.client_meta["cluster"], np.arange(8) % 4)
  assert data.train.num_clients == data.test.num_clients == 8 and data.num_classes == 2
  assert data.train.num_examples == 546 and data.test.num_examples == 156
  # Cluster 1 is low-contrast: its images vary less than the reference cluster's, in both splits.
  for split in (data.train, data.test):
    sd = [split.client(c)["x"].std(axis=(1, 2, 3)).mean() for c in range(8)]
    assert sd[1] < 0.7 * sd[0] and sd[5] < 0.7 * sd[4]
  with pytest.raises(ValueError, match="num_clusters"):
    shifts.load_clustered_medmnist("breastmnist", num_clients=3, num_clusters=4)
  with pytest.raises(ValueError, match="num_clusters"):
    shifts.default_cluster_shifts(7)


def test_registry_and_config_check():
  assert {"breastmnist_clustered", "retinamnist_clustered"} <= set(registry.DATASETS)
  config = base_config()
  config.dataset.name = "retinamnist_clustered"
  config.dataset.num_clients = 4
  config.dataset.num_clusters = 5
  with pytest.raises(ValueError, match="config.dataset.num_clusters must be in"):
    shifts_registry.check_clustered_dataset(config)
  config.dataset.num_clusters = 2
  config_validation.validate_config(config)
  data = registry.load_data(config.dataset, seed=0)
  assert data.name == "retinamnist_clustered" and data.num_clients == 4
