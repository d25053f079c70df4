"""Defence sweep for gradient inversion: which mitigation stops the server reading the data back?

Every row is one ``inversion`` run (``fedjax_health.attacks.inversion_run.attack_round``): one
FedAvg round of the engine over real victims, the server's recorded updates attacked all at once.
The base settings are ``configs/inversion_breastmnist.py`` (BreastMNIST at 16x16, sigmoid LeNet,
one image per upload, one local SGD step, Inverting Gradients) and
``configs/inversion_heart_disease.py`` (one patient record per upload, 13-32-1 sigmoid MLP); each
row changes ONE thing: local DP noise (``privacy.dp.local_gaussian``), batch size, local steps,
input resolution, activation, model, a pretrained model, or secure aggregation (the server sees
only the mean of k updates).

Writes the small committed ``docs/results/inversion_sweep.json`` (every row's metrics, the
command, date and machine; the tables, findings and README summary of docs/inversion.md are
generated from it by ``experiments/report.py``), ``results/inversion_sweep/*.npz`` (the
reconstructions, not committed) and the figures ``docs/img/inversion_sweep.png``,
``docs/img/inversion_grid.png``. ~12 min on 2 CPU cores.

  nice -n 19 python experiments/inversion_sweep.py [--victims=32] [--only=breast|heart] [--replot]
  python experiments/inversion_sweep.py --report_only    # the generated sections from the JSON only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402

RESULTS = os.path.join(ROOT, "docs", "results", "inversion_sweep.json")
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
  from fedjax_health.config_validation import validate_config
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
  from fedjax_health.attacks import inversion_metrics as im
  from fedjax_health.attacks import inversion_run as ir
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
  from fedjax_health.attacks import inversion_run as ir
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
  from fedjax_health.attacks import inversion_metrics as im
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


# ----------------------------------------------------------------------------------------------
# The committed result file and the generated sections (json only).


def write_results(image_rows, record_rows, meta: dict, path: str = RESULTS) -> None:
  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report.rounded(dict(meta, images=strip(image_rows), records=strip(record_rows)), 6), f, indent=1)
    f.write("\n")


def load_results(path: str = RESULTS) -> dict:
  with open(path) as f:
    return json.load(f)


def _row(rows, setting: str) -> dict | None:
  return next((r for r in rows if r["setting"] == setting), None)


def _name(r: dict) -> str:
  prefix = {"DP noise z": "DP ", "batch size": "batch ", "secure aggregation": "secure aggregation, "}
  return prefix.get(r["group"], "") + r["setting"]


def _caption(doc: dict, which: str) -> str:
  rows = doc[which]
  total = sum(r["seconds"] for r in rows)
  return (f"Generated from `docs/results/inversion_sweep.json` (`{doc['command'].strip()}`, {doc['date']}, "
          f"{doc['machine']}; {total / 60:.0f} min of attacks for these rows).")


def render_images() -> str:
  doc = load_results()
  return markdown(doc["images"], []) + "\n\n" + _caption(doc, "images")


def render_records() -> str:
  doc = load_results()
  return markdown([], doc["records"]).lstrip("\n") + "\n\n" + _caption(doc, "records")


def findings(doc: dict) -> str:
  """The bullets under the tables; every figure and comparison computed from the rows."""
  img, rec = doc["images"], doc["records"]
  ref, base = _row(img, "guess the train mean (no attack)"), _row(img, "no defence (base)")
  rref, rbase = _row(rec, "guess the train mean (no attack)"), _row(rec, "no defence (base)")
  out = []
  if base and ref:
    out.append(f"* Unprotected single-example updates: images at {base['psnr_mean']:.1f} dB mean PSNR (SSIM "
               f"{base['ssim_mean']:.3f}; the mean-image guess gives {ref['psnr_mean']:.1f} dB), labels "
               f"{base['label_accuracy']:.2f} correct" +
               (f"; patient records: {rbase['recovered_fraction']:.0%} recovered, feature MAE "
                f"{rbase['feature_mae']:.2g} sd" if rbase else "") + ".")
  steps = [r for r in img if r["group"] == "local steps"]
  unrolled = [r for r in steps if "not unrolled" not in r["setting"]]
  flat = [r for r in steps if "not unrolled" in r["setting"]]
  if unrolled and base:
    out.append("* Local steps replayed by the server: " + ", ".join(f"{r['setting']} {r['psnr_mean']:.1f} dB"
                                                                    for r in unrolled) +
               f" (one step {base['psnr_mean']:.1f} dB)" +
               "".join(f"; treated as one gradient ({r['setting']}): {r['psnr_mean']:.1f} dB" for r in flat) + ".")
  other = [r for r in img if r["group"] in ("resolution", "activation", "model", "dataset")]
  if ref and other:
    above = [r for r in other if r["psnr_mean"] > ref["psnr_mean"]]
    out.append(f"* Resolution, activation, model and dataset changes: {len(above)} of {len(other)} rows stay above "
               f"the mean-image guess; lowest " +
               (lambda r: f"{r['setting']} ({r['psnr_mean']:.1f} dB, SSIM {r['ssim_mean']:.3f})")(
                   min(other, key=lambda r: r["psnr_mean"])) +
               ", highest " + (lambda r: f"{r['setting']} ({r['psnr_mean']:.1f} dB)")(
                   max(other, key=lambda r: r["psnr_mean"])) + ".")
  dp = [r for r in img if r["group"] == "DP noise z"]
  if dp and ref:
    first = next((r for r in dp if r["psnr_mean"] <= ref["psnr_mean"]), None)
    text = ("* Local DP noise on images: " + ", ".join(f"{r['setting']} {r['psnr_mean']:.1f} dB (eps "
                                                        f"{r['epsilon_one_upload']:.3g})" for r in dp) + ". ")
    text += (f"The first noise level at or below the mean-image guess is {first['setting']}, with a one-upload eps "
             f"of {first['epsilon_one_upload']:.3g}: the attack is stopped far from any meaningful guarantee"
             if first and first["epsilon_one_upload"] > 10 else
             f"The first noise level at or below the mean-image guess is {first['setting']}" if first else
             "No noise level brings PSNR down to the mean-image guess")
    strongest = dp[-1]
    text += f"; at {strongest['setting']} the labels are {strongest['label_accuracy']:.2f} correct."
    rdp = [r for r in rec if r["group"] == "DP noise z"]
    if rdp:
      text += (" Records: " + ", ".join(f"{r['setting']} {r['recovered_fraction']:.0%} recovered" for r in rdp) +
               " (the first layer of the record model sees the features directly; the sigmoid LeNet's first "
               "layer, which carries the pixels, gets a much smaller update than its head, so isotropic noise "
               "buries it first).")
    out.append(text)
  mix = [r for r in img if r["group"] in ("batch size", "secure aggregation")]
  if mix and ref:
    rmix = [r for r in rec if r["group"] in ("batch size", "secure aggregation")]
    out.append("* Several examples per update: " + ", ".join(
        f"{_name(r)} {r['psnr_mean']:.1f} dB" for r in mix) +
               f" (mean-image guess {ref['psnr_mean']:.1f} dB); records: " +
               ", ".join(f"{_name(r)} {r['recovered_fraction']:.0%} recovered" for r in rmix) +
               ". Mixing examples defeats this attacker, which is not a guarantee (stronger priors and batch "
               "label tricks exist in the literature).")
  if rref:
    out.append(f"* Reference for records: guessing the train-mean record recovers {rref['recovered_fraction']:.0%} "
               f"(feature MAE {rref['feature_mae']:.3g} sd).")
  return "\n".join(out)


README_ROWS = [  # (label, settings joined by " / ")
    ("guessing the mean training image (reference)", ["guess the train mean (no attack)"]),
    ("no defence", ["no defence (base)"]),
    ("DP noise z = 1e-4 / 1e-3 / 1", ["z = 1e-4", "z = 1e-3", "z = 1"]),
    ("batch 2 / 4 / 8", ["B = 2", "B = 4", "B = 8"]),
    ("10 local steps replayed / 5 steps not replayed", ["10 steps", "5 steps, not unrolled"]),
    ("ReLU / tanh (vs sigmoid)", ["ReLU", "tanh"]),
    ("secure aggregation: attacker sees the mean of 2 / 4 / 8", ["mean of 2", "mean of 4", "mean of 8"]),
]


def render_summary() -> str:
  doc = load_results()
  img, rec = doc["images"], doc["records"]
  lines = ["| setting | PSNR (dB) | SSIM | label acc. |", "|---|---|---|---|"]
  for label, settings in README_ROWS:
    rows = [_row(img, s) for s in settings]
    if any(r is None for r in rows):
      continue
    j = lambda key, fmt: " / ".join(format(r[key], fmt) for r in rows)
    lines.append(f"| {label} | {j('psnr_mean', '.1f')} | {j('ssim_mean', '.2f')} | {j('label_accuracy', '.2f')} |")
  text = "\n".join(lines) + "\n\n" + _caption(doc, "images")
  base = _row(rec, "no defence (base)")
  if base:
    protected = [r for r in rec if r["group"] in ("DP noise z", "batch size", "secure aggregation")
                 and r["recovered_fraction"] < 0.5]
    text += (f"\n\nPatient records (Fed-Heart-Disease): with no defence {base['recovered_fraction']:.0%} of "
             f"{base['num_attacks'] * base['examples_per_attack']} attacked records are recovered; " +
             ", ".join(f"{_name(r)}: {r['recovered_fraction']:.0%}" for r in protected) + ".")
  return text


report.register("inversion_images", render_images, sources=(RESULTS,))
report.register("inversion_records", render_records, sources=(RESULTS,))
report.register("inversion_findings", lambda: findings(load_results()), sources=(RESULTS,))
report.register("inversion_summary", render_summary, sources=(RESULTS,))
SECTIONS = ("inversion_images", "inversion_records", "inversion_findings", "inversion_summary")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--victims", type=int, default=32, help="examples attacked per row")
  ap.add_argument("--only", default="", help="breast | heart (default: both)")
  ap.add_argument("--replot", action="store_true", help="redraw table and figures from results/ (no attacks)")
  ap.add_argument("--report_only", action="store_true",
                  help="rebuild the generated sections from docs/results/inversion_sweep.json (no attacks)")
  args = ap.parse_args()
  if args.report_only:
    report.update_all(names=SECTIONS)
    print(markdown(load_results()["images"], load_results()["records"]))
    return
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
  if not args.replot and not args.only and image_rows and record_rows:
    write_results(image_rows, record_rows, report.provenance(
        "nice -n 19 python experiments/inversion_sweep.py " + " ".join(sys.argv[1:]), victims=args.victims,
        wall_s=round(time.time() - t0, 1)))
    report.update_all(names=SECTIONS)
  if image_rows:
    os.makedirs(os.path.join(ROOT, "docs", "img"), exist_ok=True)
    plot_sweep(image_rows, os.path.join(ROOT, "docs", "img", "inversion_sweep.png"))
    plot_grid(image_rows, os.path.join(ROOT, "docs", "img", "inversion_grid.png"))


if __name__ == "__main__":
  main()
