"""Checkpoint/resume: a run SIGKILLed mid-way resumes to a bitwise-identical end state."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedjax_health import checkpointing, simulation
from fedjax_health.config_base import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(num_rounds=6):
  config = base_config()
  config.num_rounds = num_rounds
  config.client.num_steps = 3
  config.checkpoint_every = 2
  return config


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in f]


def _params(workdir):
  with np.load(os.path.join(workdir, "final_params_fedavg.npz")) as f:
    return {k: f[k] for k in f.files}


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  simulation.run(_config(), full, log=lambda s: None)
  script = textwrap.dedent(f"""
      import os, signal
      from fedjax_health import simulation
      from tests.test_checkpointing import _config
      def log(line):
        if "round    5/" in line:  # round 4 is checkpointed, round 5 is not
          os.kill(os.getpid(), signal.SIGKILL)
      simulation.run(_config(), {killed!r}, log=log)
  """)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == -9, out.stderr[-2000:]
  assert not os.path.exists(os.path.join(killed, "summary.json"))
  lines = []
  simulation.run(_config(), killed, log=lines.append)
  assert any("resumed from the checkpoint of round 4" in l for l in lines)
  a, b = _params(full), _params(killed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert _rows(full) == _rows(killed)


def test_mismatched_config_is_refused_and_nothing_overwritten(tmp_path):
  workdir = str(tmp_path)
  simulation.run(_config(num_rounds=2), workdir, log=lambda s: None)
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  config = _config(num_rounds=4)
  config.client.learning_rate = 0.5
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"fields differ: \['client'\]"):
    simulation.run(config, workdir, log=lambda s: None)
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def _truncate_data_files(step_dir):
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      if os.path.basename(root) == "d":  # tensorstore data files (the arrays), not the metadata
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
  workdir = str(tmp_path)
  simulation.run(_config(num_rounds=4), workdir, log=lambda s: None)  # keeps the checkpoints of rounds 2, 4
  _truncate_data_files(os.path.join(workdir, "checkpoints", "fedavg", "4"))
  lines = []
  simulation.run(_config(num_rounds=6), workdir, log=lines.append)
  warning = [l for l in lines if "corrupt" in l]
  assert warning and "round 4" in warning[0] and "falling back to the checkpoint of round 2" in warning[0], lines
  assert len(warning[0]) < 600  # one line, not pages of tensorstore text
  assert any("resumed from the checkpoint of round 2" in l for l in lines)
  assert [r["round"] for r in _rows(workdir)] == [1, 2, 3, 4, 5, 6]  # rounds 3-4 recomputed, not rewritten


def test_every_checkpoint_corrupt_is_named(tmp_path):
  workdir = str(tmp_path)
  simulation.run(_config(num_rounds=2), workdir, log=lambda s: None)
  step_dir = os.path.join(workdir, "checkpoints", "fedavg", "2")
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpointing.CheckpointCorruptError, match=r"checkpoint of round 2 .* is corrupt") as e:
    simulation.run(_config(num_rounds=4), workdir, log=lambda s: None)
  assert len(str(e.value)) < 800


def test_mismatched_state_is_not_called_corrupt(tmp_path):
  import jax.numpy as jnp
  ckpt = checkpointing.Checkpointer(str(tmp_path / "c"))
  ckpt.save(1, {"w": jnp.zeros(3)})
  with pytest.raises(checkpointing.CheckpointMismatchError, match="does not match this run's state"):
    ckpt.restore(1, {"w": jnp.zeros(4)})
  ckpt.close()


def test_resume_false_starts_over(tmp_path):
  workdir = str(tmp_path)
  simulation.run(_config(num_rounds=2), workdir, log=lambda s: None)
  config = _config(num_rounds=2)
  config.resume = False
  config.client.learning_rate = 0.5  # allowed: we are starting over and deleting the earlier outputs
  config.overwrite = True
  lines = []
  simulation.run(config, workdir, log=lines.append)
  assert not any("resumed" in l for l in lines)
  assert [r["round"] for r in _rows(workdir)] == [1, 2]
