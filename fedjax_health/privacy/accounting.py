"""Privacy accounting with Google's ``dp-accounting`` (RDP and PLD): epsilon at a chosen delta.

Two levels, reported side by side:

* client (hospital / device) level, DP-FedAvg at the server: per round one Gaussian mechanism of
  multiplier ``z`` on the clipped sum, with the cohort drawn by
  - ``poisson`` sampling (each client joins with probability ``q``; ``q = 1`` is full cross-silo
    participation): ``PoissonSampledDpEvent(q, Gaussian(z))`` under add/remove-one-client, or
  - ``fixed``-size sampling without replacement (the engine's ``sample_cohort``):
    ``SampledWithoutReplacementDpEvent(N, m, Gaussian(z / 2))`` under replace-one-client, where
    replacing a client moves the sum by up to ``2C`` (RDP only: dp-accounting's PLD has no such event);
  - ``local`` DP: each client's own noised update, ``Gaussian(z / 2)`` per round it takes part
    (counted as every round: the server knows who took part, so there is no amplification);
* patient (example) level, DP-SGD inside each hospital: per local step
  ``PoissonSampledDpEvent(q, Gaussian(z))``, ``num_rounds * steps_per_round`` steps (counted as if
  the hospital took part every round, an upper bound when clients are sampled).

``calibrate_noise_multiplier`` finds the smallest ``z`` meeting a target epsilon for the planned
number of rounds (``dp_accounting.mechanism_calibration``) and raises when it cannot be met.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
  from dp_accounting import dp_event

ACCOUNTANTS = ("rdp", "pld")
CLIENT_SAMPLING = ("poisson", "fixed", "local")
MAX_NOISE_MULTIPLIER = 1e3


@functools.cache
def _lib() -> types.SimpleNamespace:
  """dp-accounting's modules, imported on first use: the package loads scipy (1-2 s), which a run
  without differential privacy (and ``import fedjax_health``) should not pay."""
  import dp_accounting
  from dp_accounting import dp_event as event, mechanism_calibration
  from dp_accounting.pld import pld_privacy_accountant
  from dp_accounting.rdp import rdp_privacy_accountant
  return types.SimpleNamespace(event=event, calibration=mechanism_calibration, pld=pld_privacy_accountant,
                               rdp=rdp_privacy_accountant, rel=dp_accounting.NeighboringRelation)


def check_delta(delta: float) -> float:
  """Returns ``delta`` if it lies in (0, 1), else raises ValueError."""
  if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
    raise ValueError(f"delta must be in (0, 1), got {delta!r}")
  return float(delta)


def _check_noise(z: float) -> float:
  if not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
    raise ValueError(f"noise_multiplier must be a finite number > 0, got {z!r}")
  return float(z)


def _check_rate(q: float, name: str = "sampling_rate") -> float:
  if not (isinstance(q, (int, float)) and 0.0 < q <= 1.0):
    raise ValueError(f"{name} must be in (0, 1], got {q!r}")
  return float(q)


def _poisson_gaussian(q: float, z: float) -> dp_event.DpEvent:
  ev = _lib().event
  g = ev.GaussianDpEvent(z)
  return g if q == 1.0 else ev.PoissonSampledDpEvent(q, g)


def client_level_event(noise_multiplier: float, num_rounds: int, sampling: str = "poisson",
                       sampling_rate: float = 1.0, population: int | None = None,
                       cohort_size: int | None = None) -> dp_event.DpEvent:
  """Returns the DpEvent of ``num_rounds`` rounds of client-level DP (see module docstring)."""
  z = _check_noise(noise_multiplier)
  if num_rounds < 0:
    raise ValueError(f"num_rounds must be >= 0, got {num_rounds}")
  if sampling == "poisson":
    one = _poisson_gaussian(_check_rate(sampling_rate), z)
  elif sampling == "fixed":
    if population is None or cohort_size is None or not 1 <= cohort_size <= population:
      raise ValueError(f"fixed-size sampling needs 1 <= cohort_size <= population, got "
                       f"cohort_size={cohort_size}, population={population}")
    one = _lib().event.SampledWithoutReplacementDpEvent(int(population), int(cohort_size),
                                                        _lib().event.GaussianDpEvent(z / 2.0))
  elif sampling == "local":
    one = _lib().event.GaussianDpEvent(z / 2.0)
  else:
    raise ValueError(f"sampling must be one of {CLIENT_SAMPLING}, got {sampling!r}")
  return _lib().event.SelfComposedDpEvent(one, int(num_rounds))


def patient_level_event(noise_multiplier: float, sampling_rate: float, num_steps: int) -> dp_event.DpEvent:
  """Returns the DpEvent of ``num_steps`` Poisson-sampled DP-SGD steps (Abadi et al. 2016)."""
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}")
  step = _poisson_gaussian(_check_rate(sampling_rate), _check_noise(noise_multiplier))
  return _lib().event.SelfComposedDpEvent(step, int(num_steps))


def _has_fixed_size_sampling(event: dp_event.DpEvent) -> bool:
  if isinstance(event, _lib().event.SampledWithoutReplacementDpEvent):
    return True
  if isinstance(event, _lib().event.SelfComposedDpEvent):
    return _has_fixed_size_sampling(event.event)
  if isinstance(event, _lib().event.ComposedDpEvent):
    return any(_has_fixed_size_sampling(e) for e in event.events)
  return False


def make_accountant(accountant: str, event: dp_event.DpEvent):
  """Returns a fresh dp-accounting accountant of kind ``accountant`` with the relation ``event`` needs."""
  relation = _lib().rel
  rel = relation.REPLACE_ONE if _has_fixed_size_sampling(event) else relation.ADD_OR_REMOVE_ONE
  if accountant == "rdp":
    return _lib().rdp.RdpAccountant(neighboring_relation=rel)
  if accountant == "pld":
    if rel is relation.REPLACE_ONE:
      raise ValueError("accountant 'pld' does not support fixed-size (without replacement) sampling; use 'rdp'")
    return _lib().pld.PLDAccountant(neighboring_relation=rel)
  raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def compute_epsilon(event: dp_event.DpEvent, delta: float, accountant: str = "rdp") -> float:
  """Returns epsilon at ``delta`` for ``event`` by the named dp-accounting accountant."""
  check_delta(delta)
  acc = make_accountant(accountant, event)
  if not acc.supports(event):
    raise ValueError(f"accountant {accountant!r} does not support the event {event}")
  return float(acc.compose(event).get_epsilon(delta))


def calibrate_noise_multiplier(make_event: Callable[[float], dp_event.DpEvent], target_epsilon: float,
                               delta: float, accountant: str = "rdp",
                               max_noise_multiplier: float = MAX_NOISE_MULTIPLIER, tol: float = 1e-3) -> float:
  """Returns the smallest noise multiplier (within ``tol``) whose event meets ``target_epsilon``.

  Raises ValueError when ``target_epsilon`` is not a finite number > 0, or cannot be met for the
  planned event even with ``max_noise_multiplier``.
  """
  check_delta(delta)
  if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
    raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")

  def eps(z):
    return compute_epsilon(make_event(z), delta, accountant)

  if eps(max_noise_multiplier) > target_epsilon:
    raise ValueError(f"target_epsilon={target_epsilon} at delta={delta} cannot be met for the planned rounds/steps "
                     f"even with noise_multiplier={max_noise_multiplier}: plan fewer rounds or steps, sample "
                     f"fewer clients/patients per round, or accept a larger epsilon")
  lo = 1e-2
  if eps(lo) <= target_epsilon:
    return lo
  z = _lib().calibration.calibrate_dp_mechanism(
      lambda: make_accountant(accountant, make_event(1.0)), make_event, target_epsilon, delta,
      _lib().calibration.ExplicitBracketInterval(lo, max_noise_multiplier), tol=tol)
  while eps(z) > target_epsilon:  # Brent's answer is within tol of the optimum; stay on the safe side.
    z += tol
  return float(z)


@dataclasses.dataclass(frozen=True)
class PrivacyLedger:
  """Epsilon of each DP level after a number of rounds, computed by dp-accounting and cached.

  ``client_event`` / ``patient_event``: ``rounds -> DpEvent``, or None when that level is off;
  ``client_noise`` / ``patient_noise``: False when the level clips without noise (epsilon = inf).
  """

  delta: float
  accountant: str = "rdp"
  client_event: Callable[[int], dp_event.DpEvent] | None = None
  patient_event: Callable[[int], dp_event.DpEvent] | None = None
  client_noise: bool = True
  patient_noise: bool = True

  def __post_init__(self):
    check_delta(self.delta)
    if self.accountant not in ACCOUNTANTS:
      raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")

  @functools.lru_cache(maxsize=None)
  def epsilons(self, rounds: int) -> dict:
    """Returns ``{'epsilon_client', 'epsilon_patient', 'epsilon', 'delta'}`` after ``rounds`` rounds.

    ``epsilon`` is the headline: the client-level value when that level is on, else the patient one.
    """
    out = {"delta": self.delta}
    for name, fn, noisy in (("client", self.client_event, self.client_noise),
                            ("patient", self.patient_event, self.patient_noise)):
      if fn is not None:
        out[f"epsilon_{name}"] = (compute_epsilon(fn(rounds), self.delta, self.accountant) if noisy
                                  else math.inf) if rounds > 0 else 0.0
    if "epsilon_client" in out:
      out["epsilon"] = out["epsilon_client"]
    elif "epsilon_patient" in out:
      out["epsilon"] = out["epsilon_patient"]
    return out
