"""Inversion metrics against brute force and NumPy references."""

import itertools
import os

import dm_pix
import numpy as np
import pytest

from fedjax_health.attacks import inversion_metrics as im


def test_match_order_is_the_brute_force_optimum():
  r = np.random.default_rng(0)
  orig = r.uniform(size=(3, 4, 5))
  rec = orig[:, [2, 0, 3, 1]] + 0.3 * r.normal(size=orig.shape)
  perm = im.match_order(rec, orig)
  for v in range(3):
    costs = {p: sum(np.sum((orig[v, i] - rec[v, p[i]]) ** 2) for i in range(4)) for p in itertools.permutations(range(4))}
    assert tuple(perm[v]) == min(costs, key=costs.get)
  np.testing.assert_allclose(im.reorder(rec, perm)[0, 0], rec[0, perm[0, 0]])
  with pytest.raises(ValueError, match=r"\[V, B, \.\.\.\]"):
    im.match_order(rec[0], orig[0, :3])


def test_image_metrics_match_numpy_psnr_and_dm_pix_ssim():
  r = np.random.default_rng(1)
  orig = r.uniform(size=(2, 3, 8, 8, 1)).astype(np.float32)
  rec = np.clip(orig[:, ::-1] + 0.05 * r.normal(size=orig.shape), 0, 1).astype(np.float32)  # reversed order
  labels = np.array([[0, 1, 1], [1, 0, 0]])
  out = im.image_metrics(rec, orig, rec_labels=labels[:, ::-1], true_labels=labels)
  np.testing.assert_array_equal(out["perm"], [[2, 1, 0], [2, 1, 0]])
  aligned = rec[:, ::-1]
  want_psnr = -10 * np.log10(np.mean((aligned - orig) ** 2, axis=(2, 3, 4)))
  np.testing.assert_allclose(out["psnr"], want_psnr, rtol=1e-4)
  size, sigma = im.ssim_filter(8, 8)
  assert (size, sigma) == (7, 1.5 * 7 / 11)
  want_ssim = dm_pix.ssim(aligned.reshape(6, 8, 8, 1), orig.reshape(6, 8, 8, 1), filter_size=7, filter_sigma=sigma)
  np.testing.assert_allclose(out["ssim"], np.asarray(want_ssim).reshape(2, 3), rtol=1e-5)
  assert out["label_correct"].all()
  assert im.ssim_filter(28, 28) == (11, 1.5)
  with pytest.raises(ValueError, match=r"\[V, B, H, W, C\]"):
    im.image_metrics(rec[0], orig[0])


def test_record_metrics_match_loop():
  r = np.random.default_rng(2)
  orig = r.normal(size=(4, 2, 5))
  rec = orig + r.choice([0.0, 0.05, 0.5], size=orig.shape)
  out = im.record_metrics(rec, orig, tolerance=0.1)
  for v, b in itertools.product(range(4), range(2)):
    j = out["perm"][v, b]
    np.testing.assert_allclose(out["abs_error"][v, b], np.abs(rec[v, j] - orig[v, b]))
    assert out["recovered"][v, b] == all(abs(rec[v, j, f] - orig[v, b, f]) <= 0.1 for f in range(5))
  with pytest.raises(ValueError, match="tolerance"):
    im.record_metrics(rec, orig, tolerance=0.0)


def test_save_grid_writes_a_small_png(tmp_path):
  r = np.random.default_rng(3)
  path = os.path.join(tmp_path, "grid.png")
  im.save_grid(path, r.uniform(size=(4, 8, 8, 1)), r.uniform(size=(4, 8, 8, 1)), psnr=[10, 20, 30, 40], title="t")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) < 300_000
