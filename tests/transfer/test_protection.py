"""Protected FTL exchanges: Paillier with masks and Beaver-triple secret sharing equal plaintext."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fedjax_health.privacy.secagg import PRIME
from fedjax_health.transfer import ftl
from fedjax_health.transfer.fixed_point import FixedPoint
from fedjax_health.transfer.paillier import PaillierProtocol
from fedjax_health.transfer.secret_sharing import SecretSharingProtocol

FP = FixedPoint(frac_bits=24)  # 24 bits: faster Paillier exponentiations in tests; error ~ L * 2^-25


@pytest.fixture(scope="module")
def paillier_keys():
  return PaillierProtocol(1024, FP).keys  # 1024-bit keys for speed; configs use 2048


def _paillier(keys):
  return PaillierProtocol(1024, FP, keypairs=keys)


def _setup(seed=0, n=8, d=4):
  rng = np.random.default_rng(seed)
  x_a = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
  y_a = jnp.asarray(rng.integers(0, 2, 16), jnp.float32)
  x_b = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
  net_a, net_b = ftl.party_network((), d), ftl.party_network((), d)
  return net_a, net_b, net_a.init(jax.random.key(seed), x_a[:1]), net_b.init(jax.random.key(seed + 1), x_b[:1]), x_a, y_a, x_b


@pytest.mark.parametrize("protection", ["paillier", "secret_sharing"])
def test_protected_gradients_and_training_equal_plaintext(protection, paillier_keys):
  net_a, net_b, p_a, p_b, x_a, y_a, x_b = _setup()
  hp = ftl.FTLHyper(gamma=0.5, lam=0.01)
  proto = _paillier(paillier_keys) if protection == "paillier" else SecretSharingProtocol(FP, seed=1)
  fns, _ = ftl.make_party_fns(net_a, net_b, p_a, p_b, hp)
  pa, pb = ftl.compute_parties(fns, ravel_pytree(p_a)[0], ravel_pytree(p_b)[0], x_a, y_a, x_b)
  plain = ftl.protocol_gradients(pa, pb)
  prot = ftl.protocol_gradients(pa, pb, proto)
  for p, q, w, v in ((plain[0], prot[0], pa.w[:-1], pb.v), (plain[1], prot[1], pb.w, pa.v)):
    # Fixed-point bound: each of the L products is off by at most (|w| + |v| + 2^-f) 2^-(f+1).
    bound = np.sum(np.abs(w) + np.abs(v)[None] + 1.0, axis=1) * 2.0 ** -(FP.frac_bits + 1)
    assert np.all(np.abs(p - q) <= bound + 1e-12)
    assert np.any(p != q) or protection == "none"
  assert abs(plain[2] - prot[2]) < 1e-5
  # Two epochs of training end at the plaintext model within the precision.
  kw = dict(epochs=2, lr=0.05, log_every=0)
  ref = ftl.train_ftl(net_a, net_b, p_a, p_b, x_a, y_a, x_b, hp, **kw)
  got = ftl.train_ftl(net_a, net_b, p_a, p_b, x_a, y_a, x_b, hp, cross=proto, **kw)
  for r, g in ((ref.params_a, got.params_a), (ref.params_b, got.params_b)):
    np.testing.assert_allclose(ravel_pytree(g)[0], ravel_pytree(r)[0], atol=1e-5)
  costs = proto.cost_summary()
  assert costs["A"]["bytes_sent"] > 0 and costs["B"]["bytes_sent"] > 0


def test_paillier_costs_are_counted(paillier_keys):
  proto = _paillier(paillier_keys)
  w, v = np.array([[1.0, -2.0, 0.0, 0.5], [0.0, 0.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), np.array([0.1, -0.2, 0.3, 4.0])
  np.testing.assert_allclose(proto("A", w, v), w @ v, atol=1e-6)
  a, b = proto.costs["A"], proto.costs["B"]
  assert (b.encryptions, a.encryptions, b.decryptions, a.decryptions) == (4, 3, 3, 0)
  assert a.homomorphic_ops == np.count_nonzero(w) + 3  # products + mask additions
  ct = 2 * 1024 // 8
  assert b.bytes_sent == 4 * ct + 3 * 1024 // 8 and a.bytes_sent == 3 * ct
  assert a.seconds > 0 and b.seconds > 0


def _correlation(x, y):
  return float(np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1])


def test_what_a_party_decrypts_is_masked(paillier_keys):
  # B's gradient entries take widely varying true values; A decrypts them masked: the residues it
  # sees are uniform in Z_n and uncorrelated with the truth.
  proto = _paillier(paillier_keys)
  n = proto.keys["A"][0].n
  rng = np.random.default_rng(0)
  truth, seen = [], []
  for _ in range(150):
    v = rng.uniform(-100, 100, size=1)
    proto("B", np.ones((1, 1)), v)
    truth.append(v[0])
    seen.append(proto.last_decrypted["A"][0] / n)
  assert abs(_correlation(truth, seen)) < 0.3
  assert 0.3 < np.mean(seen) < 0.7  # spread over the whole plaintext space, not near 0 or n


def test_secret_shares_reveal_nothing_and_reconstruct_exactly():
  proto = SecretSharingProtocol(FP, seed=0)
  rng = np.random.default_rng(1)
  truth, seen = [], []
  for _ in range(150):
    v = rng.uniform(-100, 100, size=1)
    proto("B", np.ones((1, 1)), v)  # A holds v and shares it; B receives one share
    truth.append(v[0])
    seen.append(int(proto.last_seen["B"][0]) / PRIME)
  assert abs(_correlation(truth, seen)) < 0.3
  x = np.array([int(t) for t in rng.integers(0, 2 ** 62, 50)], object) * 2 ** 60 % PRIME
  shared = proto.dealer.share(x)
  assert np.all(proto.open(shared, "x") == x)  # exact reconstruction


@pytest.mark.parametrize("message", ["W_B:share", "E_B:open", "f_B:open", "Wv_B:open", "Wv_B:mac"])
@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_corrupt_or_missing_share_raises(message, fault):
  def inject(sender, name, payload):
    if name != message:
      return payload
    if fault == "missing":
      return None
    bad = np.array(payload, object)
    bad.flat[0] = (bad.flat[0] + 1) % PRIME
    return bad

  proto = SecretSharingProtocol(FP, seed=0, fault=inject)
  expect = "is missing" if fault == "missing" else "MAC check failed"
  with pytest.raises(ValueError, match=expect):
    proto("B", np.ones((2, 3)), np.ones(3))


def test_wrong_key_small_key_and_overflow_raise(paillier_keys):
  proto = _paillier(paillier_keys)
  enc = proto.encrypt("B", np.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="different Paillier key"):
    proto.decrypt("A", enc)
  with pytest.raises(ValueError, match="paillier.key_bits must be >= 1024"):
    PaillierProtocol(512)
  with pytest.raises(OverflowError, match="fixed-point range"):
    proto("A", np.ones((1, 2)), np.array([1.0, 2.0 ** 21]))
  with pytest.raises(ValueError, match="non-finite"):
    proto("A", np.ones((1, 1)), np.array([np.nan]))
  with pytest.raises(OverflowError, match="fixed-point range"):
    SecretSharingProtocol(FP)("B", np.full((1, 2), 2.0 ** 20), np.ones(2))
  with pytest.raises(OverflowError, match="exceed the field"):
    SecretSharingProtocol(FixedPoint(frac_bits=40, max_abs=2.0 ** 30))("B", np.ones((1, 2)), np.ones(2))
