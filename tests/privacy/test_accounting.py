"""Accounting: our epsilons equal direct dp-accounting computations; calibration; bad input."""

import math

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_health.privacy import accounting

DELTA = 1e-5


def _rdp(event, rel=NeighboringRelation.ADD_OR_REMOVE_ONE):
  return rdp_privacy_accountant.RdpAccountant(neighboring_relation=rel).compose(event).get_epsilon(DELTA)


def _pld(event):
  return pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(DELTA)


@pytest.mark.parametrize("z,rounds,q", [(1.0, 10, 1.0), (0.8, 50, 0.1), (3.0, 200, 0.02)])
def test_client_poisson_epsilon_equals_direct_dp_accounting(z, rounds, q):
  sub = dp_event.GaussianDpEvent(z) if q == 1 else dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
  direct = dp_event.SelfComposedDpEvent(sub, rounds)
  ours = accounting.client_level_event(z, rounds, "poisson", q)
  assert accounting.compute_epsilon(ours, DELTA, "rdp") == _rdp(direct)
  assert accounting.compute_epsilon(ours, DELTA, "pld") == _pld(direct)


def test_client_fixed_size_and_local_epsilon_equal_direct_dp_accounting():
  z, rounds, n, m = 1.5, 20, 50, 10
  direct = dp_event.SelfComposedDpEvent(
      dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(z / 2)), rounds)
  ours = accounting.client_level_event(z, rounds, "fixed", population=n, cohort_size=m)
  assert accounting.compute_epsilon(ours, DELTA) == _rdp(direct, NeighboringRelation.REPLACE_ONE)
  local = accounting.client_level_event(z, rounds, "local")
  assert accounting.compute_epsilon(local, DELTA) == _rdp(
      dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z / 2), rounds))
  with pytest.raises(ValueError, match="pld"):
    accounting.compute_epsilon(ours, DELTA, "pld")


def test_patient_epsilon_equals_direct_dp_accounting_and_pld_is_tighter():
  ours = accounting.patient_level_event(1.1, 0.05, 300)
  direct = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.1)), 300)
  rdp = accounting.compute_epsilon(ours, DELTA, "rdp")
  pld = accounting.compute_epsilon(ours, DELTA, "pld")
  assert rdp == _rdp(direct) and pld == _pld(direct)
  assert 0 < pld <= rdp


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_meets_target_and_is_near_optimal(target):
  make = lambda z: accounting.patient_level_event(z, 0.1, 100)
  z = accounting.calibrate_noise_multiplier(make, target, DELTA)
  assert accounting.compute_epsilon(make(z), DELTA) <= target
  assert accounting.compute_epsilon(make(z - 0.01), DELTA) > target


def test_calibrated_noise_grows_with_rounds():
  zs = [accounting.calibrate_noise_multiplier(lambda z, r=r: accounting.client_level_event(z, r), 3.0, DELTA)
        for r in (5, 20)]
  assert zs[0] < zs[1]


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, float("nan")])
def test_delta_outside_unit_interval_raises(delta):
  with pytest.raises(ValueError, match="delta"):
    accounting.compute_epsilon(accounting.client_level_event(1.0, 3), delta)
  with pytest.raises(ValueError, match="delta"):
    accounting.PrivacyLedger(delta)


def test_unreachable_or_invalid_target_epsilon_raises():
  make = lambda z: accounting.client_level_event(z, 1000)
  with pytest.raises(ValueError, match="cannot be met"):
    accounting.calibrate_noise_multiplier(make, 0.01, DELTA, max_noise_multiplier=20.0)
  for bad in (0.0, -1.0, math.inf):
    with pytest.raises(ValueError, match="target_epsilon"):
      accounting.calibrate_noise_multiplier(make, bad, DELTA)


@pytest.mark.parametrize("z", [0.0, -1.0, math.inf])
def test_non_positive_noise_multiplier_raises(z):
  with pytest.raises(ValueError, match="noise_multiplier"):
    accounting.client_level_event(z, 3)
  with pytest.raises(ValueError, match="noise_multiplier"):
    accounting.patient_level_event(z, 0.1, 3)


def test_ledger_reports_both_levels_per_round():
  ledger = accounting.PrivacyLedger(
      DELTA, "rdp", client_event=lambda r: accounting.client_level_event(2.0, r),
      patient_event=lambda r: accounting.patient_level_event(1.0, 0.1, 10 * r))
  e = [ledger.epsilons(r) for r in (0, 1, 5, 10)]
  assert e[0]["epsilon_client"] == 0.0 and e[0]["epsilon_patient"] == 0.0
  assert all(a["epsilon_client"] < b["epsilon_client"] for a, b in zip(e, e[1:]))
  assert all(a["epsilon_patient"] < b["epsilon_patient"] for a, b in zip(e, e[1:]))
  assert e[2]["epsilon_client"] == _rdp(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(2.0), 5))
  assert e[2]["epsilon"] == e[2]["epsilon_client"] and e[2]["delta"] == DELTA
  clip_only = accounting.PrivacyLedger(DELTA, client_event=lambda r: accounting.client_level_event(1.0, r),
                                       client_noise=False)
  assert clip_only.epsilons(3)["epsilon"] == math.inf
