"""A hyperparameter sweep as one compiled program vs one run per value, side by side in one process.

  python -m benchmarks.sweep                      # ~5 min on an idle 2-core CPU
  python -m benchmarks.sweep --report_only        # re-render docs/seeds.md's sweep table from the JSON

For each workload, what a user waits for end to end (load the data, build, compile, train
``num_rounds`` rounds, evaluate every ``eval_every``): k calls of ``simulation.run``, one per value
of the swept field, against one ``simulation.run`` with ``config.sweep`` (``fedjax_health/sweep.py``:
one compile, the values vmapped). The final metrics of both are compared member by member (they
must agree to float rounding; the largest difference is stored). Writes ``docs/perf_sweep.json``;
the table in ``docs/seeds.md`` is generated from it (``experiments/report.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402

OUT = os.path.join(ROOT, "docs", "perf_sweep.json")
# name: (config module, config arg, swept field, values, description)
WORKLOADS = {
    "fedavg_lr": ("configs.heart_disease_fedavg", "", "client.learning_rate", (0.003, 0.01, 0.03, 0.1),
                  "Fed-Heart-Disease FedAvg, 15 rounds x 100 steps: client learning rate"),
    "dp_epsilon": ("configs.heart_disease_dp", "", "privacy.client.target_epsilon", (1.0, 3.0, 8.0),
                   "Fed-Heart-Disease DP-FedAvg (central), 15 rounds: target epsilon"),
    "cross_device_server_lr": ("configs.retinamnist_cross_device", "smoke", "server.learning_rate",
                               (0.5, 1.0, 2.0), "RetinaMNIST cross-device MLP (smoke size): server learning rate"),
}


def _config(name):
  module, arg, *_ = WORKLOADS[name]
  return importlib.import_module(module).get_config(arg)


def measure(name: str) -> dict:
  from fedjax_health import simulation, sweep
  _, _, field, values, description = WORKLOADS[name]
  quiet = lambda s: None
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    separate = {}
    for v in values:
      config = _config(name)
      sweep.set_field(config, field, type(sweep.get_field(config, field))(v))
      summary = simulation.run(config, os.path.join(tmp, f"one_{v:g}"), log=quiet)
      separate[v] = summary["experiments"]
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    config = _config(name)
    config.sweep.field, config.sweep.values = field, tuple(values)
    summary = simulation.run(config, os.path.join(tmp, "sweep"), log=quiet)
    stacked = time.perf_counter() - t0
  diff, finals = 0.0, {}
  for v in values:
    for exp, metrics in separate[v].items():
      got = summary["experiments"][f"{exp}[{sweep.label(field, v)}]"]
      finals[f"{v:g}"] = {"accuracy": got.get("accuracy"), "separate_accuracy": metrics.get("accuracy")}
      for m in ("accuracy", "loss"):
        if isinstance(metrics.get(m), float):
          diff = max(diff, abs(got[m] - metrics[m]))
  return {"workload": name, "description": description, "field": field, "values": list(values),
          "num_rounds": config.num_rounds, "end_to_end_s": {"sequential": sequential, "stacked": stacked},
          "speedup": sequential / stacked, "max_abs_metric_diff": diff, "finals": finals,
          "best": summary["sweep"]["best"], "load_before": load_before, "load_after": os.getloadavg()[0]}


def render() -> str:
  with open(OUT) as f:
    d = json.load(f)
  lines = ["| workload | swept values | k separate runs | one sweep program | speedup | largest metric difference |",
           "|---|---|---:|---:|---:|---:|"]
  for r in d["results"]:
    e = r["end_to_end_s"]
    lines.append(f"| {r['description']} | {', '.join(f'{v:g}' for v in r['values'])} | {e['sequential']:.1f} s | "
                 f"{e['stacked']:.1f} s | **{r['speedup']:.2f}x** | {r['max_abs_metric_diff']:.1e} |")
  loads = [x for r in d["results"] for x in (r["load_before"], r["load_after"])]
  shared = (f" The machine was shared (load average {min(loads):.1f}-{max(loads):.1f} on "
            f"{d['cpus']} cores): both sides ran under the same load, so compare the ratios."
            if report.shared_machine(min(loads), max(loads), d["machine"]) else
            f" Load average {min(loads):.1f}-{max(loads):.1f} on {d['cpus']} cores.")
  lines += ["", f"Measured {d['date']} on {d['machine']} (commit {d['commit']}); jax {d['jax']}; backend "
            f"{d['backend']}. Command: `{d['command']}`. The largest difference is over the final accuracy and loss of "
            f"every value, sweep member against its separate run.{shared}"]
  return "\n".join(lines)


report.register("perf_sweep", render, sources=(OUT,))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", default=",".join(WORKLOADS))
  ap.add_argument("--report_only", action="store_true")
  args = ap.parse_args()
  if not args.report_only:
    import jax
    results = []
    for name in args.workloads.split(","):
      results.append(measure(name))
      print(json.dumps(results[-1]), flush=True)
    meta = report.provenance("python -m benchmarks.sweep" + (f" --workloads {args.workloads}"
                                                              if args.workloads != ",".join(WORKLOADS) else ""))
    report.write_json(OUT, {**meta, "cpus": os.cpu_count(), "backend": jax.default_backend(), "results": results})
  report.update_all(names=("perf_sweep",))
  print(render())


if __name__ == "__main__":
  main()
