"""Accuracy vs epsilon for client-level and patient-level DP (docs/privacy.md).

For each setting (a config in configs/), each target epsilon in {1, 3, 8, inf} at delta = 1e-5
(inf = clipping without noise) and a non-private reference, runs the given seeds (3 by default;
docs/privacy.md used 10 for the cheap Fed-Heart-Disease settings) and records the final
test accuracy, AUC and the epsilon the run reported. Raw rows go to results/privacy/runs.jsonl
(one JSON object per run; finished runs are skipped on a rerun), the table to
results/privacy/table.md and the plot to docs/img/privacy_accuracy_vs_epsilon.png.
~25 min on a 2-core CPU in all.

  .venv/bin/python experiments/privacy.py                 # everything, seeds 0-2
  .venv/bin/python experiments/privacy.py --settings=hd_client,hd_client_secagg,hd_patient --seeds=0,1,2,3,4,5,6,7,8,9
  .venv/bin/python experiments/privacy.py --settings=hd_client --seeds=0
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

from fedjax_health import simulation  # noqa: E402
from fedjax_health.privacy import accounting  # noqa: E402

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
  lines = ["| mechanism | RDP ε | PLD ε |", "|---|---|---|"]
  for desc, event in [
      ("DP-SGD q=0.1, 375 steps (hd_patient plan), z=1", accounting.patient_level_event(1.0, 0.1, 375)),
      ("DP-SGD q=0.1, 300 steps (breast_patient plan), z=1", accounting.patient_level_event(1.0, 0.1, 300)),
      ("client q=0.3, 40 rounds (breast_clinics plan), z=1", accounting.client_level_event(1.0, 40, "poisson", 0.3)),
      ("client q=1, 15 rounds (hd_client plan), z=2.5", accounting.client_level_event(2.5, 15)),
  ]:
    lines.append(f"| {desc} | {accounting.compute_epsilon(event, 1e-5, 'rdp'):.3f} | "
                 f"{accounting.compute_epsilon(event, 1e-5, 'pld'):.3f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default=os.path.join(ROOT, "results", "privacy"))
  parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "privacy_accuracy_vs_epsilon.png"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  runs_path = os.path.join(args.out, "runs.jsonl")
  rows = []
  if os.path.exists(runs_path):
    with open(runs_path) as f:
      rows = [json.loads(line) for line in f]
  done = {(r["setting"], r["target_epsilon"], r["seed"]) for r in rows}
  with open(runs_path, "a") as f:
    for setting in args.settings.split(","):
      for eps in (None,) + EPSILONS:
        todo = [seed for seed in (int(s) for s in args.seeds.split(",")) if (setting, _key(eps), seed) not in done]
        for row in (run_seeds(setting, eps, todo) if todo else []):
          rows.append(row)
          f.write(json.dumps(row) + "\n")
          f.flush()
          print(json.dumps(row), flush=True)
  table = make_table(rows)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n\n" + accountant_comparison() + "\n")
  print(table)
  print(accountant_comparison())
  os.makedirs(os.path.dirname(args.plot), exist_ok=True)
  make_plot(rows, args.plot)


if __name__ == "__main__":
  main()
