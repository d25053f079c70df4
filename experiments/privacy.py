"""Accuracy vs epsilon for client-level and patient-level DP (docs/privacy.md).

For each setting (a config in configs/), each target epsilon in {1, 3, 8, inf} at delta = 1e-5
(inf = clipping without noise) and a non-private reference, runs the given seeds (3 by default;
docs/privacy.md used 10 for the cheap Fed-Heart-Disease settings) and records the final
test accuracy, AUC and the epsilon the run reported. Raw rows go to results/privacy/runs.jsonl
(one JSON object per run; finished runs are skipped on a rerun), the plot to
docs/img/privacy_accuracy_vs_epsilon.png, and every row so far (with the RDP/PLD comparison, the
test sets' majority-class rates, the command, date and machine) to the small committed
docs/results/privacy.json, from which the tables and findings of docs/privacy.md and the README
are generated (experiments/report.py). ~25 min on a 2-core CPU in all. Rows already in
docs/results/privacy.json count as done: a run of some settings or seeds adds its rows to the file
(after each setting, so a run cut short keeps what finished), each row tagged with the invocation
(``runs``: command, date, machine, commit) that produced it; delete rows from the file to rerun them.

  nice -n 19 python experiments/privacy.py                 # everything, seeds 0-2
  nice -n 19 python experiments/privacy.py --settings=hd_client,hd_client_secagg,hd_patient --seeds=0,1,2,3,4,5,6,7,8,9
  python experiments/privacy.py --settings=hd_client --seeds=0
  python experiments/privacy.py --report_only              # the generated sections from the JSON only
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402

RESULTS = os.path.join(ROOT, "docs", "results", "privacy.json")

EPSILONS = (1.0, 3.0, 8.0, math.inf)
# name -> (config module, DP level, description)
SETTINGS = {
    "hd_client": ("heart_disease_dp", "client", "Fed-Heart-Disease, 4 hospitals, hospital-level central DP-FedAvg"),
    "hd_client_secagg": ("heart_disease_dp_secagg", "client",
                         "Fed-Heart-Disease, hospital-level distributed DP under SecAgg+ (10% dropouts)"),
    "hd_patient": ("heart_disease_dp_patient", "patient", "Fed-Heart-Disease, 4 hospitals, patient-level DP-SGD"),
    "breast_patient": ("breastmnist_dp_patient", "patient", "BreastMNIST, 10 clinics, patient-level DP-SGD"),
    "breast_clinics": ("breastmnist_dp_clinics", "client",
                       "BreastMNIST, 100 clinics (cross-device, q=0.3), clinic-level central DP-FedAvg"),
}


def make_config(setting: str, epsilon: float | None, seed: int):
  """Returns the config of one run; ``epsilon=None`` is the non-private reference."""
  module, level, _ = SETTINGS[setting]
  cfg = importlib.import_module(f"configs.{module}").get_config("")
  cfg.seed = seed
  cfg.eval_every = cfg.num_rounds
  if epsilon is None:
    cfg.privacy.client.mechanism = "none"
    cfg.privacy.patient.enabled = False
    cfg.privacy.secagg.enabled = False
    if level == "patient":  # the same local work without DP-SGD: q n examples per step
      cfg.client.batch_size = 8
  elif level == "client":
    cfg.privacy.client.target_epsilon = epsilon
  else:
    cfg.privacy.patient.target_epsilon = epsilon
  return cfg


def run_one(setting: str, epsilon: float | None, seed: int) -> dict:
  return run_seeds(setting, epsilon, [seed])[0]


def run_seeds(setting: str, epsilon: float | None, seeds: list[int]) -> list[dict]:
  """Runs consecutive ``seeds`` as one vmapped program (``config.num_seeds``) when the setting's
  federated split does not depend on the seed (Fed-Heart-Disease), else one run per seed."""
  from fedjax_health import simulation
  cfg = make_config(setting, epsilon, seeds[0])
  stacked = len(seeds) > 1 and cfg.dataset.name == "heart_disease" and seeds == list(range(seeds[0], seeds[0] + len(seeds)))
  if len(seeds) > 1 and not stacked:
    return [r for s in seeds for r in run_seeds(setting, epsilon, [s])]
  cfg.num_seeds = len(seeds)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.time()
    simulation.run(cfg, workdir, log=lambda s: None)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  wall = time.time() - t0
  if not stacked:
    return [_row(setting, epsilon, seeds[0], rows[-1], wall)]
  last = {r["experiment"]: r for r in rows}  # the final round's row of each seed
  return [_row(setting, epsilon, s, last[f"dp_fedavg/seed{s}"], wall / len(seeds)) for s in seeds]


def _row(setting, epsilon, seed, last, wall):
  out = {"setting": setting, "target_epsilon": "none" if epsilon is None else epsilon, "seed": seed,
         "accuracy": last["accuracy"], "auc": last.get("auc"), "mean_client_accuracy": last["mean_client_accuracy"],
         "epsilon": last.get("epsilon"), "epsilon_client": last.get("epsilon_client"),
         "epsilon_patient": last.get("epsilon_patient"), "noise_multiplier_client": last.get("noise_multiplier_client"),
         "noise_multiplier_patient": last.get("noise_multiplier_patient"), "wall_s": round(wall, 1)}
  for k in ("secagg_bytes_per_client", "plain_bytes_per_client"):
    if k in last:
      out[k] = last[k]
  return out


def _fmt(values):
  v = np.asarray(values, float)
  return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def _key(e):
  return "none" if e is None else e


def make_table(rows: list[dict]) -> str:
  lines = ["| setting | target ε | seeds | accuracy (mean ± sd) | AUC (mean ± sd) | reported ε | noise multiplier z |",
           "|---|---|---|---|---|---|---|"]
  for setting, (_, level, desc) in SETTINGS.items():
    for eps in (None,) + EPSILONS:
      sel = [r for r in rows if r["setting"] == setting and r["target_epsilon"] == _key(eps)]
      if not sel:
        continue
      label = "no DP (FedAvg)" if eps is None else ("∞ (clip only)" if eps == math.inf else f"{eps:g}")
      rep = sel[0]["epsilon"]
      rep_s = "–" if rep is None else ("∞" if rep == math.inf else f"{rep:.3f}")
      z = sel[0][f"noise_multiplier_{level}"]
      z_s = "–" if eps is None else ("0" if not z else f"{z:.3f}")
      lines.append(f"| {desc} | {label} | {len(sel)} | {_fmt([r['accuracy'] for r in sel])} | "
                   f"{_fmt([r['auc'] for r in sel])} | {rep_s} | {z_s} |")
  return "\n".join(lines)


def make_plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  xs = {1.0: 0, 3.0: 1, 8.0: 2, math.inf: 3}
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  for i, (setting, (_, level, desc)) in enumerate(SETTINGS.items()):
    pts = []
    for eps in EPSILONS:
      acc = [r["accuracy"] for r in rows if r["setting"] == setting and r["target_epsilon"] == eps]
      if acc:
        pts.append((xs[eps] + 0.04 * (i - 2), np.mean(acc), np.std(acc, ddof=1) if len(acc) > 1 else 0))
    if pts:
      x, m, s = zip(*pts)
      line = ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=f"{desc} [{level}]",
                         linestyle="-" if level == "patient" else "--")
      base = [r["accuracy"] for r in rows if r["setting"] == setting and r["target_epsilon"] == "none"]
      if base:
        ax.axhline(np.mean(base), color=line[0].get_color(), alpha=0.35, linewidth=1)
  ax.set_xticks(range(4), ["1", "3", "8", "∞ (clip only)"])
  ax.set_xlabel("target ε at δ = 1e-5 (faint lines: non-private FedAvg)")
  ax.set_ylabel("test accuracy (mean ± sd over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6.5, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def accountant_comparison() -> str:
  """Returns a markdown table of RDP vs PLD epsilon for the patient-level plans at z = 1."""
  return accountant_markdown(accountant_rows())


def accountant_markdown(rows: list[dict]) -> str:
  lines = ["| mechanism | RDP ε | PLD ε |", "|---|---|---|"]
  lines += [f"| {r['mechanism']} | {r['rdp']:.3f} | {r['pld']:.3f} |" for r in rows]
  return "\n".join(lines)


def accountant_rows() -> list[dict]:
  from fedjax_health.privacy import accounting
  rows = []
  for desc, event in [
      ("DP-SGD q=0.1, 375 steps (hd_patient plan), z=1", accounting.patient_level_event(1.0, 0.1, 375)),
      ("DP-SGD q=0.1, 300 steps (breast_patient plan), z=1", accounting.patient_level_event(1.0, 0.1, 300)),
      ("client q=0.3, 40 rounds (breast_clinics plan), z=1", accounting.client_level_event(1.0, 40, "poisson", 0.3)),
      ("client q=1, 15 rounds (hd_client plan), z=2.5", accounting.client_level_event(2.5, 15)),
  ]:
    rows.append({"mechanism": desc, "rdp": accounting.compute_epsilon(event, 1e-5, "rdp"),
                 "pld": accounting.compute_epsilon(event, 1e-5, "pld")})
  return rows


# ----------------------------------------------------------------------------------------------
# The committed result file and the generated sections.

SECTIONS = ("privacy_results", "privacy_findings", "privacy_accountants")


def majority_rates() -> dict:
  """Share of the most frequent class in each setting's test set (the accuracy of a constant guess)."""
  from fedjax_health.data import registry
  out = {}
  for setting in SETTINGS:
    cfg = make_config(setting, None, 0)
    y = np.asarray(registry.load_data(cfg.dataset, seed=0).test.y)
    out[setting] = float(np.bincount(y).max() / len(y))
  return out


def write_results(rows: list[dict], meta: dict, path: str = RESULTS, runs: list[dict] | None = None) -> None:
  """Writes the committed result file. ``runs`` lists the invocations whose rows it holds (each row's
  ``run`` indexes it); the top-level provenance (``meta``) is the latest invocation's."""
  rows = sorted(rows, key=lambda r: (list(SETTINGS).index(r["setting"]),
                                     -1 if r["target_epsilon"] == "none" else r["target_epsilon"], r["seed"]))
  doc = dict(meta, settings={k: {"config": v[0], "level": v[1], "label": v[2]} for k, v in SETTINGS.items()},
             majority_class_rate=majority_rates(), accountants=accountant_rows())
  if runs is not None:
    doc["runs"] = runs
  doc["rows"] = rows
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report.rounded(doc, 5), f, indent=0)
    f.write("\n")


def committed_rows(path: str = RESULTS) -> tuple[list[dict], list[dict]]:
  """Returns ``(rows, runs)`` already in the committed result file, every row tagged with the index
  of the invocation (``runs``) that produced it, so a run of some settings adds to it."""
  if not os.path.exists(path):
    return [], []
  doc = load_results(path)
  runs = doc.get("runs") or [{k: doc[k] for k in ("date", "machine", "jax", "commit", "command", "note") if k in doc}]
  return [dict(r, run=r.get("run", 0)) for r in doc["rows"]], runs


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
  """Returns ``old`` with every row of ``new`` added; a new row replaces an old one of the same
  (setting, target epsilon, seed)."""
  key = lambda r: (r["setting"], r["target_epsilon"], r["seed"])
  merged = {key(r): r for r in old}
  merged.update({key(r): r for r in new})
  return list(merged.values())


# The plan of the published table: seeds 0-2 everywhere, 0-9 for the cheap Fed-Heart-Disease settings.
PLANNED_SEEDS = {s: range(10) if s.startswith("hd_") else range(3) for s in SETTINGS}


def missing(rows: list[dict]) -> str:
  """Returns which planned (setting, target epsilon) cells lack which seeds, '' when none do."""
  have = {(r["setting"], r["target_epsilon"], r["seed"]) for r in rows}
  seeds_s = lambda lack: (f"seeds {lack[0]}-{lack[-1]}" if len(lack) > 1 and lack == list(range(lack[0], lack[-1] + 1))
                          else f"seed{'s' if len(lack) > 1 else ''} {', '.join(map(str, lack))}")
  out = []
  for setting, seeds in PLANNED_SEEDS.items():
    lacks = {eps: [s for s in seeds if (setting, _key(eps), s) not in have] for eps in (None,) + EPSILONS}
    if len({tuple(v) for v in lacks.values()}) == 1 and lacks[None]:
      out.append(f"{setting}, every row ({seeds_s(lacks[None])})")
      continue
    label = lambda eps: "no DP" if eps is None else "ε = ∞" if eps == math.inf else f"ε = {eps:g}"
    out += [f"{setting} {label(eps)} ({seeds_s(lack)})" for eps, lack in lacks.items() if lack]
  return "; ".join(out)


def load_results(path: str = RESULTS) -> dict:
  with open(path) as f:
    return json.load(f)


def _stats(rows, setting, eps, key="accuracy"):
  v = np.asarray([r[key] for r in rows if r["setting"] == setting and r["target_epsilon"] == eps], float)
  if not len(v):
    return float("nan"), float("nan"), 0
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _ms(st) -> str:
  return f"{st[0]:.3f} ± {st[1]:.3f}"


def render_results() -> str:
  doc = load_results()
  seeds = sorted({r["seed"] for r in doc["rows"]})
  runs = doc.get("runs") or [doc]
  counts = [sum(r.get("run", 0) == i for r in doc["rows"]) for i in range(len(runs))]
  origin = "; ".join(f"`{run['command']}`, {run['date']}, {run['machine']}"
                     + (f", {n} rows" if len(runs) > 1 else "") for run, n in zip(runs, counts) if n)
  lack = missing(doc["rows"])
  return (make_table(doc["rows"]) + f"\n\nGenerated from `docs/results/privacy.json` ({origin}; seeds per row in "
          f"the table, {len(seeds)} distinct in all). "
          + (f"Not yet run (planned: seeds 0-9 for the Fed-Heart-Disease settings, 0-2 for BreastMNIST): {lack}."
             if lack else "Every planned run is in the file (seeds 0-9 for the Fed-Heart-Disease settings, "
             "0-2 for BreastMNIST).")
          + (f" {doc['note']}" if doc.get("note") else ""))


def _within_noise(rows, setting, key) -> str:
  """Returns from which finite epsilon on ``key`` stays within seed noise of the non-private
  model: the gap of the means is at most the larger of the two seed sds, there and at every
  larger epsilon tested."""
  none = _stats(rows, setting, "none", key)
  close = [e for e in EPSILONS if _stats(rows, setting, e, key)[2] and
           abs(_stats(rows, setting, e, key)[0] - none[0]) <= max(_stats(rows, setting, e, key)[1], none[1])]
  finite = [e for e in close if e != math.inf]
  name = "Accuracy" if key == "accuracy" else "AUC"
  if finite and all(e in close for e in EPSILONS if e >= min(finite) and _stats(rows, setting, e, key)[2]):
    return f"{name}: within seed noise of the non-private model from ε = {min(finite):g} on"
  return f"{name}: no finite ε tested within seed noise of the non-private model"


def findings(doc: dict) -> str:
  """The bullets under the table; every figure and comparison computed from the per-seed rows."""
  rows, maj = doc["rows"], doc["majority_class_rate"]
  z = lambda setting, eps, level: next((r[f"noise_multiplier_{level}"] for r in rows
                                        if r["setting"] == setting and r["target_epsilon"] == eps), None)
  out = ["Constant-guess accuracy (majority class of the test set): " +
         ", ".join(f"{s} {maj[s]:.3f}" for s in SETTINGS if s in maj) + "."]
  present = {r["setting"] for r in rows}
  for setting, (_, level, desc) in SETTINGS.items():
    if setting not in present:
      continue
    none = _stats(rows, setting, "none")
    none_auc = _stats(rows, setting, "none", "auc")
    parts = []
    for eps in EPSILONS:
      acc, auc = _stats(rows, setting, eps), _stats(rows, setting, eps, "auc")
      if not acc[2]:
        continue
      label = "∞ (clip only)" if eps == math.inf else f"ε = {eps:g}"
      zz = z(setting, eps, level)
      parts.append(f"{label}: accuracy {_ms(acc)}, AUC {_ms(auc)}" + (f", z = {zz:.2f}" if zz else ""))
    below_chance = [e for e in EPSILONS if _stats(rows, setting, e)[2] and _stats(rows, setting, e)[0] <= maj.get(setting, 0)]
    text = (f"- **{desc}** ({none[2]} seeds): non-private accuracy {_ms(none)}, AUC {_ms(none_auc)}; " +
            ("; ".join(parts) if parts else "no private run in this file") + ". ")
    if not parts:
      out.append(text.rstrip())
      continue
    text += "; ".join(_within_noise(rows, setting, key) for key in ("accuracy", "auc"))
    text += " (gap ≤ the larger seed sd)"
    if below_chance:
      text += ("; accuracy at or below the constant guess at " +
               ", ".join("∞" if e == math.inf else f"ε = {e:g}" for e in below_chance))
    out.append(text + ".")
  if {"hd_client", "hd_client_secagg"} <= present:
    diffs = [(e, _stats(rows, "hd_client_secagg", e)[0] - _stats(rows, "hd_client", e)[0]) for e in EPSILONS]
    out.append("- SecAgg+ with distributed noise minus central DP-FedAvg (Fed-Heart-Disease), mean accuracy: " +
               ", ".join(f"{'∞' if e == math.inf else f'ε = {e:g}'} {d:+.3f}" for e, d in diffs) +
               ". Each hospital's noise share is sized for the minimum number of survivors, so with all "
               "hospitals sending the noise variance exceeds the central one, and rounds with too few "
               "survivors abort.")
  return "\n".join(out)


report.register("privacy_results", render_results, sources=(RESULTS,))
report.register("privacy_findings", lambda: findings(load_results()), sources=(RESULTS,))
report.register("privacy_accountants", lambda: accountant_markdown(load_results()["accountants"]), sources=(RESULTS,))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default=os.path.join(ROOT, "results", "privacy"))
  parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "privacy_accuracy_vs_epsilon.png"))
  parser.add_argument("--command", default="", help="the command recorded in the JSON (default: this one)")
  parser.add_argument("--note", default="", help="recorded in docs/results/privacy.json and shown under the table "
                      "(e.g. that a run was cut short)")
  parser.add_argument("--report_only", action="store_true",
                      help="rebuild the generated sections and the plot from docs/results/privacy.json (no runs)")
  args = parser.parse_args()
  for setting in args.settings.split(","):
    if setting not in SETTINGS:
      raise ValueError(f"--settings must be among {sorted(SETTINGS)}, got {setting!r}")
  if args.report_only:
    report.update_all(names=SECTIONS)
    make_plot(load_results()["rows"], args.plot)
    return
  os.makedirs(args.out, exist_ok=True)
  runs_path = os.path.join(args.out, "runs.jsonl")
  publish = args.out == os.path.join(ROOT, "results", "privacy")
  # Rows already committed count as done: a run of some settings adds to docs/results/privacy.json.
  old, runs = committed_rows() if publish else ([], [])
  rows = []
  if os.path.exists(runs_path):
    with open(runs_path) as f:
      rows = [json.loads(line) for line in f]
  done = {(r["setting"], r["target_epsilon"], r["seed"]) for r in old}
  rows = [r for r in rows if (r["setting"], r["target_epsilon"], r["seed"]) not in done]  # already committed
  done |= {(r["setting"], r["target_epsilon"], r["seed"]) for r in rows}
  argv = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--note") and sys.argv[i] != "--note"]
  meta = report.provenance(args.command or "nice -n 19 python experiments/privacy.py " + " ".join(argv), note=args.note)
  this_run = {k: meta[k] for k in ("date", "machine", "jax", "commit", "command")}

  def publish_rows():
    if publish and rows:
      write_results(merge_rows(old, [dict(r, run=len(runs)) for r in rows]), meta, runs=runs + [this_run])
      report.update_all(names=SECTIONS)

  with open(runs_path, "a") as f:
    for setting in args.settings.split(","):
      for eps in (None,) + EPSILONS:
        todo = [seed for seed in (int(s) for s in args.seeds.split(",")) if (setting, _key(eps), seed) not in done]
        # One program for the seeds when they stack (Fed-Heart-Disease), else one run per seed, each
        # row saved as soon as it finishes.
        stacks = make_config(setting, None, 0).dataset.name == "heart_disease"
        for row in (r for group in ([todo] if stacks else [[s] for s in todo]) if group
                    for r in run_seeds(setting, eps, group)):
          rows.append(row)
          f.write(json.dumps(row) + "\n")
          f.flush()
          print(json.dumps(row), flush=True)
      publish_rows()  # after each setting, so a run cut short keeps what finished
  table = make_table(merge_rows(old, rows))
  print(table)
  print(accountant_comparison())
  rows = merge_rows(old, rows)
  os.makedirs(os.path.dirname(args.plot), exist_ok=True)
  make_plot(rows, args.plot)


if __name__ == "__main__":
  main()
