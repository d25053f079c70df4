"""dp_fedavg end to end: configs run, reported epsilon equals dp-accounting, bad configs fail early."""

import importlib
import json
import math
import os
import sys

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_health import plugins, simulation
from fedjax_health.config_validation import validate_config
from fedjax_health.data import heart_disease
from fedjax_health.privacy import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
CONFIGS = ["heart_disease_dp", "heart_disease_dp_patient", "heart_disease_dp_secagg", "breastmnist_dp_patient",
           "breastmnist_dp_clinics"]


def _config(name, arg="smoke"):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_configs_run_and_report_epsilon_every_evaluated_round(name, tmp_path):
  cfg = _config(name)
  simulation.run(cfg, str(tmp_path), log=lambda s: None)
  rows = _rows(tmp_path)
  assert len(rows) == cfg.num_rounds // cfg.eval_every
  eps = [r["epsilon"] for r in rows]
  assert all(0 < e < math.inf for e in eps) and eps == sorted(eps)
  target = cfg.privacy.client.target_epsilon if cfg.privacy.client.mechanism != "none" else cfg.privacy.patient.target_epsilon
  assert eps[-1] <= target + 1e-9  # calibrated for the planned rounds


def _rdp_eps(event, delta):
  return rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(delta)


@pytest.mark.slow
def test_reported_epsilons_equal_direct_dp_accounting(tmp_path):
  cfg = _config("heart_disease_dp")
  cfg.privacy.patient.enabled = True
  cfg.privacy.patient.sampling_rate = 0.2
  cfg.privacy.patient.target_epsilon = 0.0
  cfg.privacy.patient.noise_multiplier = 1.3
  cfg.privacy.client.sampling_rate = 0.5
  cfg.client.num_steps = 3
  cfg.num_rounds = 3
  simulation.run(cfg, str(tmp_path), log=lambda s: None)
  rows = _rows(tmp_path)
  z = rows[0]["noise_multiplier_client"]
  for r in rows:
    client = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(z)), r["round"])
    patient = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(0.2, dp_event.GaussianDpEvent(1.3)),
                                           3 * r["round"])
    assert r["epsilon_client"] == _rdp_eps(client, 1e-5)
    assert r["epsilon_patient"] == _rdp_eps(patient, 1e-5)
  assert rows[-1]["epsilon_client"] <= 8.0
  assert rows[-1]["num_participating"] <= 4


def test_epsilon_inf_clips_without_noise_and_reports_inf():
  cfg = _config("heart_disease_dp")
  cfg.privacy.client.target_epsilon = math.inf
  data = heart_disease.load()
  parts = experiment.build_privacy(cfg, data)
  assert parts["client_noise"] is None and parts["ledger"].epsilons(2)["epsilon"] == math.inf


def _bad(name="heart_disease_dp", **fields):
  cfg = _config(name)
  for path, value in fields.items():
    node = cfg
    *head, last = path.split("__")
    for h in head:
      node = node[h]
    node[last] = value
  return cfg


@pytest.mark.parametrize("fields,match", [
    (dict(privacy__delta=0.0), "privacy.delta"),
    (dict(privacy__delta=1.0), "privacy.delta"),
    (dict(privacy__client__clip_norm=0.0), "privacy.client.clip_norm"),
    (dict(privacy__client__target_epsilon=0.0, privacy__client__noise_multiplier=0.0), "privacy.client.noise_multiplier"),
    (dict(privacy__client__target_epsilon=-1.0), "privacy.client.target_epsilon"),
    (dict(privacy__client__mechanism="magic"), "privacy.client.mechanism"),
    (dict(privacy__client__mechanism="distributed"), "privacy.secagg.enabled"),
    (dict(privacy__secagg__enabled=True, privacy__secagg__num_neighbors=4, privacy__secagg__threshold=2),
     "privacy.secagg.threshold"),
    (dict(privacy__secagg__enabled=True, privacy__secagg__dropout_rate=1.0), "privacy.secagg.dropout_rate"),
    (dict(cohort_size=2), "cohort_size"),
])
def test_bad_privacy_config_fails_validation_naming_the_field(fields, match):
  plugins.load_plugins()
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    validate_config(_bad(**fields))


def test_unreachable_target_epsilon_fails_before_training():
  cfg = _config("heart_disease_dp")
  cfg.privacy.client.target_epsilon = 1e-4
  cfg.num_rounds = 500
  with pytest.raises(ValueError, match="cannot be met"):
    experiment.build_privacy(cfg, heart_disease.load())


def test_secagg_neighbours_checked_against_the_cohort():
  plugins.load_plugins()
  cfg = _config("heart_disease_dp_secagg")
  cfg.privacy.secagg.num_neighbors = 4
  cfg.privacy.secagg.threshold = 3
  with pytest.raises(ValueError, match="privacy.secagg.num_neighbors"):
    validate_config(cfg, heart_disease.load())
