"""Inversion defaults at native MedMNIST resolution (28x28, RetinaMNIST RGB and BreastMNIST gray).

Issue 15: the 16x16-tuned defaults (200 iterations, TV weight 1e-6) were reported to fall below the
mean-image guess at native 28x28 RGB. This runs Inverting Gradients (``configs/inversion_breastmnist.py``
with ``inversion.resolution=0``; the dataset swapped for RetinaMNIST in the RGB rows) for a few
(iterations, TV weight) settings on the same victims and the mean-image reference, and writes
``docs/inversion_native.json``; ``experiments/report.py`` renders the table in ``docs/inversion_native.md``
and the sentence in docs/inversion.md from it.

  nice -n 10 python experiments/inversion_native.py --victims 8      # ~10-20 min on 2 busy CPU cores
  python experiments/inversion_native.py --report_only               # rebuild the table from the JSON
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import inversion_sweep as sweep, report  # noqa: E402

DATASETS = {"retinamnist (28x28 RGB)": {"dataset.name": "retinamnist"}, "breastmnist (28x28 gray)": {}}
SETTINGS = [  # (label, overrides): the earlier defaults first
    ("200 it, TV 1e-6 (16x16 defaults)", {"inversion.num_steps": 200, "inversion.tv_weight": 1e-6}),
    ("200 it, TV 1e-4", {"inversion.num_steps": 200, "inversion.tv_weight": 1e-4}),
    ("500 it, TV 1e-6", {"inversion.num_steps": 500, "inversion.tv_weight": 1e-6}),
    ("500 it, TV 1e-4", {"inversion.num_steps": 500, "inversion.tv_weight": 1e-4}),
]
JSON = os.path.join(ROOT, "docs", "inversion_native.json")
MD = os.path.join(ROOT, "docs", "inversion_native.md")


def run(victims: int, only: str, settings: list[int]) -> list[dict]:
  from fedjax_health.attacks import inversion_run as ir  # pylint: disable=import-outside-toplevel
  rows = []
  for ds_label, ds_over in DATASETS.items():
    if only and only not in ds_label:
      continue
    base = {"inversion.resolution": 0, **ds_over}
    config = sweep.make_config("inversion_breastmnist", base, victims)
    data = ir.load_target_data(config)
    ref = _reference(config, data)
    rows.append({"dataset": ds_label, "setting": "guess the train mean (no attack)", **ref})
    print(json.dumps(rows[-1]), flush=True)
    for label, over in [SETTINGS[i] for i in settings]:
      config = sweep.make_config("inversion_breastmnist", {**base, **over}, victims)
      t0 = time.time()
      out = ir.attack_round(config, log=lambda s: None, data=data)
      rows.append({"dataset": ds_label, "setting": label, "psnr_mean": out["psnr_mean"],
                   "psnr_median": out["psnr_median"], "ssim_mean": out["ssim_mean"],
                   "label_accuracy": out["label_accuracy"], "num_attacks": out["num_attacks"],
                   "seconds": round(time.time() - t0, 1)})
      print(json.dumps(rows[-1]), flush=True)
      _save(rows)  # after every row: a long run stopped early keeps what it measured
  return rows


def _save(rows: list[dict]) -> None:
  with open(JSON, "w") as f:
    json.dump(rows, f, indent=1)


def _reference(config, data) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fedjax_health.attacks import inversion_metrics as im  # pylint: disable=import-outside-toplevel
  from fedjax_health.attacks import inversion_run as ir  # pylint: disable=import-outside-toplevel
  _, x, _ = ir.victim_dataset(data.train, config.inversion.num_victims, 1, np.random.default_rng(config.seed))
  guess = np.broadcast_to(data.train.x.mean(0), x.shape).astype(np.float32)
  m = im.image_metrics(guess, x)
  return {"psnr_mean": float(m["psnr"].mean()), "psnr_median": float(np.median(m["psnr"])),
          "ssim_mean": float(m["ssim"].mean()), "label_accuracy": float("nan"), "num_attacks": int(x.shape[0]),
          "seconds": 0.0}


def markdown(rows: list[dict]) -> str:
  lines = ["| dataset | setting | PSNR mean (dB) | PSNR median | SSIM | label acc. | attacks | s |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    acc = "-" if r["label_accuracy"] != r["label_accuracy"] else f"{r['label_accuracy']:.2f}"
    lines.append(f"| {r['dataset']} | {r['setting']} | {r['psnr_mean']:.1f} | {r['psnr_median']:.1f} | "
                 f"{r['ssim_mean']:.3f} | {acc} | {r['num_attacks']} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def findings(rows: list[dict]) -> str:
  """The native-resolution comparison in words, computed from the rows."""
  out = []
  for ds in dict.fromkeys(r["dataset"] for r in rows):
    rs = [r for r in rows if r["dataset"] == ds]
    ref = next((r for r in rs if r["setting"].startswith("guess")), None)
    att = [r for r in rs if r is not ref]
    if ref is None or not att:
      continue
    above = [r for r in att if r["psnr_mean"] > ref["psnr_mean"]]
    best = max(att, key=lambda r: r["psnr_mean"])
    out.append(f"{ds}: {len(above)} of {len(att)} settings stay above the mean-image guess "
               f"({ref['psnr_mean']:.1f} dB mean PSNR); best {best['setting']} at {best['psnr_mean']:.1f} dB "
               f"(SSIM {best['ssim_mean']:.3f}); {min(r['num_attacks'] for r in att)} victims per row, so the "
               f"differences are indicative.")
  return " ".join(out)


def _rows() -> list[dict]:
  with open(JSON) as f:
    return json.load(f)


report.register("inversion_native", lambda: markdown(_rows()), sources=(JSON,))
report.register("inversion_native_findings", lambda: findings(_rows()), sources=(JSON,))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--victims", type=int, default=8)
  ap.add_argument("--only", default="", help="retinamnist | breastmnist (default: both)")
  ap.add_argument("--settings", default="", help="comma-separated indices into SETTINGS (default: all)")
  ap.add_argument("--report_only", action="store_true", help="rebuild the table from docs/inversion_native.json")
  args = ap.parse_args()
  if args.report_only:
    with open(JSON) as f:
      rows = json.load(f)
  else:
    settings = [int(i) for i in args.settings.split(",")] if args.settings else list(range(len(SETTINGS)))
    rows = run(args.victims, args.only, settings)
    _save(rows)
  report.update_all(names=("inversion_native", "inversion_native_findings"))
  print(markdown(rows))


if __name__ == "__main__":
  main()
