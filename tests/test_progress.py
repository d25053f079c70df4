"""Progress: a bar with rate, ETA and metrics on a terminal; plain lines with round and total time otherwise."""

import io
import re

import jax.numpy as jnp
import ml_collections

from fedjax_health import progress, simulation


class FakeTTY(io.StringIO):

  def isatty(self):
    return True


class FakeClock:

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


ROW = {"train_loss": 0.51234, "accuracy": 0.75, "mean_client_accuracy": 0.7, "worst_client_accuracy": 0.5}


def test_plain_lines_give_round_time_and_total():
  lines, clock = [], FakeClock()
  p = progress.RoundProgress("fedavg", 10, 0, lines.append, clock)
  assert not p.bar
  for r in (1, 2, 3, 4):
    clock.t += 2.0 if r == 1 else 0.25  # round 1 compiles
    p.round_done(r)
    if r % 2 == 0:
      train_done = clock.t
      clock.t += 1.0  # evaluation: not part of the round time
      p.evaluated(r, ROW, train_done)
  p.close()
  assert lines == [
      "[fedavg] round    2/10 train_loss=0.5123 acc=0.750 mean_client_acc=0.700 worst_client_acc=0.500 "
      "(round 1.12s, total 3.2s)",  # (2.0 + 0.25) / 2 rounds
      "[fedavg] round    4/10 train_loss=0.5123 acc=0.750 mean_client_acc=0.700 worst_client_acc=0.500 "
      "(round 250.0ms, total 4.8s)",  # after the evaluation of round 2: 2 x 0.25 s
  ]


def test_bar_on_terminal_shows_rate_eta_and_latest_metrics():
  stream, clock = FakeTTY(), FakeClock()
  console = progress.Console(stream)
  p = progress.RoundProgress("fedavg", 10, 0, console, clock)
  assert p.bar
  clock.t += 5.0
  p.round_done(1, jnp.zeros(()))  # compilation: no rate yet
  assert stream.getvalue().endswith("[fedavg] |##----------------------| 1/10  10% ? rounds/s elapsed 0:05 ETA ?")
  for r in (2, 3, 4, 5):
    clock.t += 0.5
    p.round_done(r, jnp.zeros(()))
  p.evaluated(5, ROW, clock.t)
  # 4 rounds in 2 s after the first: 2 rounds/s, 5 rounds left -> 2.5 s.
  assert stream.getvalue().endswith(
      "[fedavg] |############------------| 5/10  50% 2.00 rounds/s elapsed 0:07 ETA 0:02 "
      "train_loss=0.5123 acc=0.750 mean_client_acc=0.700 worst_client_acc=0.500")
  console("a message")  # printed above the bar, which is redrawn
  assert stream.getvalue().endswith("\r\033[Ka message\n[fedavg] |############------------| 5/10  50% "
                                    "2.00 rounds/s elapsed 0:07 ETA 0:02 train_loss=0.5123 acc=0.750 "
                                    "mean_client_acc=0.700 worst_client_acc=0.500")
  p.close()  # the bar gives way to the final log line
  assert stream.getvalue().endswith("\r\033[K[fedavg] round    5/10 train_loss=0.5123 acc=0.750 "
                                    "mean_client_acc=0.700 worst_client_acc=0.500 (round 1.40s, total 7.0s)\n")


def test_groups_of_one_program_log_a_line_each_with_their_sd():
  lines, clock = [], FakeClock()
  p = progress.RoundProgress("fedavg", 4, 0, lines.append, clock)
  clock.t += 2.0
  p.round_done(1)
  groups = [("lr=0.1, mean of 2 seeds", {**ROW, "accuracy_sd": 0.05}), ("lr=1, mean of 2 seeds", {"accuracy": 0.5})]
  p.evaluated(1, groups[0][1], clock.t, groups=groups)
  assert lines == [
      "[fedavg lr=0.1, mean of 2 seeds] round    1/4 train_loss=0.5123 acc=0.750+-0.050 mean_client_acc=0.700 "
      "worst_client_acc=0.500 (round 2.00s, total 2.0s)",
      "[fedavg lr=1, mean of 2 seeds] round    1/4 acc=0.500 (round 2.00s, total 2.0s)"]
  stream = FakeTTY()
  q = progress.RoundProgress("fedavg", 4, 0, progress.Console(stream), clock)
  q.round_done(1, jnp.zeros(()))
  q.evaluated(1, groups[0][1], clock.t, groups=groups)
  assert stream.getvalue().endswith("lr=0.1, mean of 2 seeds: train_loss=0.5123 acc=0.750+-0.050 "
                                    "mean_client_acc=0.700 worst_client_acc=0.500")
  q.close()  # every group's final line replaces the bar
  assert stream.getvalue().endswith("[fedavg lr=1, mean of 2 seeds] round    1/4 acc=0.500 (round 0.0ms, total 0.0s)\n")


def test_rate_forgets_compilation_after_the_window():
  stream, clock = FakeTTY(), FakeClock()
  p = progress.RoundProgress("x", 100, 0, progress.Console(stream), clock)
  clock.t += 30.0  # round 1 compiles
  p.round_done(1)
  clock.t += 20.0  # round 1's evaluation compiles too
  for r in range(2, progress.RATE_WINDOW + 3):
    p.round_done(r)
    clock.t += 0.25
  assert p._eta(r, clock.t)[0] == 4.0  # the window holds only 0.25 s rounds now


def test_redraws_are_throttled():
  stream, clock = FakeTTY(), FakeClock()
  p = progress.RoundProgress("x", 1000, 0, progress.Console(stream), clock)
  for r in range(1, 1001):
    clock.t += 0.001
    p.round_done(r)
  assert stream.getvalue().count("\r") <= 1000 * 0.001 / progress.MIN_REDRAW_S + 2
  assert stream.getvalue().endswith("1000/1000 100% 1000 rounds/s elapsed 0:01 ETA 0:00")


def _experiment():
  return simulation.Experiment(
      "toy", init_state=jnp.zeros(()), round_fn=lambda s, t, k: (s + 1, {"train_loss": s / 10}), train={},
      evaluate=lambda s: {"accuracy": float(s) / 4, "mean_client_accuracy": 0.5, "worst_client_accuracy": 0.25},
      params_of=lambda s: {"s": s})


def _config():
  c = ml_collections.ConfigDict()
  c.num_rounds, c.eval_every, c.seed, c.checkpoint_every, c.resume = 4, 2, 0, 0, False
  return c


def test_simulation_loop_logs_lines_when_not_a_terminal():
  stream, rows = io.StringIO(), []
  simulation.run_experiment(_experiment(), _config(), progress.Console(stream), rows.append)
  lines = stream.getvalue().splitlines()
  assert len(lines) == 2 and "\r" not in stream.getvalue()
  assert re.fullmatch(r"\[toy\] round    2/4 train_loss=0\.1000 acc=0\.500 mean_client_acc=0\.500 "
                      r"worst_client_acc=0\.250 \(round [0-9.]+m?s, total [0-9.]+s\)", lines[0]), lines[0]
  assert lines[1].startswith("[toy] round    4/4 train_loss=0.3000 acc=1.000")
  assert [r["round"] for r in rows] == [2, 4]


def test_simulation_loop_draws_a_bar_on_a_terminal():
  stream, rows = FakeTTY(), []
  simulation.run_experiment(_experiment(), _config(), progress.Console(stream), rows.append)
  out = stream.getvalue()
  assert "[toy] |########################| 4/4 100%" in out
  assert "acc=0.500" in out.split("4/4 100%")[0]  # round 2's metrics were shown on the bar
  assert out.endswith("\n") and out.split("\r")[-1].startswith("\033[K[toy] round    4/4 train_loss=0.3000")
  assert [r["round"] for r in rows] == [2, 4]
