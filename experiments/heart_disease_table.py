"""Fed-Heart-Disease results table: every baseline and FedAvg-family method, mean +- sd over seeds.

  python -m experiments.heart_disease_table [--seeds 0,1,2,3,4] [--out results/heart_disease]

Runs the configs in configs/heart_disease_*.py through the same simulation loop as the launcher,
and prints a markdown table (pooled test accuracy, mean and worst over the 4 hospitals, AUC) with
FLamby's published numbers (from ../shared/data/README.md) alongside.
"""

import argparse
import importlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedjax_health import simulation  # noqa: E402

METHODS = [("pooled", "heart_disease_pooled"), ("local", "heart_disease_local"),
           ("FedAvg", "heart_disease_fedavg"), ("FedProx", "heart_disease_fedprox"),
           ("FedAdam", "heart_disease_fedadam"), ("FedYogi", "heart_disease_fedyogi"),
           ("FedAdagrad", "heart_disease_fedadagrad")]
# FLamby (mean over 4 clients, pooled test), from shared/data/README.md.
FLAMBY = {"pooled": (0.735, 0.795), "local_cleveland": (0.722, 0.784), "local_hungarian": (0.629, 0.727),
          "local_switzerland": (0.567, 0.483), "local_va": (0.637, 0.611), "FedAvg": (0.685, 0.748),
          "FedProx": (0.685, 0.748), "FedAdam": (0.726, 0.779), "FedYogi": (0.731, 0.779),
          "FedAdagrad": (0.731, 0.779)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", default="0,1,2,3,4")
  ap.add_argument("--out", default="results/heart_disease")
  ap.add_argument("--normalize", default="pooled")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = {}
  for label, module in METHODS:
    for seed in seeds:
      config = importlib.import_module(f"configs.{module}").get_config()
      config.seed = seed
      config.dataset.normalize = args.normalize
      summary = simulation.run(config, os.path.join(args.out, module, f"seed{seed}"), log=lambda s: None)
      for name, m in summary["experiments"].items():
        key = label if label != "local" else name
        rows.setdefault(key, []).append((m["accuracy"], m["mean_client_accuracy"], m["worst_client_accuracy"],
                                         m["auc"]))
    print(f"done {label}", flush=True)
  lines = ["| method | pooled test acc | mean over 4 hospitals | worst hospital | AUC | FLamby mean over 4 | FLamby pooled test |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for key, vals in rows.items():
    v = np.array(vals)
    mu, sd = v.mean(0), v.std(0)
    fl = FLAMBY.get(key, (float("nan"), float("nan")))
    lines.append(f"| {key} | {mu[0]:.3f} ± {sd[0]:.3f} | {mu[1]:.3f} ± {sd[1]:.3f} | {mu[2]:.3f} ± {sd[2]:.3f} | "
                 f"{mu[3]:.3f} ± {sd[3]:.3f} | {fl[0]:.3f} | {fl[1]:.3f} |")
  table = "\n".join(lines)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"table_{args.normalize}.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, f"raw_{args.normalize}.json"), "w") as f:
    json.dump(rows, f)


if __name__ == "__main__":
  main()
