"""README performance tables, rendered from the committed benchmark JSON (``experiments/report.py``).

``docs/perf_compare.json`` comes from ``python -m benchmarks.compare``; ``docs/perf_scale.json``
from ``python -m benchmarks.scale``; ``docs/perf_skew.json`` from ``python -m benchmarks.skew``;
``docs/perf_small_gemm.json`` from ``python -m benchmarks.small_gemm``; ``docs/perf_host_threads.json``
from ``python -m benchmarks.host_threads``.
Nothing here measures anything.
"""

from __future__ import annotations

import json
import os

from experiments import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = os.path.join(ROOT, "docs", "perf_compare.json")
SCALE = os.path.join(ROOT, "docs", "perf_scale.json")
SKEW = os.path.join(ROOT, "docs", "perf_skew.json")
SMALL_GEMM = os.path.join(ROOT, "docs", "perf_small_gemm.json")
HOST_THREADS = os.path.join(ROOT, "docs", "perf_host_threads.json")
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


def render_skew() -> str:
  """The skew sweep's table (ratios measured round-robin in one process)."""
  with open(SKEW) as f:
    rep = json.load(f)
  cpu = f" ({rep['cpu']})" if "cpu" in rep else ""
  lines = [f"Measured {rep['date']} on {rep['machine']}{cpu}, f32 GEMM peak {rep['gemm_peak_gflops']:.0f} "
           f"GFLOP/s; median of {rep['repeats']} rounds after warm-up; load average "
           f"{rep['load_min']:.1f}-{rep['load_max']:.1f} on {rep['machine'].split()[1]} cores, so compare ratios.",
           "",
           "| workload | sizes | clients | largest | real / padded steps | centralised (ms) | engine, default path "
           "(ms, x limit) | default path on host threads (x limit, speed-up vs loop) | default path, first layer per "
           "chunk (x limit) | default path, Gram per round "
           "(x limit) | default path, long clients step by step (x limit) | dense, own steps (x limit) | dense, pow2 "
           "buckets (x limit) | dense, padded plan (x limit) | Python loop (x limit) | speed-up vs loop | GFLOP/s "
           "(% of GEMM peak) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rep["points"]:
    ms = r["round_ms"]
    c = ms.get("centralised")
    best = "lowrank" if "lowrank" in ms else "dense"

    def x(k):
      return f"{ms[k] / c:.1f}x" if k in ms and c else "-"

    loop = f"{ms['python_loop'] / ms[best]:.1f}x" if "python_loop" in ms else "-"
    kind, v = r["skew"].split(":")
    sizes = "equal" if (kind == "lognormal" and float(v) == 0) else (
        f"lognormal σ={v}" if kind == "lognormal" else f"power law a={v}")
    path = r.get("paths", {}).get(best, best)
    host = x("host_threads")
    if "host_threads" in ms:
      host = f"{ms['host_threads'] / c:.2f}x on {r.get('host_threads', '?')}" + (
          f", {ms['python_loop'] / ms['host_threads']:.1f}x" if "python_loop" in ms else "")
    lines.append(f"| {r['workload']} | {sizes} | {r['cohort']:,} | {r['largest_client']} | "
                 f"{r['real_steps']:,} / {r['padded_steps'] * r['cohort']:,} | {c:,.0f} | "
                 f"{ms[best]:,.0f} ({x(best)}, {path}) | {host} | {x('lowrank_chunk_products')} | {x('lowrank_no_gram')} | "
                 f"{x('lowrank_step_by_step')} | {x('dense')} | "
                 f"{x('dense_static')} | {x('dense_padded')} | "
                 f"{x('python_loop')} | "
                 f"{loop} | {r['gflops'][best]:.1f} ({100 * r['fraction_of_gemm_peak'][best]:.0f}%) |")
  for r in rep["points"]:
    if "run" in r:  # a point added later by ``--append``, in its own process
      run = r["run"]
      lines += ["", f"The {r['workload']} point ({r['cohort']:,} clients) was measured apart: {run['date']}, commit "
                    f"{run['commit'][:7]}, `{run['command']}`, GEMM peak {run['gemm_peak_gflops']:.0f} GFLOP/s, "
                    f"median of {run['repeats']} rounds."]
  return "\n".join(lines)


def _sizes(skew: str) -> str:
  kind, v = skew.split(":")
  if kind == "lognormal":
    return "equal sizes" if float(v) == 0 else f"lognormal sigma {v}"
  return f"power law a={v}"


def render_skew_verdict() -> str:
  """One line per point: the issue's targets (within 2x of the limit; 5x faster than the loop)."""
  with open(SKEW) as f:
    rep = json.load(f)
  lines = []
  for r in rep["points"]:
    ms = r["round_ms"]
    if "centralised" not in ms:
      continue
    best = "lowrank" if "lowrank" in ms else "dense"
    x = ms[best] / ms["centralised"]
    target = 1.5 if r["skew"] == "lognormal:0" and r["workload"] == "mlp" else 2.0
    line = (f"- {r['workload']}, {r['cohort']:,} clients, {_sizes(r['skew'])}: default path {x:.2f}x the "
            f"limit (target <= {target}x: {'met' if x <= target else 'not met'})")
    if "dense" in ms and best != "dense":
      line += f"; dense path {ms['dense'] / ms['centralised']:.2f}x"
    if "python_loop" in ms:
      s = ms["python_loop"] / ms[best]
      than = f"{s:.1f}x faster than" if s >= 1 else f"{1 / s:.1f}x slower than"
      line += (f"; {than} the Python loop (target >= 5x faster: {'met' if s >= 5 else 'not met'}; the "
               f"loop itself is {ms['python_loop'] / ms['centralised']:.1f}x the limit here)")
    if "host_threads" in ms:
      h = ms["host_threads"] / ms["centralised"]
      line += (f"; on {r.get('host_threads', '?')} host threads (`config.host_threads`) {h:.2f}x the limit "
               f"({'met' if h <= target else 'not met'})")
      if "python_loop" in ms:
        s = ms["python_loop"] / ms["host_threads"]
        line += f", {s:.1f}x faster than the loop ({'met' if s >= 5 else 'not met'})"
    lines.append(line + ".")
  return "\n".join(lines)


def render_small_gemm() -> str:
  """The dense step's cost against its batch size (``benchmarks/small_gemm.py``)."""
  with open(SMALL_GEMM) as f:
    d = json.load(f)
  prov = d["provenance"]
  by = {(p["workload"], p["rows"]): p for p in d["points"]}
  rows = sorted({p["rows"] for p in d["points"]})
  lines = [f"Measured {prov['date']} on {prov['machine']} (commit {prov['commit']}, `{prov['command']}`), "
           f"f32 GEMM peak {d['gemm_peak_gflops']:.0f} GFLOP/s; median of {d['repeats']} calls of "
           f"{d['rows_per_call']:,} examples each, round-robin.", "",
           "| rows per step | first layer: µs per step | µs per 10 rows | GFLOP/s (% of peak) | MLP local step: "
           "µs per step | µs per 10 rows | GFLOP/s (% of peak) |", "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    cells = [f"{r:,}"]
    for w in ("layer1", "mlp_step"):
      p = by.get((w, r))
      cells += ["-"] * 3 if p is None else [f"{p['us_per_step']:,.0f}", f"{p['us_per_10_rows']:.1f}",
                                            f"{p['gflops']:.0f} ({100 * p['fraction_of_peak']:.0f}%)"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def render_host_threads() -> str:
  """One row per population of ``benchmarks.host_threads``: the round and two half rounds, x the limit."""
  with open(HOST_THREADS) as f:
    d = json.load(f)
  lines = ["| population | centralised (ms) | round (x limit) | two half rounds, one thread | two half rounds, "
           "two threads | small-op loop: once / twice, one thread / twice, two threads (ms) | measured |",
           "|---|---:|---:|---:|---:|---|---|"]
  for name, r in d["points"].items():
    x, loop = r["round_x_limit"], r["loop_ms"]
    lines.append(f"| {name.replace('/', ', ')} clients | {r['round_ms']['centralised']:,.0f} | {x['round']:.2f}x | "
                 f"{x['halves_one_thread']:.2f}x | **{x['halves_two_threads']:.2f}x** | {loop['one']:.0f} / "
                 f"{loop['two_one_thread']:.0f} / {loop['two_threads']:.0f} | {r['date']}, {r['commit']}, "
                 f"{r['cores']} cores, `{r['command']}` |")
  return "\n".join(lines) + "\n"


report.register("perf_host_threads", render_host_threads, sources=(HOST_THREADS,))
report.register("perf_skew", render_skew, sources=(SKEW,))
report.register("perf_small_gemm", render_small_gemm, sources=(SMALL_GEMM,))
report.register("perf_skew_verdict", render_skew_verdict, sources=(SKEW,))
report.register("perf_compare", render_compare, sources=(COMPARE,))
report.register("perf_scale", render_scale, sources=(SCALE,))
