"""Party B's AUC / accuracy with federated transfer learning vs. baselines (docs/transfer.md).

For overlaps of 10 to 486 shared patients (all of party A's) and seeds 0-4, trains plaintext FTL
(the protected variants equal it to the fixed-point precision: tests/transfer/test_protection.py)
and the baselines (1) B's features + the overlap's labels, (3) B's features + every label,
(4) all features + every label (the last two do not depend on the overlap: once per seed), all
scored on B's 254 non-overlapping patients. Rows go to docs/ftl_results.json (finished runs are
skipped on a rerun); ``experiments/report.py`` renders the tables and findings of docs/transfer.md
and the README sentence from it and from docs/ftl_costs.json (``benchmarks/ftl_costs.py``); the
plot goes to docs/img/ftl_auc_vs_overlap.png. ~10 min on a shared 2-core CPU.

  nice -n 19 python experiments/ftl.py                                  # main split, 6 overlaps
  nice -n 19 python experiments/ftl.py --split=b_has_age_sex --overlaps=10,20,50,100
  nice -n 19 python experiments/ftl.py --split=main_no_pretrain --overlaps=10,50,100
  python experiments/ftl.py --report_only   # rebuild tables and plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report as report_lib  # noqa: E402

RESULTS = os.path.join(ROOT, "docs", "ftl_results.json")
COSTS = os.path.join(ROOT, "docs", "ftl_costs.json")
DOC = os.path.join(ROOT, "docs", "transfer.md")
PLOT = os.path.join(ROOT, "docs", "img", "ftl_auc_vs_overlap.png")
OVERLAPS = (10, 20, 50, 100, 200, 486)
SPLITS = ("main", "b_has_age_sex", "main_no_pretrain")


def split_features(split_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Returns (A's features, B's features) of a split; "main" is the one of configs/heart_disease_ftl.py."""
  from fedjax_health.transfer import data as tdata  # imports jax: only when rendering or running
  return {"main": (tdata.A_FEATURES, tdata.B_FEATURES),
          "b_has_age_sex": (tdata.A_FEATURES, ("age", "sex") + tdata.B_FEATURES),
          "main_no_pretrain": (tdata.A_FEATURES, tdata.B_FEATURES)}[split_name]

OVERRIDES = {"main_no_pretrain": {"pretrain_epochs": 0}}  # the paper's form: A's network starts untrained
NAMES = {"b_overlap_labels": "(1) B features + overlap labels", "ftl": "(2) FTL (plaintext)",
         "b_all_labels": "(3) B features + every label", "centralised": "(4) all features + every label"}


def run(seeds, overlaps, split_name="main"):
  from fedjax_health.transfer import baselines, data as tdata, experiment as ftl_exp
  rows = json.load(open(RESULTS)) if os.path.exists(RESULTS) else []
  commit = report_lib.provenance("")["commit"]  # each row names the commit that computed it
  done = {(r["model"], r["seed"], r["overlap"]) for r in rows if r.get("split", "main") == split_name}
  c = ftl_exp.ftl_config()
  c.log_every = 0
  c.features_a, c.features_b = (",".join(f) for f in split_features(split_name))
  for k, v in OVERRIDES.get(split_name, {}).items():
    c[k] = v
  arrays = tdata.heart_disease_arrays()

  def save():
    with open(RESULTS, "w") as f:
      json.dump(rows, f, indent=1)

  for seed in seeds:
    for overlap in overlaps:
      if ("ftl", seed, overlap) in done:
        continue
      t0 = time.time()
      split = tdata.heart_disease_split(overlap, seed, *split_features(split_name), arrays=arrays)
      _, scores = ftl_exp.run_ftl(c, split, seed, log=lambda s: None)
      rows.append({"model": "ftl", "split": split_name, "seed": seed, "overlap": overlap, "commit": commit,
                   **baselines.scores_metrics(scores, split.y_b_eval)})
      kw = dict(hidden=c.hidden, activation=c.activation, epochs=int(c.epochs), lr=c.learning_rate, lam=c.lam, seed=seed)
      f1 = baselines.train_logistic_mlp(split.x_b[:overlap], split.y_overlap, **kw)
      rows.append({"model": "b_overlap_labels", "split": split_name, "seed": seed, "overlap": overlap,
                   "commit": commit, **baselines.scores_metrics(f1(split.x_b_target), split.y_b_eval)})
      if ("b_all_labels", seed, 0) not in done:
        for name, m in ftl_exp.run_baselines(c, split, arrays, seed).items():
          if name != "b_overlap_labels":
            rows.append({"model": name, "split": split_name, "seed": seed, "overlap": 0, "commit": commit, **m})
            done.add((name, seed, 0))
      save()
      ftl_auc = rows[-2]["auc"] if rows[-2]["model"] == "ftl" else next(
          r["auc"] for r in rows[::-1] if r["model"] == "ftl")
      print(f"seed {seed} overlap {overlap}: ftl auc {ftl_auc:.3f} ({time.time() - t0:.0f}s)", flush=True)


def _agg(rows, model, overlap, key):
  v = [r[key] for r in rows if r["model"] == model and r["overlap"] == overlap]
  return (float(np.mean(v)), float(np.std(v)), len(v)) if v else (float("nan"), 0.0, 0)


def _load_rows():
  with open(RESULTS) as f:
    return json.load(f)


def render_tables() -> str:
  all_rows = _load_rows()
  lines = []
  for split_name in SPLITS:
    fa, fb = split_features(split_name)
    rows = [r for r in all_rows if r.get("split", "main") == split_name]
    if rows:
      extra = "".join(f"; {k} = {v}" for k, v in OVERRIDES.get(split_name, {}).items())
      lines += [f"### Split `{split_name}`: A = {', '.join(fa)}; B = {', '.join(fb)}{extra}", ""] + _tables(rows)
  lines += _costs_table()
  return "\n".join(lines).rstrip("\n")


def report():
  report_lib.update_all(names=SECTIONS)
  _plot([r for r in _load_rows() if r.get("split", "main") == "main"])
  print(render_tables())


def _tables(rows):
  overlaps = sorted({r["overlap"] for r in rows if r["model"] == "ftl"})
  seeds = sorted({r["seed"] for r in rows})
  commits = sorted({r.get("commit", "unrecorded") for r in rows})
  lines = [f"Party B's {len(seeds)}-seed mean ± std on its 254 non-overlapping patients "
           f"(seeds {seeds[0]}-{seeds[-1]}; generated by `experiments/ftl.py` from `docs/ftl_results.json`, "
           f"rows computed at commit {', '.join(commits)}).", ""]
  for key in ("auc", "accuracy"):
    lines.append(f"**{key.upper() if key == 'auc' else 'Accuracy'}** (threshold 0 on the score)")
    lines.append("")
    lines.append("| shared patients | " + " | ".join(NAMES[m] for m in ("b_overlap_labels", "ftl")) + " | FTL − (1) |")
    lines.append("|---|---|---|---|")
    for ov in overlaps:
      m1, s1, _ = _agg(rows, "b_overlap_labels", ov, key)
      m2, s2, _ = _agg(rows, "ftl", ov, key)
      d = [f["_d"] for f in _paired(rows, ov, key)]
      lines.append(f"| {ov} | {m1:.3f} ± {s1:.3f} | {m2:.3f} ± {s2:.3f} | {np.mean(d):+.3f} ± {np.std(d):.3f} |")
    for m in ("b_all_labels", "centralised"):
      mu, sd, _ = _agg(rows, m, 0, key)
      lines.append(f"| ceiling {NAMES[m]} (486 labels) | {mu:.3f} ± {sd:.3f} | | |")
    lines.append("")
  return lines


def _costs_table():
  lines = []
  if os.path.exists(COSTS):
    costs = json.load(open(COSTS))
    lines.append(f"**Cost of one FTL epoch** per protection (generated by `benchmarks/ftl_costs.py` into "
                 f"`docs/ftl_costs.json`; networks as in the config, d = representation size; "
                 f"seconds on {costs.get('machine', 'a shared CPU')}"
                 + (f", {costs['date']}, commit {costs['commit']}, `{costs['command']}`" if "commit" in costs else "")
                 + "; ratios matter more than absolutes).")
    lines.append("")
    lines.append("| protection | key bits | overlap | d | A enc | A dec | B enc | B dec | bytes A→B | bytes B→A | "
                 "s (A) | s (B) | × plaintext products |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in costs["rows"]:
      a, b = r["costs"]["A"], r["costs"]["B"]
      lines.append(f"| {r['protection']} | {r.get('key_bits') or '-'} | {r['overlap']} | {r['dim']} | "
                   f"{a.get('encryptions', '-')} | {a.get('decryptions', '-')} | {b.get('encryptions', '-')} | "
                   f"{b.get('decryptions', '-')} | {a['bytes_sent']:,} | {b['bytes_sent']:,} | {a['seconds']:.2f} | "
                   f"{b['seconds']:.2f} | {r['ratio_to_plaintext']:,.0f} |")
    lines.append("")
  return lines


def _plot(rows):
  overlaps = sorted({r["overlap"] for r in rows if r["model"] == "ftl"})
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for m, style in (("b_overlap_labels", "o--"), ("ftl", "s-")):
    mu = np.array([_agg(rows, m, ov, "auc")[0] for ov in overlaps])
    sd = np.array([_agg(rows, m, ov, "auc")[1] for ov in overlaps])
    ax.errorbar(overlaps, mu, yerr=sd, fmt=style, capsize=3, label=NAMES[m])
  for m, col in (("b_all_labels", "gray"), ("centralised", "black")):
    ax.axhline(_agg(rows, m, 0, "auc")[0], color=col, ls=":", label=NAMES[m])
  ax.set_xscale("log")
  ax.set_xlabel("shared patients (overlap)")
  ax.set_ylabel("party B AUC, non-overlapping patients")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(PLOT, dpi=120)


def _paired(rows, ov, key):
  one = {r["seed"]: r[key] for r in rows if r["model"] == "b_overlap_labels" and r["overlap"] == ov}
  two = {r["seed"]: r[key] for r in rows if r["model"] == "ftl" and r["overlap"] == ov}
  return [{"_d": two[s] - one[s]} for s in sorted(set(one) & set(two))]


def _gaps(rows, key="auc"):
  """Returns [(overlap, mean, sd)] of the paired difference FTL - baseline (1) over seeds."""
  out = []
  for ov in sorted({r["overlap"] for r in rows if r["model"] == "ftl"}):
    d = np.array([f["_d"] for f in _paired(rows, ov, key)])
    if len(d):
      out.append((ov, float(d.mean()), float(d.std())))
  return out


def _verdicts(gaps):
  """Splits overlaps into FTL behind / about equal / ahead: behind or ahead when the paired mean gap
  exceeds its seed sd."""
  behind = [g for g in gaps if g[1] + g[2] < 0]
  ahead = [g for g in gaps if g[1] - g[2] > 0]
  equal = [g for g in gaps if g not in behind and g not in ahead]
  return behind, equal, ahead


def _ovs(gs) -> str:
  return ", ".join(str(g[0]) for g in gs) or "none"


def _span(vals) -> str:
  lo, hi = min(vals), max(vals)
  return f"{lo:.3f}" if abs(hi - lo) < 5e-4 else f"{lo:.3f}-{hi:.3f}"


def findings() -> str:
  all_rows = _load_rows()
  out = []
  for split_name in SPLITS:
    rows = [r for r in all_rows if r.get("split", "main") == split_name]
    if not rows:
      continue
    gaps = _gaps(rows)
    behind, equal, ahead = _verdicts(gaps)
    neg = [-g[1] for g in behind]
    text = (f"- **Split `{split_name}`**, paired AUC gap FTL − baseline (1) over seeds at each overlap: " +
            ", ".join(f"{ov}: {m:+.3f} ± {sd:.3f}" for ov, m, sd in gaps) +
            f". FTL trails (gap beyond its seed sd) at {_ovs(behind)}; about equal at {_ovs(equal)}; "
            f"ahead at {_ovs(ahead)}" + (f"; where behind, by {_span(neg)} AUC on average" if neg else "") + ".")
    full = max(r["overlap"] for r in rows if r["model"] == "ftl")
    if split_name == "main" and full:
      ftl = _agg(rows, "ftl", full, "auc")
      c3, c4 = _agg(rows, "b_all_labels", 0, "auc"), _agg(rows, "centralised", 0, "auc")
      facc, c3acc = _agg(rows, "ftl", full, "accuracy"), _agg(rows, "b_all_labels", 0, "accuracy")
      text += (f" With {full} shared patients FTL reaches AUC {ftl[0]:.3f} (accuracy {facc[0]:.3f}) against B's "
               f"all-labels ceiling (3) {c3[0]:.3f} ({c3acc[0]:.3f}); the centralised model with both parties' "
               f"features (4) reaches {c4[0]:.3f}.")
      small = [g for g in gaps if g[0] <= 100]
      met = small and all(g in ahead for g in small)
      text += (" The issue's target (B with FTL beats the overlap-labels baseline at small overlaps, <= 100) is "
               + ("**met**." if met else "**not met** on this data."))
    out.append(text)
  if os.path.exists(COSTS):
    with open(COSTS) as f:
      costs = json.load(f)["rows"]
    err = max(r.get("max_abs_error") or 0.0 for r in costs)
    out.append(f"- **Protection is exact to the fixed-point precision**: the largest |protected − plaintext| "
               f"gradient entry over the cost runs is {err:.1e} (`max_abs_error` in `docs/ftl_costs.json`), so "
               "every accuracy above holds for both protected variants.")
    pair = {}
    for r in costs:
      pair.setdefault((r["overlap"], r["dim"]), {})[(r["protection"], r.get("key_bits"))] = r
    speed, traffic, keys = [], [], []
    for p in pair.values():
      pa, ss, p2 = p.get(("paillier", 1024)), p.get(("secret_sharing", None)), p.get(("paillier", 2048))
      sec = lambda r: r["costs"]["A"]["seconds"] + r["costs"]["B"]["seconds"]
      byt = lambda r: r["costs"]["A"]["bytes_sent"] + r["costs"]["B"]["bytes_sent"]
      if pa and ss:
        speed.append(sec(pa) / sec(ss))
        traffic.append(byt(ss) / byt(pa))
      if pa and p2:
        keys.append(sec(p2) / sec(pa))
    if speed:
      out.append(f"- **Costs** (per epoch, both parties): secret sharing computes {min(speed):.0f}-{max(speed):.0f}x "
                 f"faster than 1024-bit Paillier here but sends {min(traffic):.0f}-{max(traffic):.0f}x more bytes"
                 + (f"; 2048-bit keys cost {min(keys):.1f}-{max(keys):.1f}x the 1024-bit time" if keys else "") + ".")
  return "\n".join(out)


def summary() -> str:
  rows = [r for r in _load_rows() if r.get("split", "main") == "main"]
  gaps = _gaps(rows)
  behind, equal, ahead = _verdicts(gaps)
  seeds = sorted({r["seed"] for r in rows})
  parts = ([f"trails it at {_ovs(behind)} shared patients (paired gap beyond its seed sd)"] if behind else []) + \
      ([f"is within seed noise of it at {_ovs(equal)}"] if equal else []) + ([f"beats it at {_ovs(ahead)}"] if ahead else [])
  return (f"On our Fed-Heart-Disease feature split (party B's AUC on its non-overlapping patients, {len(seeds)} "
          f"seeds), compared with simply training B on the overlap's labels, FTL " + "; ".join(parts) + ".")


SECTIONS = ("ftl_tables", "ftl_findings", "ftl_summary")
report_lib.register("ftl_tables", render_tables, sources=(RESULTS, COSTS))
report_lib.register("ftl_findings", findings, sources=(RESULTS, COSTS))
report_lib.register("ftl_summary", summary, sources=(RESULTS,))


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--report_only", action="store_true")
  p.add_argument("--split", default="main", choices=sorted(SPLITS))
  p.add_argument("--seeds", default="0,1,2,3,4")
  p.add_argument("--overlaps", default=",".join(map(str, OVERLAPS)))
  args = p.parse_args()
  if not args.report_only:
    run([int(s) for s in args.seeds.split(",")], [int(o) for o in args.overlaps.split(",")], args.split)
  report()
