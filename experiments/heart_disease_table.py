"""Fed-Heart-Disease: every FLamby row in FLamby's exact protocol and in ours, side by side, over seeds.

  python -m experiments.heart_disease_table                 # reruns (about 10 min on 2 cores)
  python -m experiments.heart_disease_table --report_only   # rebuilds the tables from the JSON

Protocols:
* ``flamby``: ``configs/heart_disease_flamby.py`` (FLamby's rates, rounds, steps, per-centre
  z-scoring, torch init, size-weighted aggregation, Reddi-form FedOpt). Evaluated as FLamby does:
  each hospital's test split with its own normalisation, and the pooled test set (254 rows)
  normalised with pooled train statistics.
* ``ours``: ``configs/heart_disease_{pooled,local,fedavg,fedprox,fedadam,fedyogi,fedadagrad}.py``:
  features z-scored with pooled train statistics (one secure sum of moments), our client rates,
  Reddi-form FedOpt (the configs' defaults).

Each (protocol, method) runs its seeds as one vmapped program (``config.num_seeds``,
``fedjax_health/stacked_seeds.py``). Results: ``docs/results/heart_disease.json`` (per seed);
FLamby's published numbers: ``docs/results/flamby_heart_disease.json``. The tables in README.md
and ``docs/heart_disease.md`` are generated from these files by ``experiments/report.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402

RESULTS = os.path.join(ROOT, "docs", "results", "heart_disease.json")
FLAMBY = os.path.join(ROOT, "docs", "results", "flamby_heart_disease.json")
# (row label, our config module, FLamby-protocol argument)
METHODS = [("pooled", "heart_disease_pooled", "pooled"), ("local", "heart_disease_local", "local"),
           ("FedAvg", "heart_disease_fedavg", "fedavg"), ("FedProx", "heart_disease_fedprox", "fedprox"),
           ("FedAdam", "heart_disease_fedadam", "fedadam"), ("FedYogi", "heart_disease_fedyogi", "fedyogi"),
           ("FedAdagrad", "heart_disease_fedadagrad", "fedadagrad")]
LOCAL_NAMES = {"local_cleveland": "local_cleveland", "local_hungarian": "local_hungarian",
               "local_switzerland": "local_switzerland", "local_va": "local_va"}


def _config(protocol: str, module: str, flamby_arg: str, smoke: bool):
  if protocol == "flamby":
    return importlib.import_module("configs.heart_disease_flamby").get_config(flamby_arg + (",smoke" if smoke else ""))
  return importlib.import_module(f"configs.{module}").get_config("smoke" if smoke else "")


def _pooled_test_evaluator():
  """FLamby's pooled test set: all 254 test rows z-scored with pooled train statistics."""
  from fedjax_health import simulation
  from fedjax_health.data import heart_disease
  data = heart_disease.load(normalize="pooled")
  import jax
  model = simulation.build_model(_config("flamby", "", "fedavg", True), data)
  return simulation.make_global_evaluate(model, data), model.init(jax.random.key(0))


def run(protocols, seeds, smoke=False, methods=None, log=print) -> dict:
  """Runs every (protocol, method) with ``seeds`` stacked; returns ``{protocol: {row: [per-seed metrics]}}``."""
  import jax
  from fedjax_health import simulation
  pooled_eval, template = _pooled_test_evaluator()
  out = {}
  for protocol in protocols:
    out[protocol] = {}
    for label, module, flamby_arg in METHODS:
      if methods and label not in methods:
        continue
      config = _config(protocol, module, flamby_arg, smoke)
      config.seed, config.num_seeds = seeds[0], len(seeds)
      t0 = time.time()
      with tempfile.TemporaryDirectory() as workdir:
        summary = simulation.run(config, workdir, log=lambda s: None)
        for name, evals in summary["per_seed"].items():
          row = label if label != "local" else name
          per_seed = []
          for s, m in zip(seeds, evals):
            entry = {"seed": s, "mean_client_accuracy": m["mean_client_accuracy"],
                     "worst_client_accuracy": m["worst_client_accuracy"], "auc": m["auc"],
                     "per_client_accuracy": m["per_client_accuracy"], "pooled_test_accuracy": m["accuracy"]}
            if protocol == "flamby" and config.dataset.normalize != "pooled":
              # FLamby's pooled test set is normalised with pooled statistics whatever the training.
              with np.load(os.path.join(workdir, f"final_params_{name}_seed{s}.npz")) as f:
                params = jax.tree_util.tree_map_with_path(lambda k, _: f[jax.tree_util.keystr(k)], template)
              entry["pooled_test_accuracy"] = pooled_eval(params)["accuracy"]
            per_seed.append(entry)
          out[protocol][row] = {"per_seed": per_seed, "settings": _settings(config)}
      log(f"{protocol:7s} {label:10s} {len(seeds)} seeds in {time.time() - t0:.1f}s")
  return out


def _settings(config) -> dict:
  c, s = config.client, config.server
  keys = {"normalize": config.dataset.normalize, "rounds": config.num_rounds, "client_opt": c.optimizer,
          "client_lr": c.learning_rate, "batch": c.batch_size,
          "local": f"{c.num_epochs} epochs" if c.num_epochs else f"{c.num_steps} steps",
          "init": config.model.get("init", "lecun_normal")}
  if config.algorithm not in ("local", "pooled"):
    keys.update(server_opt=s.optimizer, server_lr=s.learning_rate, weighting=s.get("weighting", "examples_used"),
                prox_mu=c.prox_mu)
    if s.optimizer != "sgd":
      keys.update(form=s.get("form", "reddi"), tau=s.tau)
  return keys


def _ms(vals):
  v = np.asarray(vals, np.float64)
  return f"{v.mean():.3f} ± {v.std():.3f}"


def render_table(results: dict, flamby: dict) -> str:
  """Markdown: FLamby's published row, ours in FLamby's protocol, ours in our protocol."""
  rows = flamby["rows"]
  lines = [
      "| method | FLamby published: mean over 4 / pooled test | ours, FLamby's protocol: mean over 4 | "
      "pooled test | ours, our protocol: mean over 4 | pooled test | worst hospital | AUC |",
      "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    fl = rows[row]
    cells = [row, f"{fl['mean_over_4']:.3f} / {fl['pooled_test']:.3f}"]
    for protocol in ("flamby", "ours"):
      r = results.get(protocol, {}).get(row)
      if r is None:
        cells += ["-", "-"] + (["-", "-"] if protocol == "ours" else [])
        continue
      ps = r["per_seed"]
      mean4 = np.mean([p["mean_client_accuracy"] for p in ps])
      mark = " ✓" if mean4 >= fl["mean_over_4"] else " ✗"
      cells += [_ms([p["mean_client_accuracy"] for p in ps]) + mark, _ms([p["pooled_test_accuracy"] for p in ps])]
      if protocol == "ours":
        cells += [_ms([p["worst_client_accuracy"] for p in ps]), _ms([p["auc"] for p in ps])]
    lines.append("| " + " | ".join(cells) + " |")
  seeds = sorted({p["seed"] for proto in results.values() for r in proto.values() for p in r["per_seed"]})
  lines.append("")
  lines.append(f"Mean ± sd over seeds {', '.join(map(str, seeds))}; ✓/✗: our mean over the 4 hospitals "
               f"≥ / < FLamby's published one ({flamby['source']}).")
  return "\n".join(lines)


def render_verdict(results: dict, flamby: dict) -> str:
  """The rows where we do not match FLamby in its own protocol, computed from the results."""
  behind = []
  for row, fl in flamby["rows"].items():
    r = results.get("flamby", {}).get(row)
    if r is None:
      continue
    vals = np.asarray([p["mean_client_accuracy"] for p in r["per_seed"]])
    if vals.mean() < fl["mean_over_4"]:
      # Standard error of the difference of two means over seeds (Welch), FLamby's sd from its 5 seeds.
      se = np.sqrt(vals.var(ddof=1) / len(vals) + fl.get("mean_over_4_sd", 0.0) ** 2 / flamby.get("num_seeds", 5))
      gap = fl["mean_over_4"] - vals.mean()
      behind.append(f"{row} ({vals.mean():.3f} vs {fl['mean_over_4']:.3f}: {gap:.3f} below, "
                    f"{gap / se:.1f} standard errors of the difference)")
  n = sum(1 for row in flamby["rows"] if row in results.get("flamby", {}))
  if not behind:
    return f"In FLamby's own protocol we match or beat all {n} FLamby rows (mean over the 4 hospitals)."
  return (f"In FLamby's own protocol we match or beat {n - len(behind)} of {n} FLamby rows; below it: "
          + "; ".join(behind) + ".")


def render_settings(results: dict) -> str:
  lines = ["| protocol | method | settings |", "|---|---|---|"]
  for protocol in ("flamby", "ours"):
    for row, r in results.get(protocol, {}).items():
      if row.startswith("local_") and row != "local_cleveland":
        continue
      label = "local (each site)" if row.startswith("local_") else row
      lines.append(f"| {protocol} | {label} | " + ", ".join(f"{k}={v}" for k, v in r["settings"].items()) + " |")
  return "\n".join(lines)


def _load():
  with open(RESULTS) as f:
    results = json.load(f)
  with open(FLAMBY) as f:
    flamby = json.load(f)
  return results, flamby


report.register("heart_disease", lambda: render_table(*_load()) + "\n\n" + render_verdict(*_load()),
                sources=(RESULTS, FLAMBY))
report.register("heart_disease_settings", lambda: render_settings(_load()[0]), sources=(RESULTS,))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", default="0,1,2,3,4")
  ap.add_argument("--protocols", default="flamby,ours")
  ap.add_argument("--report_only", action="store_true", help="rebuild the tables from docs/results (no runs)")
  ap.add_argument("--methods", default="", help="comma-separated subset of the rows (default: all)")
  ap.add_argument("--smoke", action="store_true", help="tiny runs, results not written")
  args = ap.parse_args()
  if not args.report_only:
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    results = run(args.protocols.split(","), seeds, smoke=args.smoke, methods=methods)
    if methods and not args.smoke and os.path.exists(RESULTS):  # merge into the committed results
      with open(RESULTS) as f:
        old = json.load(f)
      for p, rows in results.items():
        old.setdefault(p, {}).update(rows)
      results = old
    if args.smoke:
      print(json.dumps({p: {k: len(v["per_seed"]) for k, v in r.items()} for p, r in results.items()}))
      return
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
      json.dump(results, f, indent=1)
  report.update_all(names=("heart_disease", "heart_disease_settings"))
  print(render_table(*_load()))


if __name__ == "__main__":
  main()
