"""TensorBoard event files of a run, written without TensorFlow (tensorboardX).

Every run writes under ``workdir/tb/``, one TensorBoard run (sub-folder) per experiment, so
``tensorboard --logdir WORKDIR/tb`` overlays the experiments of a run (e.g. the four ``local``
hospitals) and ``--logdir`` on a parent folder compares runs:

* scalars: every number of every ``metrics.jsonl`` row at its round (the same values, as float32);
  lists (``per_client_accuracy``, ...) as a histogram, plus one scalar per entry (``tag/i``) when
  they have at most ``MAX_LIST_SCALARS`` entries (cross-silo: one curve per hospital); nested
  dicts as ``outer/inner``;
* images: ``learning_curves.png``; for DP runs an epsilon-per-round figure (also written to
  ``epsilon_curve.png``); for the inversion mode the reconstruction grid;
* text: the final metrics of every experiment as a table (accuracy, ASR and detection rates for
  attack runs, epsilon for DP runs), and for inversion the attack summary.

``simulation.run_training`` and the inversion mode call this module; nothing here is needed by
the pure transforms.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from typing import Any, Iterable

import numpy as np

MAX_LIST_SCALARS = 32
SKIP_KEYS = ("experiment", "round")


def tb_dir(workdir: str) -> str:
  return os.path.join(workdir, "tb")


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def flatten_scalars(row: dict, prefix: str = "") -> tuple[dict[str, float], dict[str, list]]:
  """Returns ({tag: number}, {tag: list of numbers}) of a metrics row, nested dicts joined by ``/``."""
  scalars, lists = {}, {}
  for key, v in row.items():
    if not prefix and key in SKIP_KEYS:
      continue
    tag = f"{prefix}{key}"
    if isinstance(v, bool):
      scalars[tag] = float(v)
    elif _is_number(v):
      scalars[tag] = float(v)
    elif isinstance(v, dict):
      s, l = flatten_scalars(v, tag + "/")
      scalars.update(s)
      lists.update(l)
    elif isinstance(v, (list, tuple, np.ndarray)):
      flat = np.asarray(v, dtype=object).reshape(-1) if len(v) else np.zeros(0)
      if len(flat) and all(_is_number(x) or x is None for x in flat):
        lists[tag] = [float("nan") if x is None else float(x) for x in flat]
  return scalars, lists


class RunBoard:
  """Writes one TensorBoard run per experiment under ``workdir/tb``.

  ``metrics.jsonl`` is the record: the board starts empty (event files of an earlier run in the
  workdir are removed) and, on resume, is given the rows already in ``metrics.jsonl`` again
  (``replay``), so a run killed before its events were flushed loses nothing and repeats nothing.
  """

  def __init__(self, workdir: str, replay: Iterable[dict] = ()):
    self.root = tb_dir(workdir)
    if os.path.isdir(self.root):
      shutil.rmtree(self.root)
    os.makedirs(self.root, exist_ok=True)
    self._writers = {}
    for row in replay:
      self.write_row(row)

  def writer(self, run: str):
    if run not in self._writers:
      from tensorboardX import SummaryWriter  # imported here: the pure library never needs it
      logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)  # NaN (no ASR, ...) is meant
      self._writers[run] = SummaryWriter(os.path.join(self.root, run), flush_secs=10)
    return self._writers[run]

  def write_row(self, row: dict) -> None:
    """Writes the numbers of one ``metrics.jsonl`` row at step ``row["round"]``."""
    w = self.writer(row["experiment"])
    step = int(row["round"])
    scalars, lists = flatten_scalars(row)
    for tag, v in scalars.items():
      w.add_scalar(tag, v, step)
    for tag, values in lists.items():
      finite = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
      if finite.size:
        w.add_histogram(tag, finite, step)
      if len(values) <= MAX_LIST_SCALARS:
        for i, v in enumerate(values):
          w.add_scalar(f"{tag}/{i}", v, step)

  def image_file(self, run: str, tag: str, path: str, step: int = 0) -> None:
    """Adds the PNG at ``path`` as image ``tag`` of ``run``."""
    import matplotlib.image
    img = matplotlib.image.imread(path)  # float32 in [0, 1], HW, HWC (RGB or RGBA)
    if img.ndim == 2:
      img = img[..., None]
    self.writer(run).add_image(tag, img[..., :3] if img.shape[-1] == 4 else img, step, dataformats="HWC")

  def text(self, run: str, tag: str, markdown: str, step: int = 0) -> None:
    self.writer(run).add_text(tag, markdown, step)

  def close(self) -> None:
    for w in self._writers.values():
      w.close()
    self._writers = {}


def markdown_table(rows: dict[str, dict], keys: Iterable[str] | None = None) -> str:
  """Returns a markdown table, one line per name of ``rows`` and a column per numeric key."""
  if keys is None:
    keys = []
    for m in rows.values():
      keys += [k for k, v in m.items() if _is_number(v) and k not in keys]
  keys = list(keys)
  lines = ["| experiment | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, m in rows.items():
    cells = [f"{float(m[k]):.4g}" if _is_number(m.get(k)) else "-" for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_epsilon(rows: list[dict], path: str) -> bool:
  """Saves epsilon against round (every ``epsilon_*`` key, per experiment); returns False when none."""
  keys = sorted({k for r in rows for k in r if k.startswith("epsilon_") and _is_number(r[k])})
  pts = {(r["experiment"], k): [] for r in rows for k in keys}
  for r in rows:
    for k in keys:
      if _is_number(r.get(k)) and math.isfinite(r[k]):
        pts[(r["experiment"], k)].append((r["round"], r[k]))
  pts = {k: v for k, v in pts.items() if v}
  if not pts:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for (name, key), p in sorted(pts.items()):
    ax.plot(*zip(*p), label=f"{name} {key}", marker="." if len(p) < 30 else None)
  ax.set(xlabel="round", ylabel="epsilon", title=f"privacy spent (delta={rows[-1].get('delta', '?')})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def finish_training(board: RunBoard, rows: list[dict], summary: dict, workdir: str) -> None:
  """Adds the run's pictures and final table (module docstring), then closes the writers."""
  names = list(summary["experiments"])
  if names:
    last = max((r["round"] for r in rows), default=0)
    first = names[0]
    curves = os.path.join(workdir, "learning_curves.png")
    if os.path.exists(curves):
      board.image_file(first, "learning_curves", curves, last)
    eps_path = os.path.join(workdir, "epsilon_curve.png")
    if plot_epsilon(rows, eps_path):
      board.image_file(first, "epsilon_curve", eps_path, last)
    board.text(first, "final_metrics", markdown_table(summary["experiments"]), last)
  board.close()


def write_inversion(workdir: str, summary: dict, grid_path: str | None) -> None:
  """Writes an inversion run's numbers, per-feature errors and reconstruction grid to ``workdir/tb``."""
  board = RunBoard(workdir)
  w = board.writer("inversion")
  scalars, _ = flatten_scalars(summary)
  for tag, v in scalars.items():
    w.add_scalar(tag, v, 0)
  board.text("inversion", "summary", markdown_table({summary.get("attack", "attack"): summary}))
  for key in ("per_feature_mae", "per_feature_mae_raw"):
    if isinstance(summary.get(key), dict):
      board.text("inversion", key, markdown_table({key: summary[key]}))
  if grid_path is not None and os.path.exists(grid_path):
    board.image_file("inversion", "reconstructions", grid_path)
  board.close()
