"""How much an inversion attack recovered: PSNR/SSIM (dm-pix), label accuracy, record error, image grids.

A batch attack may return the batch's examples in any order, so every metric first pairs each
reconstruction with an original by a minimum-cost assignment on squared error (Hungarian
algorithm), as Geiping et al. (2020) and the ``breaching`` library do for batches.
"""

from __future__ import annotations

import dm_pix
import jax
import numpy as np
from scipy.optimize import linear_sum_assignment


def match_order(rec: np.ndarray, orig: np.ndarray) -> np.ndarray:
  """Returns ``perm`` ``[V, B]`` so that ``rec[v, perm[v, i]]`` is paired with ``orig[v, i]``.

  ``rec``, ``orig``: ``[V, B, ...]``; pairs minimise the summed squared error per victim.
  """
  rec, orig = np.asarray(rec, np.float64), np.asarray(orig, np.float64)
  if rec.shape != orig.shape or rec.ndim < 2:
    raise ValueError(f"reconstructions {rec.shape} and originals {orig.shape} must both be [V, B, ...]")
  v, b = rec.shape[:2]
  r, o = rec.reshape(v, b, -1), orig.reshape(v, b, -1)
  cost = np.sum((o[:, :, None, :] - r[:, None, :, :]) ** 2, axis=-1)  # [V, B_orig, B_rec]
  return np.stack([linear_sum_assignment(c)[1] for c in cost]).astype(np.int64)


def reorder(a: np.ndarray, perm: np.ndarray) -> np.ndarray:
  """Returns ``a[v, perm[v]]`` for every victim (``a``: ``[V, B, ...]``)."""
  return np.take_along_axis(np.asarray(a), perm.reshape(perm.shape + (1,) * (np.ndim(a) - 2)), axis=1)


def ssim_filter(height: int, width: int) -> tuple[int, float]:
  """Returns dm-pix's SSIM window (11, sigma 1.5), shrunk to fit small images (odd size, same sigma ratio)."""
  size = min(11, height, width)
  size -= (size + 1) % 2
  return size, 1.5 * size / 11


@jax.jit
def _psnr_ssim(rec, orig):
  size, sigma = ssim_filter(rec.shape[1], rec.shape[2])
  return dm_pix.psnr(rec, orig), dm_pix.ssim(rec, orig, max_val=1.0, filter_size=size, filter_sigma=sigma)


def image_metrics(rec: np.ndarray, orig: np.ndarray, rec_labels=None, true_labels=None) -> dict:
  """Returns per-example ``psnr``, ``ssim`` ``[V, B]`` and ``label_correct`` after matching the order.

  Images are ``[V, B, H, W, C]`` with values in [0, 1] (reconstructions are clipped to it).
  """
  rec, orig = np.clip(np.asarray(rec, np.float32), 0.0, 1.0), np.asarray(orig, np.float32)
  if rec.ndim != 5:
    raise ValueError(f"images must be [V, B, H, W, C], got shape {rec.shape}")
  perm = match_order(rec, orig)
  rec = reorder(rec, perm)
  v, b = rec.shape[:2]
  psnr, ssim = _psnr_ssim(rec.reshape((v * b,) + rec.shape[2:]), orig.reshape((v * b,) + orig.shape[2:]))
  out = {"psnr": np.asarray(psnr).reshape(v, b), "ssim": np.asarray(ssim).reshape(v, b), "perm": perm}
  if rec_labels is not None and true_labels is not None:
    out["label_correct"] = reorder(rec_labels, perm) == np.asarray(true_labels)
  return out


def record_metrics(rec: np.ndarray, orig: np.ndarray, tolerance: float, rec_labels=None, true_labels=None) -> dict:
  """Returns the error of reconstructed tabular records ``[V, B, F]`` after matching the order.

  ``abs_error`` ``[V, B, F]`` per feature (in the data's units, z-scores for Fed-Heart-Disease);
  ``recovered`` ``[V, B]``: every feature within ``tolerance``; ``label_correct`` if labels given.
  """
  if tolerance <= 0:
    raise ValueError(f"tolerance must be > 0, got {tolerance}")
  rec, orig = np.asarray(rec, np.float64), np.asarray(orig, np.float64)
  if rec.ndim != 3:
    raise ValueError(f"records must be [V, B, F], got shape {rec.shape}")
  perm = match_order(rec, orig)
  err = np.abs(reorder(rec, perm) - orig)
  out = {"abs_error": err, "recovered": np.all(err <= tolerance, axis=-1), "perm": perm}
  if rec_labels is not None and true_labels is not None:
    out["label_correct"] = reorder(rec_labels, perm) == np.asarray(true_labels)
  return out


def save_grid(path: str, originals: np.ndarray, reconstructions: np.ndarray, psnr=None, title: str = "") -> None:
  """Writes a PNG: originals (top row) over reconstructions (bottom row), PSNR under each.

  ``originals``, ``reconstructions``: ``[N, H, W, C]`` in [0, 1] (C = 1 or 3).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  originals, reconstructions = np.asarray(originals), np.clip(np.asarray(reconstructions), 0, 1)
  n = originals.shape[0]
  fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.5), squeeze=False)
  for i in range(n):
    for row, img in enumerate((originals[i], reconstructions[i])):
      ax = axes[row, i]
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    if psnr is not None:
      axes[1, i].set_xlabel(f"{float(psnr[i]):.1f} dB", fontsize=7)
  axes[0, 0].set_ylabel("original", fontsize=7)
  axes[1, 0].set_ylabel("reconstr.", fontsize=7)
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
