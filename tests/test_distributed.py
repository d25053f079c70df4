"""Two processes on localhost (jax.distributed, gloo) end with the single-process model."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/heart_disease_fedavg.py:smoke", "--config.num_rounds=3"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").split()  # one CPU device per process; conftest's other flags kept
  env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
  return env


def _params(workdir):
  with np.load(os.path.join(workdir, "final_params_fedavg.npz")) as f:
    return {k: f[k] for k in f.files}


def _run_single(workdir, *extra):
  out = subprocess.run([sys.executable, "-m", "launch.main", *ARGS, f"--workdir={workdir}", *extra], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]


def _run_two(workdir, *extra):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "launch.main", *ARGS, f"--workdir={workdir}", *extra,
                             "--num_processes=2", f"--process_id={i}", f"--coordinator_address=localhost:{port}"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (so, se) in zip(procs, outs):
    assert p.returncode == 0, se[-3000:]
  return outs[0][0]


def _assert_close(a, b):
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_processes_equal_single_process_also_after_resume(tmp_path):
  """Three rounds on two processes end with the single-process model. Then rounds 1-2 with
  checkpoints (process 0 saves) and a restart to round 3 from the checkpoint of round 1 (round 2's
  deleted, as if killed mid-save): equals the same 3 uninterrupted rounds. One test, so that the
  single-process reference runs once whichever xdist worker gets it."""
  single, multi, resumed = str(tmp_path / "single"), str(tmp_path / "multi"), str(tmp_path / "resumed")
  _run_single(single)
  expected = _params(single)
  assert "devices=2" in _run_two(multi)  # the chief saw both processes' devices
  _assert_close(expected, _params(multi))

  _run_two(resumed, "--config.num_rounds=2", "--config.checkpoint_every=1")
  ckpts = os.path.join(resumed, "checkpoints", "fedavg")
  assert sorted(os.listdir(ckpts)) == ["1", "2"]
  shutil.rmtree(os.path.join(ckpts, "2"))
  log = _run_two(resumed, "--config.checkpoint_every=1")
  assert "resumed from the checkpoint of round 1" in log
  _assert_close(expected, _params(resumed))


def test_bad_process_flags_are_named():
  out = subprocess.run([sys.executable, "-m", "launch.main", *ARGS, "--workdir=/tmp/unused",
                        "--num_processes=2", "--process_id=5", "--coordinator_address=localhost:1"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "--process_id must be in [0, 2)" in out.stderr
