"""Defence sweep for gradient inversion: which mitigation stops the server reading the data back?

Every row is one ``inversion`` run (``fedjax_health.attacks.inversion_run.attack_round``): one
FedAvg round of the engine over real victims, the server's recorded updates attacked all at once.
The base settings are ``configs/inversion_breastmnist.py`` (BreastMNIST at 16x16, sigmoid LeNet,
one image per upload, one local SGD step, Inverting Gradients) and
``configs/inversion_heart_disease.py`` (one patient record per upload, 13-32-1 sigmoid MLP); each
row changes ONE thing: local DP noise (``privacy.dp.local_gaussian``), batch size, local steps,
input resolution, activation, model, a pretrained model, or secure aggregation (the server sees
only the mean of k updates).

Writes ``results/inversion_sweep.{json,md}``, ``results/inversion_sweep/*.npz`` and the figures
``docs/img/inversion_sweep.png``, ``docs/img/inversion_grid.png``. ~12 min on 2 CPU cores.

  nice -n 10 python experiments/inversion_sweep.py [--victims=32] [--only=breast|heart] [--replot]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

from fedjax_health.attacks import inversion_metrics as im
from fedjax_health.attacks import inversion_run as ir
from fedjax_health.config_validation import validate_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DP_CLIP = 0.1  # update norms of one SGD step (lr 0.1) are ~0.1-0.2, so clipping binds for most victims

IMAGE_ROWS = [
    ("none", "no defence (base)", {}),
    ("DP noise z", "z = 1e-4", {"inversion.clip_norm": DP_CLIP, "inversion.noise_multiplier": 1e-4}),
    ("DP noise z", "z = 1e-3", {"inversion.clip_norm": DP_CLIP, "inversion.noise_multiplier": 1e-3}),
    ("DP noise z", "z = 1e-2", {"inversion.clip_norm": DP_CLIP, "inversion.noise_multiplier": 1e-2}),
    ("DP noise z", "z = 1e-1", {"inversion.clip_norm": DP_CLIP, "inversion.noise_multiplier": 1e-1}),
    ("DP noise z", "z = 1", {"inversion.clip_norm": DP_CLIP, "inversion.noise_multiplier": 1.0}),
    ("batch size", "B = 2", {"inversion.batch_size": 2}),
    ("batch size", "B = 4", {"inversion.batch_size": 4}),
    ("batch size", "B = 8", {"inversion.batch_size": 8}),
    ("local steps", "2 steps", {"inversion.local_steps": 2}),
    ("local steps", "5 steps", {"inversion.local_steps": 5}),
    ("local steps", "10 steps", {"inversion.local_steps": 10}),
    ("local steps", "5 steps, not unrolled", {"inversion.local_steps": 5, "inversion.unroll": False}),
    ("resolution", "8x8", {"inversion.resolution": 8}),
    ("resolution", "28x28 (native)", {"inversion.resolution": 28}),
    ("activation", "ReLU", {"model.activation": "relu"}),
    ("activation", "tanh", {"model.activation": "tanh"}),
    ("model", "MLP 256-64-2 sigmoid", {"model.name": "mlp", "model.hidden": (64,), "model.activation": "sigmoid"}),
    ("model", "CNN (8,16)-32 ReLU, max-pool", {"model.name": "cnn", "model.features": (8, 16), "model.dense": 32,
                                               "model.activation": "relu"}),
    ("model", "LeNet after 5 FedAvg rounds", {"inversion.pretrain_rounds": 5}),
    ("secure aggregation", "mean of 2", {"inversion.secure_agg_group": 2}),
    ("secure aggregation", "mean of 4", {"inversion.secure_agg_group": 4}),
    ("secure aggregation", "mean of 8", {"inversion.secure_agg_group": 8}),
    ("dataset", "RetinaMNIST (RGB, 5 classes)", {"dataset.name": "retinamnist"}),
]

RECORD_ROWS = [
    ("none", "no defence (base)", {}),
    ("DP noise z", "z = 1e-3", {"inversion.clip_norm": DP_CLIP, "inversion.noise_multiplier": 1e-3}),
    ("DP noise z", "z = 1e-2", {"inversion.clip_norm": DP_CLIP, "inversion.noise_multiplier": 1e-2}),
    ("DP noise z", "z = 1e-1", {"inversion.clip_norm": DP_CLIP, "inversion.noise_multiplier": 1e-1}),
    ("batch size", "B = 4", {"inversion.batch_size": 4}),
    ("local steps", "5 steps", {"inversion.local_steps": 5}),
    ("model", "logistic regression", {"model.name": "logreg"}),
    ("secure aggregation", "mean of 4", {"inversion.secure_agg_group": 4}),
]

GRID_ROWS = ["no defence (base)", "ReLU", "5 steps", "z = 1e-4", "z = 1e-3"]


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def make_config(name: str, overrides: dict, victims: int):
  config = load_config(name)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  c = config.inversion
  # Same number of attacked examples in every row: fewer uploads when each holds more examples.
  c.num_victims = max(c.secure_agg_group, victims // c.batch_size)
  validate_config(config)
  return config


def slug(name: str, group: str, label: str) -> str:
  return f"{name}_{group}_{label}".replace(" ", "_").replace("/", "-").replace(",", "")


def reference_row(name: str, victims: int) -> dict:
  """Returns what an attacker gets WITHOUT the update: the train-set mean image / mean record as the guess."""
  config = make_config(name, {}, victims)
  data = ir.load_target_data(config)
  _, x, y = ir.victim_dataset(data.train, config.inversion.num_victims, 1, np.random.default_rng(config.seed))
  guess = np.broadcast_to(data.train.x.mean(0), x.shape).astype(np.float32)
  row = {"target": name, "group": "reference", "setting": "guess the train mean (no attack)", "seconds": 0.0,
         "num_attacks": int(x.shape[0]), "examples_per_attack": 1}
  if x.ndim == 5:
    m = im.image_metrics(guess, x)
    row.update(psnr_mean=float(m["psnr"].mean()), psnr_median=float(np.median(m["psnr"])), ssim_mean=float(m["ssim"].mean()),
               label_accuracy=float(np.mean(y == np.bincount(data.train.y).argmax())))
  else:
    m = im.record_metrics(guess, x, config.inversion.record_tolerance)
    row.update(feature_mae=float(m["abs_error"].mean()), recovered_fraction=float(m["recovered"].mean()),
               label_accuracy=float(np.mean(y == np.bincount(data.train.y).argmax())))
  return row


def load_rows(rows_json: list[dict], out_dir: str) -> list[dict]:
  """Returns saved rows with their arrays reattached (``--replot``)."""
  for row in rows_json:
    if row["group"] != "reference":
      with np.load(os.path.join(out_dir, f"{slug(row['target'], row['group'], row['setting'])}.npz")) as f:
        row["_arrays"] = dict(f)
  return rows_json


def run_rows(name: str, rows, victims: int, out_dir: str) -> list[dict]:
  results = []
  for group, label, overrides in rows:
    config = make_config(name, overrides, victims)
    t0 = time.time()
    out = ir.attack_round(config, log=lambda s: None)
    row = {"target": name, "group": group, "setting": label, "seconds": round(time.time() - t0, 1)}
    row.update({k: v for k, v in out.items() if isinstance(v, (int, float))})
    results.append(row)
    np.savez_compressed(os.path.join(out_dir, f"{slug(name, group, label)}.npz"),
                        **{k: v for k, v in out.items() if isinstance(v, np.ndarray)})
    row["_arrays"] = out
    print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
  return results


def _fmt(v, spec=".1f"):
  return "-" if v is None else format(v, spec)


def markdown(image_rows, record_rows) -> str:
  lines = []
  if image_rows:
    lines += ["| defence | setting | PSNR mean (dB) | PSNR median | SSIM | label acc. | eps (one upload) | attacks x examples | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in image_rows:
      eps = r.get("epsilon_one_upload")
      lines.append(f"| {r['group']} | {r['setting']} | {r['psnr_mean']:.1f} | {r['psnr_median']:.1f} | "
                   f"{r['ssim_mean']:.3f} | {r['label_accuracy']:.2f} | {_fmt(eps, '.3g')} | "
                   f"{r['num_attacks']} x {r['examples_per_attack']} | {r['seconds']:.0f} |")
  if record_rows:
    lines += ["", "| defence | setting | records recovered (all 13 features within 0.25 sd) | feature MAE (sd) | "
              "label acc. | eps (one upload) | attacks x examples | s |", "|---|---|---|---|---|---|---|---|"]
    for r in record_rows:
      eps = r.get("epsilon_one_upload")
      lines.append(f"| {r['group']} | {r['setting']} | {r['recovered_fraction']:.2f} | {r['feature_mae']:.3g} | "
                   f"{r['label_accuracy']:.2f} | {_fmt(eps, '.3g')} | {r['num_attacks']} x {r['examples_per_attack']} | "
                   f"{r['seconds']:.0f} |")
  return "\n".join(lines)


def plot_sweep(image_rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  base = next(r for r in image_rows if r["group"] == "none")
  ref = next((r for r in image_rows if r["group"] == "reference"), None)
  groups = [g for g in dict.fromkeys(r["group"] for r in image_rows) if g not in ("none", "dataset", "reference")]
  fig, axes = plt.subplots(2, 4, figsize=(15, 6.4))
  for ax, group in zip(axes.ravel(), groups):
    rows = [base] + [r for r in image_rows if r["group"] == group]
    labels = ["base"] + [r["setting"] for r in rows[1:]]
    psnr = [r["psnr_mean"] for r in rows]
    ax.bar(range(len(rows)), psnr, color=["#999999"] + ["#3b75af"] * (len(rows) - 1))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("PSNR (dB)", fontsize=8)
    ax.set_title(group, fontsize=9)
    ax.set_ylim(0, max(r["psnr_mean"] for r in image_rows) * 1.15)
    if ref is not None:
      ax.axhline(ref["psnr_mean"], ls="--", lw=0.8, color="k")
      ax.text(len(rows) - 0.5, ref["psnr_mean"] + 1, "mean image", fontsize=6, ha="right")
    ax2 = ax.twinx()
    ax2.plot(range(len(rows)), [r["ssim_mean"] for r in rows], "o-", color="#d1603d", ms=3)
    ax2.set_ylim(0, 1.05)
    ax2.tick_params(labelsize=7)
    if ax in axes[:, -1] or group == groups[-1]:
      ax2.set_ylabel("SSIM", fontsize=8, color="#d1603d")
  for ax in axes.ravel()[len(groups):]:
    ax.axis("off")
  fig.suptitle("Inverting Gradients on one FedAvg round, BreastMNIST 16x16, sigmoid LeNet (bars: PSNR, dots: SSIM; "
               "dashed: PSNR of guessing the mean image)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_grid(image_rows, path: str, n: int = 8) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  by_label = {r["setting"]: r["_arrays"] for r in image_rows if r["target"] == "inversion_breastmnist" and "_arrays" in r}
  shown = [s for s in GRID_ROWS if s in by_label]
  base = by_label[shown[0]]
  fig, axes = plt.subplots(len(shown) + 1, n, figsize=(1.05 * n, 1.15 * (len(shown) + 1)))
  for i in range(n):
    axes[0, i].imshow(base["x_true"][i, 0, ..., 0], cmap="gray", vmin=0, vmax=1)
    for j, s in enumerate(shown, 1):
      out = by_label[s]
      rec = im.reorder(out["x_rec"], out["perm"])[i, 0, ..., 0]
      axes[j, i].imshow(np.clip(rec, 0, 1), cmap="gray", vmin=0, vmax=1)
      axes[j, i].set_xlabel(f"{out['psnr'][i, 0]:.0f} dB", fontsize=6, labelpad=1)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  for j, s in enumerate(["original"] + shown):
    axes[j, 0].set_ylabel(s.replace(" (base)", ""), fontsize=6)
  fig.tight_layout(pad=0.3)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--victims", type=int, default=32, help="examples attacked per row")
  ap.add_argument("--only", default="", help="breast | heart (default: both)")
  ap.add_argument("--replot", action="store_true", help="redraw table and figures from results/ (no attacks)")
  args = ap.parse_args()
  out_dir = os.path.join(ROOT, "results", "inversion_sweep")
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  if args.replot:
    with open(os.path.join(ROOT, "results", "inversion_sweep.json")) as f:
      saved = json.load(f)
    image_rows, record_rows = load_rows(saved["images"], out_dir), load_rows(saved["records"], out_dir)
  else:
    image_rows = record_rows = []
    if args.only != "heart":
      image_rows = [reference_row("inversion_breastmnist", args.victims)]
      image_rows += run_rows("inversion_breastmnist", IMAGE_ROWS, args.victims, out_dir)
    if args.only != "breast":
      record_rows = [reference_row("inversion_heart_disease", args.victims)]
      record_rows += run_rows("inversion_heart_disease", RECORD_ROWS, args.victims, out_dir)
  table = markdown(image_rows, record_rows)
  print(table)
  print(f"total {time.time() - t0:.0f}s")
  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
  with open(os.path.join(ROOT, "results", "inversion_sweep.json"), "w") as f:
    json.dump({"images": strip(image_rows), "records": strip(record_rows)}, f, indent=2)
  with open(os.path.join(ROOT, "results", "inversion_sweep.md"), "w") as f:
    f.write(table + "\n")
  if image_rows:
    os.makedirs(os.path.join(ROOT, "docs", "img"), exist_ok=True)
    plot_sweep(image_rows, os.path.join(ROOT, "docs", "img", "inversion_sweep.png"))
    plot_grid(image_rows, os.path.join(ROOT, "docs", "img", "inversion_grid.png"))


if __name__ == "__main__":
  main()
