"""Test setup: 8 host CPU devices so shard_map tests run without accelerators, and one persistent
XLA compilation cache per test session."""

import os
import shutil
import subprocess
import sys
import tempfile

# Must be set before jax is imported anywhere in the test session.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# XLA:CPU's MLIR fusion emitters take twice as long to compile as its older elemental emitter, and
# the suite is mostly compilation (85% of the 168 slowest tests' time, XLA's backend 62%). Measured
# (jax 0.10.2, idle 2-core CPU): three tests (test_lowrank, test_personalized, a config smoke run;
# -n 0) compiled in 12.7 s of XLA backend time instead of 25.4 s; no other XLA:CPU flag we tried
# (YNN/XNN fusions or XNNPACK off, codegen split, copy-insertion analysis) moved it by 10%. The whole
# suite (-n 2, 764 passed both times) ran in 717 s instead of 1,187 s (sum of test durations 1,383 s
# against 2,251 s). The flag changes code generation, not the program; set it in XLA_FLAGS to override.


def _xla_knows(flag: str) -> bool:
  """XLA aborts on an XLA_FLAGS entry its jaxlib does not know (one that dropped this flag would fail
  every test): a throwaway interpreter tries it first, ~1 s, once per session (xdist workers and
  launcher subprocesses inherit the flags this process sets)."""
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                        capture_output=True).returncode == 0


_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in _flags and _xla_knows(_EMITTER_FLAG):
  _flags += " " + _EMITTER_FLAG
os.environ["XLA_FLAGS"] = _flags.strip()

# Most of the suite's time is XLA compilation, and many tests build the same program from fresh
# closures (every simulation.run, every launcher subprocess): jax's in-memory caches miss, the
# persistent cache (keyed by the program's HLO) does not. One temporary directory per session,
# created by the first process that loads this file (the xdist controller, or the only process with
# -n 0), inherited through the environment by xdist workers and by the launcher subprocesses that
# tests start, and deleted at the end; never in the repository. A directory set from outside is used
# as it is and kept; JAX_COMPILATION_CACHE_DIR= (empty) turns the cache off. Measured (jax 0.10.2,
# CPU, -n 0): tests/test_checkpointing.py + test_launch.py's launcher tests took 76.5 s of CPU
# without the cache, 43.2 s with it. Entries compiled in under 0.2 s are not written.

# The suite's programs are small and run a few steps each, so XLA's backend optimisation (LLVM at
# -O2 and its expensive passes) costs more than it saves: jax's own switch turns it down for the test
# session (and, through the environment, for the launcher subprocesses). What is tested is the same
# program, compiled with fewer LLVM passes; every equivalence test compares two paths compiled
# alike. Measured (idle 2-core CPU, make test's -n 2, 764 passed both times): the whole suite ran in
# 1,187 s with it against 1,712 s without (sum of test durations 2,251 s against 3,264 s). Set
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test the optimised compile.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = None
if _CACHE_ENV not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="fedjax_health_test_xla_cache_")
  os.environ[_CACHE_ENV] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def require_host_devices():
  """``require(n)`` fails (never skips) a sharding test when fewer than ``n`` devices exist: a skip
  would let CI pass without testing shard_map. Only an XLA_FLAGS device count set outside can."""
  import jax

  def require(n: int) -> None:
    if jax.device_count() < n:
      pytest.fail(f"needs {n} devices, found {jax.device_count()}: XLA_FLAGS set "
                  f"--xla_force_host_platform_device_count below {n} before tests/conftest.py could")

  return require
