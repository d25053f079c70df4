"""End to end: every config's smoke variant runs and writes its outputs."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fedjax_health import simulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIGS = [c for c in CONFIGS if not os.path.basename(c).startswith("_")]


def _load(path, arg="smoke"):
  sys.path.insert(0, ROOT)
  try:
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)
  finally:
    sys.path.remove(ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(c) for c in CONFIGS])
def test_every_config_smoke_runs(path, tmp_path):
  config = _load(path)
  summary = simulation.run(config, str(tmp_path), log=lambda s: None)
  assert summary
  for name in ("config.json", "summary.json"):
    assert os.path.exists(tmp_path / name), name


def test_launcher_writes_outputs(tmp_path):
  cmd = [sys.executable, "-m", "launch.main", "--config=configs/heart_disease_fedavg.py:smoke",
         f"--workdir={tmp_path}", "--config.num_rounds=3"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "round    3/3" in out.stdout
  assert "client training path: plain" in out.stdout  # logistic regression on 13 features: dense
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["round"] for r in rows] == [1, 2, 3]
  for key in ("accuracy", "mean_client_accuracy", "worst_client_accuracy", "auc", "train_loss"):
    assert key in rows[-1]
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["experiments"]["fedavg"]["accuracy"] == rows[-1]["accuracy"]
  assert json.load(open(tmp_path / "config.json"))["num_rounds"] == 3
  assert os.path.getsize(tmp_path / "learning_curves.png") > 1000


def test_launcher_bad_flag_fails_with_field_name(tmp_path):
  cmd = [sys.executable, "-m", "launch.main", "--config=configs/heart_disease_fedavg.py:smoke",
         f"--workdir={tmp_path}", "--config.cohort_size=9"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "config.cohort_size must be <= the number of clients (4)" in out.stderr


def test_same_seed_same_metrics(tmp_path):
  config = _load(os.path.join(ROOT, "configs", "heart_disease_fedavg.py"))
  a = simulation.run(config, str(tmp_path / "a"), log=lambda s: None)
  b = simulation.run(config, str(tmp_path / "b"), log=lambda s: None)
  assert a["experiments"] == b["experiments"]
