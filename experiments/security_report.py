"""Renders docs/security.md and the README security summary from ``docs/results/security.json``.

Cheap to import (json + numpy; matplotlib only inside the plot functions): ``experiments/report.py``
imports it to rebuild the generated sections without running anything. The run itself is
``experiments/security.py``; it writes ``docs/results/security.json`` through ``write_results``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402

RESULTS = os.path.join(ROOT, "docs", "results", "security.json")
RULES = ("mean", "norm_bound", "weak_dp", "krum", "multi_krum", "median", "trimmed_mean", "geometric_median", "bulyan")
DEFENSES = RULES + ("clustering", "autoencoder", "lrr", "sanitize", "pruning")


def mean_of(per_seed, key):
  v = np.array([m[key] for m in per_seed], np.float64)
  return float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan")


def asr_key(attack: str) -> str | None:
  if attack.startswith("backdoor"):
    return "asr_backdoor"
  if attack.startswith("edge_case"):
    return "asr_edge"
  return None


def table_markdown(res: dict) -> str:
  cells = res["cells"]
  attacks = list(dict.fromkeys(k.split("|")[0] for k in cells))
  defs = [d for d in DEFENSES if any(k.endswith("|" + d) for k in cells)]
  lines = ["| attack \\ defence | " + " | ".join(defs) + " |", "|---" * (len(defs) + 1) + "|"]
  pre = res["pretrained"]
  lines.append(f"| *pre-trained model* | {mean_of(pre, 'accuracy'):.2f} (ASR backdoor {mean_of(pre, 'asr_backdoor'):.2f}, "
               f"edge {mean_of(pre, 'asr_edge'):.2f}) |" + " |" * (len(defs) - 1))
  for a in attacks:
    row = [a]
    for d in defs:
      per = cells.get(f"{a}|{d}")
      if per is None:
        row.append("n/a")
        continue
      acc = mean_of(per, "accuracy")
      key = asr_key(a)
      row.append(f"{acc:.2f} / {mean_of(per, key):.2f}" if key else f"{acc:.2f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def detection_markdown(res: dict) -> str:
  cells = res["cells"]
  attacks = list(dict.fromkeys(k.split("|")[0] for k in cells))
  dets = [d for d in ("clustering", "autoencoder", "lrr", "krum", "multi_krum", "bulyan") if f"none|{d}" in cells]
  lines = ["| attack | " + " | ".join(dets) + " |", "|---" * (len(dets) + 1) + "|"]
  for a in attacks:
    row = ["none (attackers honest)" if a == "none" else a]
    for d in dets:
      per = cells.get(f"{a}|{d}")
      row.append("n/a" if per is None else f"{mean_of(per, 'tpr'):.2f} / {mean_of(per, 'fpr'):.2f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def honest_fpr_by_skew(res: dict, defense: str, attack: str = "none") -> tuple[float, float]:
  """Returns (rejection rate of the most label-skewed quarter of honest clients, of the least)."""
  per = res["cells"].get(f"{attack}|{defense}")
  if per is None:
    return float("nan"), float("nan")
  skew = np.array(res["label_skew"])
  honest = np.setdiff1d(np.arange(len(skew)), res["malicious"])
  rates = np.nanmean(np.array([m["rejection_rate_per_client"] for m in per], np.float64), axis=0)[honest]
  order = np.argsort(skew[honest])
  q = max(1, len(honest) // 4)
  return float(np.nanmean(rates[order[-q:]])), float(np.nanmean(rates[order[:q]]))


def fpr_markdown(res: dict) -> str:
  dets = [d for d in ("clustering", "autoencoder", "lrr", "krum", "multi_krum", "bulyan") if f"none|{d}" in res["cells"]]
  lines = ["| defence | honest FPR, most label-skewed quarter | least skewed quarter |", "|---|---|---|"]
  for d in dets:
    hi, lo = honest_fpr_by_skew(res, d)
    lines.append(f"| {d} | {hi:.2f} | {lo:.2f} |")
  return "\n".join(lines)


def per_client_markdown(res: dict) -> str:
  """Rejection rate of each client without attack (attackers honest), by detector, with label skew."""
  n = len(res["label_skew"])
  dets = [d for d in ("clustering", "autoencoder", "lrr", "krum", "multi_krum", "bulyan") if f"none|{d}" in res["cells"]]
  names = res["client_ids"] or [str(c) for c in range(n)]
  head = [f"{names[c]}{' (attacker)' if c in res['malicious'] else ''}" for c in range(n)]
  lines = ["| | " + " | ".join(head) + " |", "|---" * (n + 1) + "|",
           "| label skew (TV to pooled) | " + " | ".join(f"{v:.2f}" for v in res["label_skew"]) + " |"]
  for d in dets:
    rates = np.nanmean(np.array([m["rejection_rate_per_client"] for m in res["cells"][f"none|{d}"]], np.float64), 0)
    lines.append(f"| {d} | " + " | ".join(f"{v:.2f}" for v in rates) + " |")
  return "\n".join(lines)


def cell(res, attack, defense, key="accuracy"):
  per = res["cells"].get(f"{attack}|{defense}")
  return float("nan") if per is None else mean_of(per, key)


def claims_markdown(results: list[dict]) -> str:
  out = []
  for res in results:
    c = lambda a, d, k="asr_backdoor": cell(res, a, d, k)
    pre = mean_of(res["pretrained"], "asr_backdoor")
    out.append(f"**{res['label']}**")
    out.append(f"- PGD + model replacement against FedAvg near convergence: backdoor ASR {c('backdoor+pgd+repl', 'mean'):.2f} "
               f"(black-box data poisoning {c('backdoor', 'mean'):.2f}, PGD alone {c('backdoor+pgd', 'mean'):.2f}, "
               f"pre-trained model {pre:.2f}); main-task accuracy {c('backdoor+pgd+repl', 'mean', 'accuracy'):.2f} "
               f"(clean FedAvg {c('none', 'mean', 'accuracy'):.2f}).")
    out.append(f"- Norm bounding / weak DP against PGD + replacement: ASR {c('backdoor+pgd+repl', 'norm_bound'):.2f} / "
               f"{c('backdoor+pgd+repl', 'weak_dp'):.2f} (FedAvg {c('backdoor+pgd+repl', 'mean'):.2f}); clean accuracy with "
               f"them {c('none', 'norm_bound', 'accuracy'):.2f} / {c('none', 'weak_dp', 'accuracy'):.2f}.")
    det = [d for d in ("clustering", "autoencoder", "lrr") if f"edge_case+pgd|{d}" in res["cells"]]
    out.append("- Detection TPR, backdoor + PGD + replacement vs edge-case + PGD (vs the attackers behaving honestly): " +
               "; ".join(f"{d} {c('backdoor+pgd+repl', d, 'tpr'):.2f} vs {c('edge_case+pgd', d, 'tpr'):.2f} "
                         f"({c('none', d, 'tpr'):.2f})" for d in det) +
               ". Edge-case ASR under those detectors: " +
               ", ".join(f"{d} {c('edge_case+pgd', d, 'asr_edge'):.2f}" for d in det) +
               f" (FedAvg {c('edge_case+pgd', 'mean', 'asr_edge'):.2f}, pre-trained "
               f"{mean_of(res['pretrained'], 'asr_edge'):.2f}).")
    fpr = []
    for d in ("clustering", "autoencoder", "lrr", "multi_krum", "bulyan"):
      hi, lo = honest_fpr_by_skew(res, d)
      if np.isfinite(hi):
        fpr.append(f"{d} {hi:.2f} vs {lo:.2f}")
    out.append("- Honest clients rejected without any attack, most vs least label-skewed quarter: " + "; ".join(fpr) + ".")
    out.append("")
  return "\n".join(out)


def plot_fpr(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
  for ax, res in zip(axes[0], results):
    skew = np.array(res["label_skew"])
    honest = np.setdiff1d(np.arange(len(skew)), res["malicious"])
    for d, marker in (("autoencoder", "o"), ("lrr", "s"), ("multi_krum", "^"), ("bulyan", "v"), ("clustering", "x")):
      per = res["cells"].get(f"none|{d}")
      if per is None:
        continue
      rates = np.nanmean(np.array([m["rejection_rate_per_client"] for m in per], np.float64), 0)
      ax.scatter(skew[honest], rates[honest], label=d, marker=marker, s=18, alpha=0.7)
    ax.set_xlabel("client label skew (total variation to pooled)")
    ax.set_ylabel("rejection rate, no attack")
    ax.set_title(res["label"], fontsize=8)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(results), 2, figsize=(15, 4.2 * len(results)), squeeze=False)
  for row, res in zip(axes, results):
    cells = res["cells"]
    attacks = list(dict.fromkeys(k.split("|")[0] for k in cells))
    defs = [d for d in DEFENSES if any(k.endswith("|" + d) for k in cells)]
    for ax, (title, key_fn) in zip(row, (("main-task accuracy", lambda a: "accuracy"), ("attack success rate", asr_key))):
      shown = [a for a in attacks if key_fn(a)]
      grid = np.full((len(shown), len(defs)), np.nan)
      for i, a in enumerate(shown):
        for j, d in enumerate(defs):
          if f"{a}|{d}" in cells:
            grid[i, j] = mean_of(cells[f"{a}|{d}"], key_fn(a))
      im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis" if key_fn is not asr_key else "magma_r", aspect="auto")
      ax.set_xticks(range(len(defs)), defs, rotation=45, ha="right", fontsize=7)
      ax.set_yticks(range(len(shown)), shown, fontsize=7)
      for i in range(len(shown)):
        for j in range(len(defs)):
          if np.isfinite(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                    color="white" if (grid[i, j] < 0.5) == (key_fn is not asr_key) else "black")
      ax.set_title(f"{res['label']}: {title}", fontsize=8)
      fig.colorbar(im, ax=ax, fraction=0.03)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The committed result file.


def compact(res: dict) -> dict:
  """Returns one federation's raw result, small enough to commit: floats rounded to 4 digits, the
  per-client rejection rates kept only for the no-attack cells (the only ones any table reads)."""
  cells = {}
  for key, per_seed in res["cells"].items():
    keep_clients = key.startswith("none|")
    cells[key] = [{k: v for k, v in m.items() if keep_clients or k != "rejection_rate_per_client"} for m in per_seed]
  out = {k: v for k, v in res.items() if not k.startswith("_") and k != "cells"}
  out["cells"] = cells
  out = report.rounded(out)
  out["cross_check_max_abs_diff"] = res.get("cross_check_max_abs_diff")  # tiny: not rounded away
  return out


def write_results(results: list[dict], meta: dict, path: str = RESULTS) -> dict:
  """Writes ``{**meta, "federations": [compact(res) ...]}`` to ``path``; returns it."""
  doc = dict(meta, federations=[compact(r) for r in results])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(doc, f, indent=None, separators=(",", ":"))
    f.write("\n")
  return doc


def load(path: str = RESULTS) -> dict:
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------------
# Generated sections.


def setup_markdown(doc: dict) -> str:
  """The protocol paragraph of docs/security.md, with the run's settings and provenance."""
  results = doc["federations"]
  s = doc["settings"]
  per_fed = lambda key, fmt="{}": " / ".join(fmt.format(s["federations"][r["setting"]][key]) for r in results)
  pre = ", ".join(f"{s['federations'][r['setting']]['pretrain_rounds']} rounds for {r['setting']}" for r in results)
  minutes = sum(r["wall_time_s"] for r in results) / 60
  check = ", ".join("not run" if r.get("cross_check_max_abs_diff") is None else f"{r['cross_check_max_abs_diff']:.1e}"
                    for r in results)
  seeds = ", ".join(map(str, results[0]["seeds"]))
  return f"""Measured by `experiments/security.py` and generated from `docs/results/security.json` by
`experiments/report.py` (run {doc['date']} on {doc['machine']}, jax {doc['jax']}, commit {doc['commit']}:
`{doc['command']}`; means over seeds {seeds}; {minutes:.0f} min in all).
Each federation ({' / '.join(r['setting'] for r in results)}) is first trained honestly with FedAvg
({pre}), then every cell continues from that model for {s['warmup']} honest + {s['attack_rounds']} attacked
rounds: the "near convergence" regime of the chapter. Accuracy is the main-task test accuracy; ASR
(attack success rate) is the share of triggered test inputs whose true class is not the target
(backdoor), or of held-out edge-case inputs (edge case), classified as the target; cells show
`accuracy / ASR` for targeted attacks and accuracy otherwise. `n/a`: the defence cannot run for the
cohort (Krum needs n > 2f + 2, Bulyan n >= 4f + 3) or does not apply (client-side sanitisation
assumes the attacker runs the honest client code on poisoned data, so only data attacks). Detection
tables give `TPR / FPR` over all participations of the attack phase; the row "none (attackers
honest)" is the rejection rate of the would-be attackers when they behave honestly: a detector's
TPR is only evidence of detection where it exceeds that row.

Reproduce:

    nice -n 19 python experiments/security.py                 # reruns, writes docs/results/security.json
    python experiments/security.py --report_only               # tables and plots from the JSON only

Settings: norm bound and PGD radius = the honest clients' mean update norm at the end of
pre-training ({per_fed('max_norm', '{:.3f}')}); weak DP adds Gaussian noise of total norm
{s['weak_dp_noise_fraction']:g} x an honest update per round; Krum / Bulyan / LRR assume f = {per_fed('num_byzantine')};
trimmed mean trims {per_fed('trim_fraction', '{:.0%}')} per side; Multi-Krum averages n - f; RFA runs
smoothed Weiszfeld iterations; the autoencoder (Li et al. 2020) sees random coordinates and warms up
for {s['warmup']} rounds; LRR (Fang et al.) uses the server's validation data (MedMNIST's val split;
a share of each hospital's training rows for Fed-Heart-Disease); pruning removes
{s['prune_fraction']:.0%} of the last hidden layer's units, least active on that data, from the FedAvg
run's model; sanitisation drops training examples whose label the global model gives probability
< {s['sanitize_min_label_prob']:g}. Sign flip sends -{s['sign_flip_scale']:g} x the update, Gaussian noise of
norm {s['gaussian_norm_in_honest_updates']:g} honest updates, IPM -{s['ipm_epsilon']:g} x the mean, ALIE Baruch et al.'s
z_max, Fang's attack its Krum variant against Krum / Multi-Krum / Bulyan and its trimmed-mean
variant otherwise. Edge cases: the {1 - s['edge_quantile']:.0%} least dense inputs of the source class
(k-NN), labelled with the target; the tail is held out of every honest client in every cell, so all
cells share data. Backdoor triggers: a 3x3 white patch on BreastMNIST, two z-scored features set
to +3 on Fed-Heart-Disease (`configs/breastmnist_attack.py`, `configs/heart_disease_attack.py`).
Cross-check: one cell per federation (backdoor + PGD + replacement vs median) rerun through the
config-driven `attack_defense` builder gives the same model (max |difference| {check})."""


def tables_markdown(doc: dict) -> str:
  text = ["![accuracy and ASR heatmaps](img/security_tables.png)\n"]
  for res in doc["federations"]:
    text.append(f"### {res['label']}\n")
    text.append("Accuracy / ASR:\n")
    text.append(table_markdown(res) + "\n")
    text.append("Detection (TPR / FPR):\n")
    text.append(detection_markdown(res) + "\n")
    text.append("Honest clients rejected without attack, most vs least label-skewed quarter:\n")
    text.append(fpr_markdown(res) + "\n")
    if len(res["label_skew"]) <= 10:
      text.append("Per client, rejection rate without attack:\n")
      text.append(per_client_markdown(res) + "\n")
  text.append("![honest rejection vs label skew](img/security_fpr_skew.png)")
  return "\n".join(text)


SUMMARY_ROWS = [  # (label, setting, attack, metric)
    ("Breast device, no attack (acc)", "breastmnist_device", "none", "accuracy"),
    ("Breast device, backdoor black-box (ASR)", "breastmnist_device", "backdoor", "asr_backdoor"),
    ("Breast device, PGD+replacement (ASR)", "breastmnist_device", "backdoor+pgd+repl", "asr_backdoor"),
    ("Breast device, ALIE (acc)", "breastmnist_device", "alie", "accuracy"),
    ("Breast silo, PGD+replacement (ASR)", "breastmnist_silo", "backdoor+pgd+repl", "asr_backdoor"),
    ("Heart, backdoor black-box (ASR)", "heart_silo", "backdoor", "asr_backdoor"),
    ("Heart, PGD+replacement (ASR)", "heart_silo", "backdoor+pgd+repl", "asr_backdoor"),
    ("Heart, sign flip x5 (acc)", "heart_silo", "sign_flip", "accuracy"),
]
SUMMARY_COLS = [("mean", "mean"), ("norm_bound", "norm_bound"), ("weak_dp", "weak_dp"), ("krum", "krum"),
                ("median", "median"), ("trimmed_mean", "trim_mean"), ("geometric_median", "RFA"),
                ("bulyan", "bulyan"), ("clustering", "clustering"), ("autoencoder", "autoenc"), ("lrr", "lrr"),
                ("pruning", "pruning")]


def _short(v: float) -> str:
  if not np.isfinite(v):
    return "n/a"
  s = f"{v:.2f}"
  return s[1:] if s.startswith("0.") else s


def summary_markdown(doc: dict) -> str:
  """README: a few rows of the grid and the claims sentence, all from the JSON."""
  feds = {r["setting"]: r for r in doc["federations"]}
  lines = ["| setting / attack | " + " | ".join(c for _, c in SUMMARY_COLS) + " |",
           "|---" * (len(SUMMARY_COLS) + 1) + "|"]
  for label, setting, attack, metric in SUMMARY_ROWS:
    if setting not in feds:
      continue
    lines.append(f"| {label} | " + " | ".join(_short(cell(feds[setting], attack, d, metric)) for d, _ in SUMMARY_COLS)
                 + " |")
  seeds = ", ".join(map(str, doc["federations"][0]["seeds"]))
  minutes = sum(r["wall_time_s"] for r in doc["federations"]) / 60
  lines.append("")
  lines.append(f"Mean over seeds {seeds} (accuracy, or backdoor attack success rate), `{doc['command']}` "
               f"({minutes:.0f} min, {doc['machine']}, {doc['date']}).")
  lines.append("")
  lines.append(headline(doc))
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The discussion: every figure and every comparison word is computed from the JSON.

MARGIN = 0.05  # ASR / rate differences below this are called "about the same"


def _cmp(a: float, b: float, more: str, less: str, same: str) -> str:
  if not (np.isfinite(a) and np.isfinite(b)):
    return "cannot be compared with"
  return more if a > b + MARGIN else less if a < b - MARGIN else same


def _seed_sd(res: dict, attack: str = "none", defense: str = "mean", key: str = "accuracy") -> float:
  per = res["cells"].get(f"{attack}|{defense}") or []
  v = np.array([m[key] for m in per], np.float64)
  return float(np.nanstd(v)) if len(v) > 1 else float("nan")


def _f(v: float) -> str:
  return "n/a" if not np.isfinite(v) else f"{v:.2f}"


def discussion_markdown(doc: dict) -> str:
  feds = {r["setting"]: r for r in doc["federations"]}
  breast = [r for r in doc["federations"] if r["setting"].startswith("breastmnist")]
  heart = feds.get("heart_silo")
  out = [f"What the committed run (seeds {', '.join(map(str, doc['federations'][0]['seeds']))}) shows; "
         f"each comparison word below is computed from the numbers (differences under {MARGIN:.2f} are "
         "called about the same). Seed-to-seed sd of clean FedAvg accuracy: " +
         ", ".join(f"{r['setting']} {_f(_seed_sd(r))}" for r in doc["federations"]) + ".", ""]

  # 1. PGD + model replacement vs FedAvg.
  parts = []
  for r in breast + ([heart] if heart else []):
    repl, bb, pgd = (cell(r, a, "mean", "asr_backdoor") for a in ("backdoor+pgd+repl", "backdoor", "backdoor+pgd"))
    pre = mean_of(r["pretrained"], "asr_backdoor")
    verdict = _cmp(repl, max(bb, pgd), "above", "below", "about the same as")
    parts.append(f"{r['setting']}: ASR {_f(repl)}, {verdict} the stronger of black-box poisoning ({_f(bb)}) and "
                 f"PGD alone ({_f(pgd)}); pre-trained model {_f(pre)}")
  out.append("1. **PGD + model replacement against FedAvg near convergence.** " + "; ".join(parts) + ".")

  # 2. Norm bounding and weak DP.
  parts = []
  for r in doc["federations"]:
    repl = cell(r, "backdoor+pgd+repl", "mean", "asr_backdoor")
    pgd = cell(r, "backdoor+pgd", "mean", "asr_backdoor")
    nb, dp = cell(r, "backdoor+pgd+repl", "norm_bound", "asr_backdoor"), cell(r, "backdoor+pgd+repl", "weak_dp", "asr_backdoor")
    acc0, acc_nb = cell(r, "none", "mean"), cell(r, "none", "norm_bound")
    parts.append(f"{r['setting']}: {_f(nb)} / {_f(dp)} against {_f(repl)} under FedAvg "
                 f"({_cmp(repl, nb, 'a cut', 'an increase', 'no change')}; "
                 f"{_cmp(nb, pgd, 'above', 'below', 'about')} the PGD-alone level {_f(pgd)}), clean accuracy "
                 f"{_f(acc_nb)} with the bound vs {_f(acc0)}")
  out.append("2. **Norm bounding / weak DP against PGD + replacement**, backdoor ASR: " + "; ".join(parts) + ".")

  # 3. Detection vs edge-case attackers.
  parts = []
  for r in doc["federations"]:
    dets = [d for d in ("clustering", "autoencoder", "lrr") if f"edge_case+pgd|{d}" in r["cells"]]
    if not dets:
      continue
    tp = lambda a, d: cell(r, a, d, "tpr")
    missed = [d for d in dets if tp("edge_case+pgd", d) <= tp("none", d) + MARGIN]
    parts.append(f"{r['setting']}: TPR " + ", ".join(
        f"{d} {_f(tp('backdoor+pgd+repl', d))} -> {_f(tp('edge_case+pgd', d))} (attackers honest {_f(tp('none', d))})"
        for d in dets) + f"; edge case + PGD is caught no more often than honest behaviour by "
        f"{len(missed)} of {len(dets)} detectors" + (f" ({', '.join(missed)})" if missed else "") +
        f"; edge-case ASR under FedAvg {_f(cell(r, 'edge_case+pgd', 'mean', 'asr_edge'))} vs the pre-trained "
        f"model's {_f(mean_of(r['pretrained'], 'asr_edge'))}")
  out.append("3. **Anomaly detection, backdoor + PGD + replacement -> edge case + PGD.** " + "; ".join(parts) +
             ". A detector whose edge-case TPR equals its honest-attacker rate does not detect the attack; an "
             "edge-case ASR near the pre-trained model's means the attack itself did little in these rounds.")

  # 4. Detection removes diverse honest clients.
  parts = []
  for r in doc["federations"]:
    pairs = [(d, *honest_fpr_by_skew(r, d)) for d in ("clustering", "autoencoder", "lrr", "multi_krum", "bulyan")]
    pairs = [p for p in pairs if np.isfinite(p[1])]
    more = [d for d, hi, lo in pairs if hi > lo + MARGIN]
    parts.append(f"{r['setting']}: " + ", ".join(f"{d} {_f(hi)} vs {_f(lo)}" for d, hi, lo in pairs) +
                 f" ({len(more)} of {len(pairs)} reject the most skewed quarter more often)")
  out.append("4. **Honest clients rejected without any attack, most vs least label-skewed quarter.** " +
             "; ".join(parts) + ".")

  # 5. Robust rules and post-hoc defences vs the replacement backdoor.
  parts = []
  for r in doc["federations"]:
    robust = [cell(r, "backdoor+pgd+repl", d, "asr_backdoor") for d in
              ("krum", "median", "trimmed_mean", "geometric_median", "bulyan")]
    robust = [v for v in robust if np.isfinite(v)]
    bb, repl = cell(r, "backdoor", "mean", "asr_backdoor"), cell(r, "backdoor+pgd+repl", "mean", "asr_backdoor")
    pbb, prepl = cell(r, "backdoor", "pruning", "asr_backdoor"), cell(r, "backdoor+pgd+repl", "pruning", "asr_backdoor")
    lf, lfs = cell(r, "label_flip", "mean"), cell(r, "label_flip", "sanitize")
    sbb = cell(r, "backdoor", "sanitize", "asr_backdoor")
    parts.append(f"{r['setting']}: robust rules {_f(min(robust))}-{_f(max(robust))} (FedAvg {_f(repl)}); pruning "
                 f"{_f(bb)} -> {_f(pbb)} black-box, {_f(repl)} -> {_f(prepl)} PGD + replacement; sanitisation: "
                 f"label-flip accuracy {_f(lf)} -> {_f(lfs)}, black-box backdoor ASR {_f(bb)} -> {_f(sbb)}")
  out.append("5. **Robust rules (Krum, median, trimmed mean, RFA, Bulyan where they run), pruning and sanitisation "
             "against the backdoors**, ASR: " + "; ".join(parts) + ".")

  # 6. Untargeted attacks from a converged model.
  parts = []
  for r in doc["federations"]:
    clean = cell(r, "none", "mean")
    sf = cell(r, "sign_flip", "mean")
    repaired = [d for d in ("median", "trimmed_mean", "geometric_median", "krum", "bulyan")
                if np.isfinite(cell(r, "sign_flip", d)) and cell(r, "sign_flip", d) >= clean - MARGIN]
    worst = []
    for a in ("gaussian", "alie", "ipm", "fang"):
      drops = [(cell(r, "none", d) - cell(r, a, d), d) for d in RULES if np.isfinite(cell(r, a, d))]
      if drops:
        worst.append((max(drops)[0], a, max(drops)[1]))
    big = max(worst) if worst else (float("nan"), "", "")
    parts.append(f"{r['setting']}: sign flip x5 takes FedAvg from {_f(clean)} to {_f(sf)}, "
                 f"{len(repaired)} robust rules stay within {MARGIN:.2f} of clean ({', '.join(repaired) or 'none'}); "
                 f"the largest accuracy drop from Gaussian / ALIE / IPM / Fang under any aggregation rule is "
                 f"{_f(big[0])} ({big[1]} vs {big[2]})")
  out.append("6. **Untargeted attacks** (10% attackers for the attack rounds, from the converged model): " +
             "; ".join(parts) + ". Fang et al. and Baruch et al. report large damage when attacking from the "
             "first round; this grid measures the near-convergence regime only.")
  return "\n".join(out)


def headline(doc: dict) -> str:
  """One generated sentence for the README."""
  feds = {r["setting"]: r for r in doc["federations"]}
  b = [r for r in doc["federations"] if r["setting"].startswith("breastmnist")]
  repl = " / ".join(_f(cell(r, "backdoor+pgd+repl", "mean", "asr_backdoor")) for r in b)
  bb = " / ".join(_f(cell(r, "backdoor", "mean", "asr_backdoor")) for r in b)
  nb = " / ".join(_f(cell(r, "backdoor+pgd+repl", "norm_bound", "asr_backdoor")) for r in b)
  dev = feds.get("breastmnist_device")
  det = ""
  if dev:
    ds = [d for d in ("clustering", "autoencoder", "lrr") if f"edge_case+pgd|{d}" in dev["cells"]]
    det = (" Cross-device detection TPR (" + "/".join(ds) + "): backdoor + PGD + replacement " +
           "/".join(_f(cell(dev, "backdoor+pgd+repl", d, "tpr")) for d in ds) + ", edge case + PGD " +
           "/".join(_f(cell(dev, "edge_case+pgd", d, "tpr")) for d in ds) + ", attackers behaving honestly " +
           "/".join(_f(cell(dev, "none", d, "tpr")) for d in ds) + ".")
  return (f"BreastMNIST ({' / '.join(r['setting'] for r in b)}): PGD + model replacement against FedAvg reaches "
          f"backdoor ASR {repl} (black-box poisoning {bb}); with norm bounding {nb}." + det +
          " The numbered discussion in docs/security.md is generated from the same JSON.")


def _claims_section() -> str:
  doc = load()
  return claims_markdown(doc["federations"]) + "\n" + discussion_markdown(doc)


report.register("security_setup", lambda: setup_markdown(load()), sources=(RESULTS,))
report.register("security_claims", _claims_section, sources=(RESULTS,))
report.register("security_tables", lambda: tables_markdown(load()), sources=(RESULTS,))
report.register("security_summary", lambda: summary_markdown(load()), sources=(RESULTS,))
