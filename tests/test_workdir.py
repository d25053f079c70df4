"""Workdir: another config's outputs are refused (or deleted with overwrite); a cut metrics line is recovered."""

import json
import os

import pytest

from fedjax_health import simulation, workdir
from fedjax_health.config_base import base_config


def _write_config(path, config):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())


def test_prepare_refuses_other_config_allows_resumable_changes_and_overwrites(tmp_path):
  wd = str(tmp_path)
  _write_config(wd, base_config())
  (tmp_path / "metrics.jsonl").write_text("{}\n")
  (tmp_path / "checkpoints").mkdir()
  same = base_config()
  same.num_rounds, same.eval_every, same.on_divergence = 99, 3, "warn"  # fields a resume may change
  workdir.prepare(wd, same)
  other = base_config()
  other.server.learning_rate = 0.5
  other.dataset.alpha = 0.1
  with pytest.raises(workdir.WorkdirConfigError, match=r"fields differ: \['dataset', 'server'\]"):
    workdir.prepare(wd, other)
  assert sorted(os.listdir(wd)) == ["checkpoints", "config.json", "metrics.jsonl"]
  other.overwrite = True
  workdir.prepare(wd, other)
  assert os.listdir(wd) == []
  workdir.prepare(str(tmp_path / "new"), other)  # a fresh workdir is fine


def test_read_metrics_drops_a_cut_last_line_only(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  rows = [{"experiment": "fedavg", "round": r, "accuracy": 0.5} for r in (1, 2)]
  full = "".join(json.dumps(r) + "\n" for r in rows)
  with open(path, "w") as f:
    f.write(full + json.dumps({"experiment": "fedavg", "round": 3})[:17])
  logs = []
  assert workdir.read_metrics(path, logs.append) == rows
  assert open(path).read() == full  # the partial line is gone, so appending stays valid JSONL
  assert "incomplete last line 3" in logs[0]
  with open(path, "w") as f:
    f.write(full[:20] + "\n" + full)
  with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON metrics row"):
    workdir.read_metrics(path)


def test_resume_after_a_cut_metrics_line_recomputes_that_round(tmp_path):
  config = base_config()
  config.num_rounds, config.client.num_steps, config.checkpoint_every = 3, 2, 1
  wd = str(tmp_path)
  simulation.run(config, wd, log=lambda s: None)
  path = os.path.join(wd, "metrics.jsonl")
  lines = open(path).read().splitlines(keepends=True)
  # A kill while writing round 3's row: the row is cut and round 3's checkpoint was never saved.
  with open(path, "w") as f:
    f.write("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
  import shutil
  shutil.rmtree(os.path.join(wd, "checkpoints", "fedavg", "3"))
  logs = []
  simulation.run(config, wd, log=logs.append)
  assert any("resumed from the checkpoint of round 2" in l for l in logs)
  new = [json.loads(l) for l in open(path)]
  assert [r["round"] for r in new] == [1, 2, 3]
  old3 = json.loads(lines[2])
  assert {k: v for k, v in new[2].items() if k != "time_s"} == {k: v for k, v in old3.items() if k != "time_s"}
