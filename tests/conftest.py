"""Test setup: 8 host CPU devices so shard_map tests run without accelerators."""

import os

# Must be set before jax is imported anywhere in the test session.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()


import pytest  # noqa: E402


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
