"""FTL's exchange under additively homomorphic (Paillier) encryption with random masks.

The cross product ``W v`` of ``ftl.protocol_gradients`` (``W`` private to the "owner", ``v`` private
to the other party) runs as in Liu et al. 2020, sec. "FTL with HE" (Algorithm 1):

1. the vector's holder encrypts ``v`` under its own public key and sends ``[[v]]``;
2. the owner computes ``[[W v]]`` homomorphically (``[[x]] [[y]] = [[x + y]]``, ``[[x]]^k = [[k x]]``),
   adds a fresh encryption of a mask ``r`` drawn uniformly from ``Z_n`` and sends ``[[W v + r]]``;
3. the holder decrypts and returns ``W v + r mod n``: uniform in ``Z_n`` whatever ``W v`` is, so it
   learns nothing about the owner's gradient; the owner subtracts ``r`` and decodes.

Values are fixed point (``fixed_point.FixedPoint``: ``frac_bits`` = 32 by default, so each encoded
value is within ``2^-33`` of the float, and a product of ``L`` terms within ``L (|W| + |v|) 2^-33``).
Keys come from python-paillier (``phe``, with ``gmpy2``); key sizes below 1024 bits are refused.
Costs are counted per party: encryptions, decryptions, homomorphic operations, bytes sent, seconds.
"""

from __future__ import annotations

import dataclasses
import secrets
import time

import gmpy2
import numpy as np
from phe import paillier

from fedjax_health.transfer.fixed_point import FixedPoint, decode, encode

MIN_KEY_BITS = 1024
PARTIES = ("A", "B")


@dataclasses.dataclass
class PartyCosts:
  encryptions: int = 0
  decryptions: int = 0
  homomorphic_ops: int = 0  # ciphertext multiplications/exponentiations
  bytes_sent: int = 0
  seconds: float = 0.0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EncryptedVector:
  public_key: paillier.PaillierPublicKey
  ciphertexts: tuple  # ints modulo n^2
  scale_bits: int


def _other(party: str) -> str:
  if party not in PARTIES:
    raise ValueError(f"party must be 'A' or 'B', got {party!r}")
  return "B" if party == "A" else "A"


class PaillierProtocol:
  """Runs the masked cross products between parties A and B, each with its own Paillier key pair."""

  def __init__(self, key_bits: int = 2048, fixed_point: FixedPoint = FixedPoint(), keypairs=None):
    if int(key_bits) < MIN_KEY_BITS:
      raise ValueError(f"paillier.key_bits must be >= {MIN_KEY_BITS} (smaller moduli are factorable), got {key_bits}")
    fixed_point.check("paillier")
    self.key_bits = int(key_bits)
    self.fp = fixed_point
    self.keys = keypairs or {p: paillier.generate_paillier_keypair(n_length=self.key_bits) for p in PARTIES}
    self.costs = {p: PartyCosts() for p in PARTIES}
    self.last_decrypted = {p: None for p in PARTIES}  # what each party saw in its last decryption (residues)

  # --- primitives, each charged to the party that runs it ---------------------------------------

  def _ct_bytes(self, pk) -> int:
    return 2 * ((pk.n.bit_length() + 7) // 8)

  def encrypt(self, party: str, x: np.ndarray) -> EncryptedVector:
    """Returns ``party``'s encryption of ``x`` (flat) under its own public key."""
    t0 = time.perf_counter()
    pk = self.keys[party][0]
    ints = encode(np.ravel(x), self.fp, f"party {party}'s vector")
    cts = tuple(pk.raw_encrypt(int(v) % pk.n) for v in ints)
    c = self.costs[party]
    c.encryptions += len(cts)
    c.seconds += time.perf_counter() - t0
    return EncryptedVector(pk, cts, self.fp.frac_bits)

  def matvec(self, party: str, w: np.ndarray, enc: EncryptedVector) -> EncryptedVector:
    """Returns ``[[w @ v]]`` computed by ``party`` (holding ``w``) from ``[[v]]``."""
    t0 = time.perf_counter()
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] != len(enc.ciphertexts):
      raise ValueError(f"matrix of shape {w.shape} does not match an encrypted vector of {len(enc.ciphertexts)}")
    pk = enc.public_key
    if self.fp.product_bound(w.shape[1]) >= pk.n // 2:
      raise OverflowError(f"a product of {w.shape[1]} terms may exceed the plaintext space of a "
                          f"{pk.n.bit_length()}-bit key at frac_bits={self.fp.frac_bits}, max_abs={self.fp.max_abs:g}")
    n2 = pk.nsquare
    w_int = encode(w, self.fp, f"party {party}'s matrix")
    cts = [gmpy2.mpz(c) for c in enc.ciphertexts]
    inv = [gmpy2.invert(c, n2) for c in cts]
    out, ops = [], 0
    for row in w_int:
      acc = gmpy2.mpz(1)
      for k, e in enumerate(row):
        if e > 0:
          acc = acc * gmpy2.powmod(cts[k], e, n2) % n2
        elif e < 0:
          acc = acc * gmpy2.powmod(inv[k], -e, n2) % n2
        ops += e != 0
      out.append(int(acc))
    self.costs[party].homomorphic_ops += ops
    self.costs[party].seconds += time.perf_counter() - t0
    return EncryptedVector(pk, tuple(out), enc.scale_bits + self.fp.frac_bits)

  def mask(self, party: str, enc: EncryptedVector) -> tuple[EncryptedVector, list]:
    """Returns (``[[x + r]]``, ``r``) with ``r`` uniform in ``Z_n``, freshly encrypted by ``party``."""
    t0 = time.perf_counter()
    pk = enc.public_key
    masks = [secrets.randbelow(pk.n) for _ in enc.ciphertexts]
    n2 = pk.nsquare
    out = tuple(int(gmpy2.mpz(c) * pk.raw_encrypt(r) % n2) for c, r in zip(enc.ciphertexts, masks))
    c = self.costs[party]
    c.encryptions += len(out)
    c.homomorphic_ops += len(out)
    c.seconds += time.perf_counter() - t0
    return EncryptedVector(pk, out, enc.scale_bits), masks

  def decrypt(self, party: str, enc: EncryptedVector) -> list:
    """Returns ``party``'s decryption (residues mod n); refuses ciphertexts under another key."""
    pk, sk = self.keys[party]
    if enc.public_key != pk:
      raise ValueError(f"party {party} cannot decrypt: the ciphertexts were encrypted under a different "
                       "Paillier key (wrong key)")
    t0 = time.perf_counter()
    out = [sk.raw_decrypt(int(c)) for c in enc.ciphertexts]
    c = self.costs[party]
    c.decryptions += len(out)
    c.seconds += time.perf_counter() - t0
    self.last_decrypted[party] = out
    return out

  # --- the protocol step ----------------------------------------------------------------------

  def __call__(self, owner: str, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Returns ``w @ v`` to ``owner`` (who holds ``w``); the other party holds ``v`` and the key."""
    holder = _other(owner)
    enc_v = self.encrypt(holder, v)
    self.costs[holder].bytes_sent += len(enc_v.ciphertexts) * self._ct_bytes(enc_v.public_key)
    masked, r = self.mask(owner, self.matvec(owner, w, enc_v))
    self.costs[owner].bytes_sent += len(masked.ciphertexts) * self._ct_bytes(masked.public_key)
    plain = self.decrypt(holder, masked)
    n = enc_v.public_key.n
    self.costs[holder].bytes_sent += len(plain) * ((n.bit_length() + 7) // 8)
    t0 = time.perf_counter()
    out = decode([(p - m) % n for p, m in zip(plain, r)], n, masked.scale_bits)
    self.costs[owner].seconds += time.perf_counter() - t0
    return out

  def cost_summary(self) -> dict:
    return {p: c.as_dict() for p, c in self.costs.items()}
