"""Fixed-point encoding of real values as integers modulo ``n`` (Paillier plaintexts, ring shares).

``x -> round(x * 2^f)``, negative values as ``n - |.|``. A product of two encodings carries scale
``2^(2f)``; ``decode`` takes the scale of what it reads. Values beyond ``max_abs`` or non-finite
values raise instead of wrapping around (a wrapped value would silently corrupt the model).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class FixedPoint(NamedTuple):
  frac_bits: int = 32  # precision: values are rounded to multiples of 2^-frac_bits
  max_abs: float = 2.0 ** 20  # range: |x| must stay below this

  def check(self, field: str) -> None:
    if not 1 <= self.frac_bits <= 62:
      raise ValueError(f"{field}.frac_bits must be in [1, 62], got {self.frac_bits}")
    if not self.max_abs > 0:
      raise ValueError(f"{field}.max_abs must be > 0, got {self.max_abs}")

  def product_bound(self, terms: int) -> int:
    """Returns the largest |integer| a sum of ``terms`` products of two encodings can reach."""
    return terms * int(self.max_abs * 2 ** self.frac_bits) ** 2


def encode(x: np.ndarray, fp: FixedPoint, what: str) -> np.ndarray:
  """Returns an object array of Python ints ``round(x * 2^f)`` (signed); raises on overflow."""
  x = np.asarray(x, np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: cannot encode non-finite values (NaN/inf) in fixed point")
  big = np.abs(x) >= fp.max_abs
  if np.any(big):
    raise OverflowError(f"{what}: {int(big.sum())} values exceed the fixed-point range |x| < {fp.max_abs:g} "
                        f"(largest {float(np.abs(x).max()):.4g}); raise max_abs or rescale")
  return np.vectorize(int, otypes=[object])(np.rint(np.ldexp(x, fp.frac_bits)))


def to_residues(ints: np.ndarray, modulus: int) -> np.ndarray:
  return np.vectorize(lambda v: int(v) % modulus, otypes=[object])(ints)


def decode(residues, modulus: int, scale_bits: int) -> np.ndarray:
  """Returns float64 values of residues read as signed (``> modulus/2`` is negative) at ``2^scale_bits``."""
  half = modulus // 2
  scale = 2 ** scale_bits
  return np.array([((int(v) - modulus) if int(v) > half else int(v)) / scale for v in np.ravel(residues)],
                  np.float64).reshape(np.shape(residues))
