"""Whether a hyperparameter is a traced value (a sweep in one compiled program) or a Python number.

Builders check their numeric arguments (``learning_rate > 0``, ...) when they are numbers. A sweep
(``fedjax_health/sweep.py``) rebuilds the round with some of them as traced scalars, one per member
of the vmapped program; their values were checked on the host, member by member, before tracing.
"""

from __future__ import annotations

import jax


def is_traced(x) -> bool:
  """True for a JAX tracer (a value only known when the compiled program runs)."""
  return isinstance(x, jax.core.Tracer)


def as_number(x):
  """``x`` as it is when traced (a sweep's member), else as a Python float."""
  return x if is_traced(x) else float(x)
