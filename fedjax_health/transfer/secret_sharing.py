"""FTL's exchange under two-party additive secret sharing with Beaver triples (simulated dealer).

The cross product ``W v`` of ``ftl.protocol_gradients`` (``W`` private to the "owner", ``v`` to the
other party) runs as the secret-sharing variant of Liu et al. 2020 (sec. "FTL with secret
sharing"), with SPDZ-style information-theoretic MACs so that a tampered share is detected:

* values are fixed point (``FixedPoint``, 32 fraction bits) in the prime field
  ``GF(2^127 - 1)`` -- the Shamir field of ``privacy/secagg.py``; that module's 32-bit ring is too
  small for the products of two fixed-point values this protocol needs;
* ``[x] = (x_0, x_1)`` with ``x_0 + x_1 = x`` and MAC shares ``(m_0, m_1)``, ``m_0 + m_1 = Delta x``
  for a global MAC key ``Delta`` that the dealer also shares; no single share says anything about x;
* the dealer hands out a matrix Beaver triple ``[A], [b], [c = A b]`` (offline phase); the parties
  open ``E = W - A`` and ``f = v - b`` (uniform, so they reveal nothing) and set
  ``[W v] = [c] + E [b] + [A] f + E f`` (the constant added to party 0's share, ``Delta_k E f`` to
  each MAC share);
* every opening checks ``sum_k (m_k - Delta_k x) = 0``: a share altered without the matching MAC
  share (probability ``1/p`` of passing) or a missing share raises, never a silently wrong model;
* the result is opened to the owner only.

The product of two encodings has scale ``2^(2f)`` and is decoded without truncation, so the result
equals ``W v`` up to the encoding rounding of each factor. Bytes are counted at 16 per field element.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import numpy as np

from fedjax_health.privacy.secagg import PRIME
from fedjax_health.transfer.fixed_point import FixedPoint, decode, encode, to_residues

ELEMENT_BYTES = 16
PARTIES = ("A", "B")


@dataclasses.dataclass
class PartyCosts:
  bytes_sent: int = 0
  multiplications: int = 0  # field multiplications of the online phase
  seconds: float = 0.0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


class Shared(NamedTuple):
  """A secret-shared array: ``values[k]``, ``macs[k]`` held by party k (object arrays mod PRIME)."""
  values: tuple
  macs: tuple


def _random_field(rng: np.random.Generator, shape) -> np.ndarray:
  hi = rng.integers(0, 2 ** 63, size=shape, dtype=np.uint64).astype(object)
  lo = rng.integers(0, 2 ** 64, size=shape, dtype=np.uint64).astype(object)
  return ((hi << 64) | lo) % PRIME if np.ndim(hi) else np.asarray(((int(hi) << 64) | int(lo)) % PRIME, object)


def _mod(x):
  return np.mod(x, PRIME) if isinstance(x, np.ndarray) else x % PRIME


class Dealer:
  """The simulated trusted dealer of the offline phase: MAC key shares and Beaver triples."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self.delta = int(_random_field(rng, ()))
    d1 = int(_random_field(rng, ()))
    self.delta_shares = ((self.delta - d1) % PRIME, d1)
    self.bytes_sent = 0
    self.triples = 0

  def share(self, x: np.ndarray) -> Shared:
    """Returns fresh shares (and MAC shares) of the field array ``x``."""
    x = np.asarray(x, object)
    r = _random_field(self.rng, x.shape)
    mac = _mod(x * self.delta)
    rm = _random_field(self.rng, x.shape)
    return Shared((_mod(x - r), r), (_mod(mac - rm), rm))

  def matrix_triple(self, rows: int, cols: int) -> tuple[Shared, Shared, Shared]:
    a = _random_field(self.rng, (rows, cols))
    b = _random_field(self.rng, (cols,))
    c = _mod(a.dot(b))
    self.triples += 1
    self.bytes_sent += 2 * 2 * (rows * cols + cols + rows) * ELEMENT_BYTES  # values + MACs to both parties
    return self.share(a), self.share(b), self.share(c)


def _sub(x: Shared, y: Shared) -> Shared:
  return Shared(tuple(_mod(a - b) for a, b in zip(x.values, y.values)),
                tuple(_mod(a - b) for a, b in zip(x.macs, y.macs)))


def _check_received(got, expected, sender: str, name: str) -> None:
  if got is None:
    raise ValueError(f"secret sharing: the share of party {sender} for {name!r} is missing")
  if np.shape(got) != np.shape(expected):
    raise ValueError(f"secret sharing: the share of party {sender} for {name!r} has shape {np.shape(got)}, "
                     f"expected {np.shape(expected)}")


Fault = Callable[[str, str, object], object]  # (sender, message name, payload) -> payload (tests)


class SecretSharingProtocol:
  """Runs the cross products between parties A and B on additive shares with Beaver triples."""

  def __init__(self, fixed_point: FixedPoint = FixedPoint(), seed: int = 0, fault: Fault | None = None):
    fixed_point.check("secret_sharing")
    self.fp = fixed_point
    self.rng = np.random.default_rng(seed)
    self.dealer = Dealer(np.random.default_rng([seed, 1]))
    self.costs = {p: PartyCosts() for p in PARTIES}
    self.fault = fault
    self.last_seen = {p: None for p in PARTIES}  # shares each party received of the other's input

  def _send(self, sender: str, name: str, payload):
    self.costs[sender].bytes_sent += int(np.size(payload)) * ELEMENT_BYTES
    return self.fault(sender, name, payload) if self.fault is not None else payload

  def share_input(self, party: str, x_int: np.ndarray, name: str) -> Shared:
    """``party`` shares its own encoded input: it keeps one share and sends the other."""
    shared = self.dealer.share(to_residues(x_int, PRIME))  # MAC'd input sharing (SPDZ input phase)
    k = PARTIES.index(party)
    other = 1 - k
    sent = self._send(party, f"{name}:share", shared.values[other])
    _check_received(sent, shared.values[other], PARTIES[k], f"{name}:share")
    self.last_seen[PARTIES[other]] = sent
    values = list(shared.values)
    values[other] = sent
    return Shared(tuple(values), shared.macs)

  def open(self, shared: Shared, name: str, to: tuple = PARTIES) -> np.ndarray:
    """Returns the opened value after the MAC check; each receiving party gets the other's share."""
    values = list(shared.values)
    macs = list(shared.macs)
    for k, party in enumerate(PARTIES):
      if any(PARTIES[j] in to for j in range(2) if j != k):
        values[k] = self._send(party, f"{name}:open", values[k])
        macs[k] = self._send(party, f"{name}:mac", macs[k])
    for k in range(2):
      _check_received(values[k], shared.values[k], PARTIES[k], name)
      _check_received(macs[k], shared.macs[k], PARTIES[k], f"{name} (MAC)")
    x = _mod(values[0] + values[1])
    sigma = _mod(macs[0] - x * self.dealer.delta_shares[0] + macs[1] - x * self.dealer.delta_shares[1])
    if np.any(sigma != 0):
      raise ValueError(f"secret sharing: MAC check failed when opening {name!r}: a share was corrupted")
    return x

  def __call__(self, owner: str, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Returns ``w @ v`` to ``owner`` (who holds ``w``); the other party holds ``v``."""
    if owner not in PARTIES:
      raise ValueError(f"owner must be 'A' or 'B', got {owner!r}")
    holder = "B" if owner == "A" else "A"
    w, v = np.asarray(w), np.ravel(v)
    if w.ndim != 2 or w.shape[1] != v.shape[0]:
      raise ValueError(f"matrix of shape {w.shape} does not match a vector of {v.shape[0]}")
    if self.fp.product_bound(w.shape[1]) >= PRIME // 2:
      raise OverflowError(f"a product of {w.shape[1]} terms may exceed the field GF(2^127 - 1) at "
                          f"frac_bits={self.fp.frac_bits}, max_abs={self.fp.max_abs:g}; lower them")
    t0 = time.perf_counter()
    ws = self.share_input(owner, encode(w, self.fp, f"party {owner}'s matrix"), f"W_{owner}")
    vs = self.share_input(holder, encode(v, self.fp, f"party {holder}'s vector"), f"v_{holder}")
    a, b, c = self.dealer.matrix_triple(*w.shape)
    e = self.open(_sub(ws, a), f"E_{owner}")
    f = self.open(_sub(vs, b), f"f_{owner}")
    ef = _mod(e.dot(f))
    z_vals, z_macs = [], []
    for k in range(2):
      dk = self.dealer.delta_shares[k]
      z_vals.append(_mod(c.values[k] + e.dot(b.values[k]) + a.values[k].dot(f) + (ef if k == 0 else 0)))
      z_macs.append(_mod(c.macs[k] + e.dot(b.macs[k]) + a.macs[k].dot(f) + ef * dk))
    mults = 2 * (2 * w.size + w.shape[0])
    self.costs[owner].multiplications += mults
    self.costs[holder].multiplications += mults
    z = self.open(Shared(tuple(z_vals), tuple(z_macs)), f"Wv_{owner}", to=(owner,))
    elapsed = time.perf_counter() - t0
    for p in PARTIES:  # the simulation runs both parties' (symmetric) work in one process
      self.costs[p].seconds += elapsed / 2
    return decode(z, PRIME, 2 * self.fp.frac_bits)

  def cost_summary(self) -> dict:
    out = {p: c.as_dict() for p, c in self.costs.items()}
    out["dealer"] = {"bytes_sent": self.dealer.bytes_sent, "triples": self.dealer.triples}
    return out
