"""Round progress: a live bar on a terminal, plain log lines everywhere else.

``simulation.run(config, workdir, log)`` reports every round to a ``RoundProgress``. What it shows
depends on ``log``:

* ``Console(stream)`` whose stream is a terminal (``stream.isatty()``): one self-rewriting line per
  experiment with a bar, rounds done, the rate (rounds/s over the last ``RATE_WINDOW`` rounds, so
  that the first round's compilation soon stops counting), the ETA and the latest evaluated
  metrics; when the experiment ends the bar is replaced by the final log line. Other messages
  logged meanwhile are printed above the bar.
* anything else (``print``, ``Console`` over a file or pipe, ``list.append`` in tests): one line
  per evaluated round, ``[name] round   12/50 train_loss=... acc=... (round 31.0ms, total 1.2s)``,
  where ``round`` is the mean training time of the rounds since the previous line (evaluation
  excluded; the first line includes compilation) and ``total`` the time since the experiment
  started.

The launcher passes ``Console(sys.stdout)``, so a run in a terminal shows the bar and a run piped
to a file logs lines.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Callable, TextIO

import jax

BAR_WIDTH = 24
RATE_WINDOW = 10  # the rate is measured over the last rounds, so one-off compilations drop out
MIN_REDRAW_S = 0.1  # redraw the bar at most this often (a fast run would flood the terminal)


class Console:
  """A ``log`` callable that writes lines to ``stream`` and, on a terminal, draws progress bars."""

  def __init__(self, stream: TextIO | None = None):
    self.stream = stream if stream is not None else sys.stdout
    self._bar = ""  # the bar currently drawn on the last line ("" = none)

  @property
  def is_terminal(self) -> bool:
    isatty = getattr(self.stream, "isatty", None)
    return bool(isatty and isatty())

  def __call__(self, line: str) -> None:
    if self._bar:
      self.stream.write("\r\033[K")  # clear the bar, print the line above it, redraw the bar
    self.stream.write(line + "\n")
    if self._bar:
      self.stream.write(self._bar)
    self.stream.flush()

  def draw(self, bar: str) -> None:
    self.stream.write("\r\033[K" + bar)
    self.stream.flush()
    self._bar = bar

  def clear(self) -> None:
    if self._bar:
      self.stream.write("\r\033[K")
      self.stream.flush()
    self._bar = ""


def format_duration(seconds: float) -> str:
  """Returns ``seconds`` as ``m:ss`` or ``h:mm:ss``."""
  s = int(round(seconds))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_seconds(seconds: float) -> str:
  """Returns a short duration: ``12.3ms`` below a second, else ``4.56s``."""
  return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def format_metrics(row: dict) -> str:
  """Returns the headline metrics of an evaluated row, as the log line shows them."""
  parts = [f"train_loss={row['train_loss']:.4f}"] if "train_loss" in row else []
  for key, name in (("accuracy", "acc"), ("mean_client_accuracy", "mean_client_acc"),
                    ("worst_client_accuracy", "worst_client_acc"), ("auc", "auc"), ("asr", "asr"),
                    ("epsilon", "eps")):
    if isinstance(row.get(key), (int, float)):
      sd = row.get(f"{key}_sd")  # a mean over seeds (stacked_seeds.py) carries its sd
      parts.append(f"{name}={row[key]:.3f}" + (f"+-{sd:.3f}" if isinstance(sd, (int, float)) else ""))
  return " ".join(parts)


class RoundProgress:
  """Reports the rounds ``start+1..total`` of one experiment (see the module docstring).

  Call ``round_done(r, metrics)`` after dispatching round ``r`` (on a terminal it waits for the
  round, so the bar moves with the computation rather than with JAX's asynchronous dispatch),
  ``evaluated(r, row)`` with each evaluated row (before the next round), and ``close()`` at the end.
  """

  def __init__(self, name: str, total: int, start: int, log: Callable[[str], None],
               clock: Callable[[], float] = time.perf_counter):
    self.name, self.total, self.start = name, total, start
    self.log, self.clock = log, clock
    self.bar = isinstance(log, Console) and log.is_terminal
    now = clock()
    self.t0 = now  # experiment start (this process)
    self.t_mark, self.r_mark = now, start  # end of the previous logged interval
    self._done = collections.deque(maxlen=RATE_WINDOW + 1)  # (round, clock) when recent rounds finished
    self.t_drawn = -float("inf")
    self.latest = ""
    self.last_line = ""

  def _eta(self, r: int, now: float) -> tuple[float | None, float | None]:
    """Returns (rounds/s over the last RATE_WINDOW rounds, seconds left), None before two rounds."""
    if len(self._done) < 2 or self._done[-1][1] <= self._done[0][1]:
      return None, None
    (r0, t0), (r1, t1) = self._done[0], self._done[-1]
    rate = (r1 - r0) / (t1 - t0)
    return rate, (self.total - r) / rate

  def bar_text(self, r: int, now: float) -> str:
    """Returns the bar line for ``r`` rounds done at time ``now``."""
    done = r / self.total
    filled = int(done * BAR_WIDTH)
    rate, eta = self._eta(r, now)
    speed = f"{rate:.2f} rounds/s" if rate is not None and rate < 10 else (
        f"{rate:.0f} rounds/s" if rate is not None else "? rounds/s")
    eta_s = format_duration(eta) if eta is not None else "?"
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    return (f"[{self.name}] |{bar}| {r}/{self.total} {100 * done:3.0f}% {speed} "
            f"elapsed {format_duration(now - self.t0)} ETA {eta_s}" + (f" {self.latest}" if self.latest else ""))

  def round_done(self, r: int, metrics=None) -> None:
    if not self.bar:
      return
    jax.block_until_ready(metrics)
    now = self.clock()
    self._done.append((r, now))
    if now - self.t_drawn >= MIN_REDRAW_S or r == self.total:
      self.log.draw(self.bar_text(r, now))
      self.t_drawn = now

  def evaluated(self, r: int, row: dict, train_done: float | None = None,
                groups: list[tuple[str, dict]] | None = None) -> None:
    """Logs (or shows on the bar) evaluated row ``row`` of round ``r``.

    ``train_done``: the clock when round ``r``'s training had finished (before evaluation); the
    round time is measured up to it. Defaults to now. ``groups``: several rows of one program
    (``(label, row)``: a sweep's values), one log line each; the bar shows the first.
    """
    now = self.clock()
    end = train_done if train_done is not None else now
    per_round = (end - self.t_mark) / max(r - self.r_mark, 1)
    groups = groups or [("", row)]
    lines = [f"[{self.name}{' ' + label if label else ''}] round {r:4d}/{self.total} {format_metrics(g)} "
             f"(round {format_seconds(per_round)}, total {now - self.t0:.1f}s)" for label, g in groups]
    self.last_line = "\n".join(lines)
    self.t_mark, self.r_mark = now, r  # the next interval starts after this evaluation
    label, first = groups[0]
    self.latest = (f"{label}: " if label and len(groups) > 1 else "") + format_metrics(first)
    if self.bar:
      self.log.draw(self.bar_text(r, now))
      self.t_drawn = now
    else:
      for line in lines:
        self.log(line)

  def close(self) -> None:
    if self.bar:
      self.log.clear()
      for line in self.last_line.split("\n") if self.last_line else ():
        self.log(line)
