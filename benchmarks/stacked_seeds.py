"""k seeds as one vmapped program vs k sequential runs, measured side by side in one process.

  python -m benchmarks.stacked_seeds [--seeds 5] [--workloads fedavg,dp,cross_device]
  python -m benchmarks.stacked_seeds --report_only     # re-render docs/seeds.md's table from the JSON

For each workload: (a) end to end, what a user waits for: k runs of the simulation loop one after
the other (each builds and compiles its round, runs ``num_rounds`` rounds and evaluates every
``eval_every``) against ``stacked_seeds.run_stacked`` (one compile, one vmapped program);
(b) steady state: one compiled round per seed, k times, against one stacked round (median of
repeats after warm-up). Writes ``docs/perf_stacked_seeds.json``; the table in ``docs/seeds.md``
is generated from it (``experiments/report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402

OUT = os.path.join(ROOT, "docs", "perf_stacked_seeds.json")
WORKLOADS = {
    "fedavg": ("configs.heart_disease_fedavg", "", "Fed-Heart-Disease FedAvg, 15 rounds x 100 steps, 4 hospitals"),
    "dp": ("configs.heart_disease_dp", "", "Fed-Heart-Disease DP-FedAvg (central, eps 8), 15 rounds"),
    "cross_device": ("configs.retinamnist_cross_device", "smoke", "RetinaMNIST cross-device MLP (smoke size)"),
}


def _config(name, seed):
  import importlib
  module, arg, _ = WORKLOADS[name]
  config = importlib.import_module(module).get_config(arg)
  config.seed = seed
  return config


def _build(config):
  from fedjax_health import plugins, simulation
  from fedjax_health.data import registry as data_registry
  plugins.load_plugins()
  data = data_registry.load_data(config.dataset, seed=config.seed)
  model = simulation.build_model(config, data)
  return simulation.ALGORITHMS[config.algorithm](config, data, model)


def _median_time(fn, repeats):
  import jax
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def measure(name: str, k: int, repeats: int = 5) -> dict:
  import jax
  import jax.numpy as jnp
  from fedjax_health import simulation, stacked_seeds
  seeds = list(range(k))
  quiet = lambda s: None
  # (a) end to end.
  t0 = time.perf_counter()
  for s in seeds:
    config = _config(name, s)
    for exp in _build(config):
      simulation.run_experiment(exp, config, quiet, lambda row: None)
  sequential = time.perf_counter() - t0
  t0 = time.perf_counter()
  config = _config(name, 0)
  per_seed = [_build(_config(name, s)) for s in seeds]
  for exps in zip(*per_seed):
    stacked_seeds.run_stacked(list(exps), seeds, config, quiet, lambda row: None)
  stacked = time.perf_counter() - t0
  # (b) steady state: one round.
  exps = [p[0] for p in per_seed]
  single = jax.jit(lambda st, t, kd: exps[0].round_fn(st, t, jax.random.wrap_key_data(kd)))
  keys = [jax.random.key_data(jax.random.key(s + 1)) for s in seeds]
  jax.block_until_ready(single(exps[0].init_state, exps[0].train, keys[0]))
  seq_round = _median_time(lambda: [single(e.init_state, e.train, kd) for e, kd in zip(exps, keys)], repeats)
  vm = jax.jit(jax.vmap(lambda st, t, kd: exps[0].round_fn(st, t, jax.random.wrap_key_data(kd)), in_axes=(0, None, 0)))
  state = stacked_seeds.stack_trees([e.init_state for e in exps])
  kd = jnp.stack(keys)
  jax.block_until_ready(vm(state, exps[0].train, kd))
  stacked_round = _median_time(lambda: vm(state, exps[0].train, kd), repeats)
  return {"workload": name, "description": WORKLOADS[name][2], "num_seeds": k, "num_rounds": config.num_rounds,
          "end_to_end_s": {"sequential": sequential, "stacked": stacked},
          "round_s": {"sequential": seq_round, "stacked": stacked_round},
          "speedup": {"end_to_end": sequential / stacked, "round": seq_round / stacked_round}}


def render() -> str:
  with open(OUT) as f:
    d = json.load(f)
  lines = ["| workload | seeds | k sequential runs | one stacked program | speedup | k rounds one by one | "
           "one stacked round | speedup |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in d["results"]:
    e, rd = r["end_to_end_s"], r["round_s"]
    lines.append(f"| {r['description']} | {r['num_seeds']} | {e['sequential']:.1f} s | {e['stacked']:.1f} s | "
                 f"**{r['speedup']['end_to_end']:.2f}x** | {rd['sequential'] * 1e3:,.1f} ms | "
                 f"{rd['stacked'] * 1e3:,.1f} ms | {r['speedup']['round']:.2f}x |")
  lines += ["", f"Machine: {d['machine']}; jax {d['jax']}; backend {d['backend']}. Command: "
            f"`python -m benchmarks.stacked_seeds --seeds {d['results'][0]['num_seeds']}`."]
  return "\n".join(lines)


report.register("perf_stacked_seeds", render, sources=(OUT,))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--workloads", default="fedavg,dp")
  ap.add_argument("--report_only", action="store_true")
  args = ap.parse_args()
  if not args.report_only:
    import jax
    results = []
    for name in args.workloads.split(","):
      results.append(measure(name, args.seeds))
      print(json.dumps(results[-1]), flush=True)
    with open(OUT, "w") as f:
      json.dump({"machine": f"{platform.machine()} {os.cpu_count()} cores", "jax": jax.__version__,
                 "backend": jax.default_backend(), "results": results}, f, indent=1)
  report.update_all(names=("perf_stacked_seeds",))
  print(render())


if __name__ == "__main__":
  main()
