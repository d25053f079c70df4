"""The ``ftl`` run mode: config validation and outputs in the workdir."""

import json
import os
import sys

import pytest

from fedjax_health import simulation
from fedjax_health.config_validation import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import heart_disease_ftl  # noqa: E402


@pytest.mark.parametrize("field,value,match", [
    ("protection", "rsa", "config.ftl.protection must be one of"),
    ("key_bits", 512, "config.ftl.key_bits must be >= 1024"),
    ("overlap", 0, "config.ftl.overlap must be >= 1"),
    ("features_b", "thalach,troponin", r"config.ftl.features_b names unknown columns \['troponin'\]"),
    ("alignment", "cosine", "config.ftl.alignment must be one of"),
])
def test_bad_config_names_the_field(field, value, match):
  config = heart_disease_ftl.get_config("smoke")
  config.ftl[field] = value
  simulation.plugins.load_plugins()
  with pytest.raises(ValueError, match=match):
    validate_config(config)


@pytest.mark.slow
def test_ftl_mode_under_paillier_writes_outputs(tmp_path):
  config = heart_disease_ftl.get_config("smoke")
  config.ftl.protection = "paillier"
  config.ftl.key_bits = 1024  # unit-test size; the config's default is 2048
  config.ftl.dim = 4
  config.ftl.epochs = 2
  summary = simulation.run(config, str(tmp_path), log=lambda s: None)
  assert set(summary["results"]) == {"ftl", "b_overlap_labels", "b_all_labels", "centralised"}
  assert summary["n_target"] == 254 and summary["overlap"] == 8
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["epoch"] for r in rows] == [1, 2]
  # Per epoch: A encrypts its d*d + N*d components, B decrypts A's masked gradient (P_A + 1 values).
  assert rows[1]["A_encryptions"] >= 16 + 8 * 4 and rows[1]["B_decryptions"] == 5 * 4 + 4 + 1
  assert rows[1]["A_bytes_sent"] > 0 and rows[1]["B_seconds"] > 0
  saved = json.load(open(tmp_path / "summary.json"))
  assert saved["costs_total"]["A"]["encryptions"] == 2 * rows[1]["A_encryptions"]
  assert os.path.exists(tmp_path / "config.json")
