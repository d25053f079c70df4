"""One DP-FedAvg round on W1: the stacked aggregator vs its streaming form, dense and low-rank.

W1: 1000 clients x 20 examples, batch 10, 1 local epoch (2 SGD steps, lr 0.1), MLP 784-200-10
(``benchmarks.throughput.w1_dataset``). The same mechanism (clip to C = 1, N(0, (zC)^2) with z = 1,
fixed denominator = the cohort) three ways, on the same data, initial parameters and round key:

  stacked            ``dp.central_gaussian_mean``: every client's update stacked ``[cohort, params]``
                     (dense per-client training, ``fast_path="off"``);
  streaming_dense    ``dp.central_gaussian_streaming``, dense per-client training, the clipped sum
                     accumulated client by client (``fast_path="off"``);
  streaming_lowrank  the same aggregator on the exact low-rank path (``fast_path="lowrank"``).

Each form is compiled and run once (warm-up, timed as ``first_call_s``), then timed as the median
of ``--repeats`` rounds. The three forms' parameters after one round from the same state are
compared (``max_abs_diff_vs_stacked``): they time the same computation. Writes the small committed
``docs/perf_dp_streaming.json`` (date, machine, jax, commit, command, load average before/after);
the table in docs/privacy.md and the README's sentence are generated from it (experiments/report.py).

  nice -n 19 python benchmarks/dp_streaming.py            # ~2 min on 2 CPU cores
  python benchmarks/dp_streaming.py --report_only         # re-render the sections from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402

OUT = os.path.join(ROOT, "docs", "perf_dp_streaming.json")
FORMS = {"stacked": ("stacked `central_gaussian_mean`", "off"),
         "streaming_dense": ("streaming, dense path", "off"),
         "streaming_lowrank": ("streaming, low-rank path", "lowrank")}
SECTIONS = ("dp_streaming_table", "dp_streaming_summary")


def measure(clients: int, repeats: int, clip_norm: float = 1.0, noise_multiplier: float = 1.0) -> dict:
  """Returns round times of the three forms (see the module docstring) and their agreement."""
  import jax
  import numpy as np
  from benchmarks.throughput import w1_dataset
  from fedjax_health import client as client_lib
  from fedjax_health import models
  from fedjax_health.algorithms import fedavg as fa
  from fedjax_health.data.federated import BatchPlanSpec
  from fedjax_health.privacy import dp

  ds = w1_dataset(clients)
  model = models.get_model("mlp", 10, (784,), hidden=(200,))
  plan = BatchPlanSpec.create(ds.client_sizes, 10, num_epochs=1)
  params0 = model.init(jax.random.key(0))
  train = fa.device_train_data(ds)
  key = jax.random.key(1)
  out, after = {}, {}
  for name, (_, fast_path) in FORMS.items():
    agg = (dp.central_gaussian_mean if name == "stacked" else dp.central_gaussian_streaming)(
        clip_norm, noise_multiplier, float(clients))
    alg = fa.fedavg(model, num_clients=clients, cohort_size=clients, plan=plan, client_opt=client_lib.sgd(0.1),
                    aggregator=agg, fast_path=fast_path)
    state = alg.init(params0)
    round_fn = jax.jit(alg.round_fn)
    t0 = time.perf_counter()
    first_state, metrics = jax.block_until_ready(round_fn(state, train, key))
    first = time.perf_counter() - t0
    after[name] = first_state.params
    times = []
    for _ in range(repeats):  # the same state and key every time: the same round, repeated
      t0 = time.perf_counter()
      jax.block_until_ready(round_fn(state, train, key))
      times.append(time.perf_counter() - t0)
    out[name] = {"round_ms": 1e3 * statistics.median(times), "round_ms_all": [1e3 * t for t in times],
                 "first_call_s": first, "path": alg.path, "clipped_fraction": float(metrics["clipped_fraction"])}
    print(f"{name:18s} {out[name]['round_ms']:9.1f} ms (first call {first:.1f} s, path {alg.path})", flush=True)
  for name in FORMS:
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), after[name],
                         after["stacked"])
    out[name]["max_abs_diff_vs_stacked"] = max(jax.tree.leaves(diffs))
  num_params = sum(int(np.size(a)) for a in jax.tree.leaves(params0))
  return {"workload": f"W1: {clients} clients x 20 examples, batch 10, 1 epoch (2 SGD steps), MLP 784-200-10",
          "clients": clients, "num_params": num_params, "stack_bytes": 4 * num_params * clients,
          "clip_norm": clip_norm, "noise_multiplier": noise_multiplier, "repeats": repeats,
          "backend": jax.default_backend(), "forms": out}


def _load(path=None):
  with open(path or OUT) as f:
    return json.load(f)


def _ms(v: float) -> str:
  return f"{v:,.0f} ms" if v >= 10 else f"{v:.1f} ms"


def _ratio(fast: float, slow: float) -> str:
  """Returns 'N.Nx faster than' / 'N.Nx slower than' for two times."""
  r = slow / fast
  if r >= 1:
    return f"{r:.0f}x faster than" if r >= 10 else f"{r:.1f}x faster than"
  return f"{1 / r:.1f}x slower than"


def shared_note(d: dict) -> str:
  return (f" Taken on a shared machine (load average {d['load_before']:.1f} before, {d['load_after']:.1f} after, on "
          f"{d['machine'].split(', ')[-1]}): absolute times are inflated and ratios noisy."
          if report.shared_machine(d["load_before"], d["load_after"], d["machine"]) else
          f" Load average {d['load_before']:.1f} before, {d['load_after']:.1f} after.")


def render_table(d: dict | None = None) -> str:
  d = d or _load()
  forms = d["forms"]
  stacked = forms["stacked"]["round_ms"]
  lines = ["| aggregator form | round time (median) | vs stacked | first call (compile + run) |",
           "|---|---:|---|---:|"]
  for name, (label, _) in FORMS.items():
    f = forms[name]
    t = _ms(f["round_ms"])
    lines.append(f"| {label} | {t} | " + ("–" if name == "stacked" else _ratio(f["round_ms"], stacked) + " stacked")
                 + f" | {f['first_call_s']:.1f} s |")
  agree = max(forms[n]["max_abs_diff_vs_stacked"] for n in FORMS)
  lines += ["", f"{d['workload']}; clip norm {d['clip_norm']:g}, noise multiplier {d['noise_multiplier']:g}, "
            f"denominator {d['clients']}; median of {d['repeats']} rounds after a warm-up call; parameters after "
            f"one round agree with the stacked form to {agree:.1e} (max abs difference). The stacked form holds the "
            f"cohort's updates, {d['stack_bytes'] / 1e9:.2f} GB for {d['clients']:,} W1 clients "
            f"({d['num_params']:,} float32 parameters each). Measured {d['date']} on {d['machine']}, backend "
            f"{d['backend']}, jax {d['jax']}, commit {d['commit']}: `{d['command']}`." + shared_note(d)]
  return "\n".join(lines)


def render_summary(d: dict | None = None) -> str:
  d = d or _load()
  forms = d["forms"]
  low, stacked = forms["streaming_lowrank"]["round_ms"], forms["stacked"]["round_ms"]
  load = max(d["load_before"], d["load_after"])
  return (f"  It runs on this path: {_ms(low)} per W1 round, {_ratio(low, stacked)} the stacked aggregator's "
          f"{_ms(stacked)} (`benchmarks/dp_streaming.py`, {d['date']}"
          + (f", a shared machine at load average {load:.1f}"
             if report.shared_machine(d["load_before"], d["load_after"], d["machine"]) else "")
          + "; [docs/privacy.md](docs/privacy.md)).")


report.register("dp_streaming_table", render_table, sources=(OUT,))
report.register("dp_streaming_summary", render_summary, sources=(OUT,))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--clients", type=int, default=1000)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=OUT,
                  help="the JSON written (the generated sections read docs/perf_dp_streaming.json)")
  ap.add_argument("--report_only", action="store_true", help="re-render the generated sections from the JSON (no runs)")
  args = ap.parse_args()
  if args.clients < 1 or args.repeats < 1:
    raise ValueError(f"--clients and --repeats must be >= 1, got {args.clients}, {args.repeats}")
  if not args.report_only:
    load_before = os.getloadavg()[0]
    result = measure(args.clients, args.repeats)
    doc = dict(report.provenance("python benchmarks/dp_streaming.py " + " ".join(sys.argv[1:]),
                                 load_before=load_before, load_after=os.getloadavg()[0]), **result)
    doc = report.rounded(doc, 4)
    for name in FORMS:  # float rounding noise: keep 3 significant digits, not 4 decimals
      doc["forms"][name]["max_abs_diff_vs_stacked"] = float(f"{result['forms'][name]['max_abs_diff_vs_stacked']:.3g}")
    report.write_json(args.out, doc)
    if os.path.abspath(args.out) != OUT:
      print(render_table(_load(args.out)))
      return
  report.update_all(names=SECTIONS)
  print(render_table())


if __name__ == "__main__":
  main()
