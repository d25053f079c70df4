"""README performance tables, rendered from the committed benchmark JSON (``experiments/report.py``).

``docs/perf_compare.json`` comes from ``python -m benchmarks.compare``; ``docs/perf_scale.json``
from ``python -m benchmarks.scale``. Nothing here measures anything.
"""

from __future__ import annotations

import json
import os

from experiments import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = os.path.join(ROOT, "docs", "perf_compare.json")
SCALE = os.path.join(ROOT, "docs", "perf_scale.json")
# Workload definitions (benchmarks/baselines/workloads.py), not measurements.
WORKLOADS = {"w1": "W1: 1000 clients x 20 ex., batch 10, MLP 784-200-10",
             "cnn": "CNN: 20 clients x 5 steps of 10, EMNIST CNN 28x28"}
COLUMNS = [("ours_dense_path", "ours, dense path"), ("centralised", "centralised limit"),
           ("python_loop", "Python loop over jitted clients"), ("fedjax", "FedJAX 0.0.17"),
           ("flower", "Flower 1.42 (Ray)")]


def _ms(s: float) -> str:
  return f"{s * 1000:,.0f} ms"


def render_compare() -> str:
  with open(COMPARE) as f:
    d = json.load(f)
  lines = ["| workload | ours | " + " | ".join(label for _, label in COLUMNS) + " |",
           "|---|" + "---:|" * (len(COLUMNS) + 1)]
  for key, w in d["workloads"].items():
    t = w["round_s"]
    ours = f"**{_ms(t['ours'])}**"
    if key == "w1":
      ours += f" ({t['ours'] / t['centralised']:.2f}x the limit)"
    cells = [WORKLOADS.get(key, key), ours]
    for col, _ in COLUMNS:
      if col not in t:
        cells.append("-")
        continue
      cell = _ms(t[col])
      if col in ("python_loop", "fedjax", "flower"):
        cell += f" ({t[col] / t['ours']:.{0 if t[col] / t['ours'] >= 100 else 1}f}x slower)"
      cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
  p = d["peaks"]
  lines += ["", f"Machine peaks measured in the same run: {p['matmul_gflops']:.0f} GFLOP/s (2048^2 f32 GEMM), "
            f"{p['memcopy_gbs']:.1f} GB/s (memory copy); machine: {d['machine']}."]
  return "\n".join(lines)


def render_scale() -> str:
  with open(SCALE) as f:
    rows = json.load(f)
  by = {(r["workload"], r["cohort"]): r for r in rows}
  cohorts = sorted({r["cohort"] for r in rows})
  lines = ["| cohort | W1 round (low-rank) | W1 round (dense path) | W1 peak RSS (data) | Synthetic round | "
           "Synthetic peak RSS (data) |", "|---:|---:|---:|---:|---:|---:|"]

  def rt(w, c):
    r = by.get((w, c))
    return "-" if r is None else (f"{r['round_s'] * 1000:,.1f} ms" if r["round_s"] < 0.1 else _ms(r["round_s"]))

  def mem(w, c):
    r = by.get((w, c))
    return "-" if r is None else f"{r['peak_rss_mb']:,.0f} MB ({r['data_mb']:,.0f} MB)"

  for c in cohorts:
    lines.append(f"| {c:,} | {rt('w1', c)} | {rt('w1_dense', c)} | {mem('w1', c)} | {rt('synthetic', c)} | "
                 f"{mem('synthetic', c)} |")
  return "\n".join(lines)


report.register("perf_compare", render_compare, sources=(COMPARE,))
report.register("perf_scale", render_scale, sources=(SCALE,))
