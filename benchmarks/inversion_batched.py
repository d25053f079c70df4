"""Benchmark: gradient inversion of 256 victims batched (vmap) vs one victim at a time.

The same attack (Inverting Gradients: cosine distance, signed Adam, iDLG label, one restart) on
real uploads (one-example gradients of real Fed-Heart-Disease records / BreastMNIST images), run
three ways:
  * ``per-step loop``: one victim at a time, a Python loop over optimiser steps calling a jitted
    step (how per-victim tools such as ``breaching`` drive their optimiser);
  * ``per-victim jit``: one victim at a time, the whole attack (``lax.scan`` over steps) compiled,
    called once per victim (the strongest one-by-one baseline);
  * ``batched``: ``invert_victims``, all victims in one compiled program (vmap, or ``lax.map``
    over chunks of ``width`` victims).
Baselines run on ``--subset`` victims and are scaled to ``--victims`` (they are linear in the
number of victims); compile time is excluded everywhere (a warm-up call first); each timing is
the best of ``--repeats``. Writes the small committed ``docs/inversion_batched.json`` (date, machine,
jax, commit, command, load average before/after); the table and findings of docs/inversion.md's
"Batched vs one by one" are generated from it (experiments/report.py).

  nice -n 19 python benchmarks/inversion_batched.py                       # ~5 min on 2 CPU cores
  nice -n 19 python benchmarks/inversion_batched.py --workloads=records --steps=50 --subset=8 --out=/tmp/x.json
  python benchmarks/inversion_batched.py --report_only                    # the sections from the JSON only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import report  # noqa: E402

OUT = os.path.join(ROOT, "docs", "inversion_batched.json")
WORKLOADS = {"records": "Fed-Heart-Disease records, MLP 13-32-1",
             "mlp_images": "BreastMNIST 16x16, MLP 256-64-2",
             "lenet": "BreastMNIST 16x16, sigmoid LeNet"}
SECTIONS = ("inversion_batched_table", "inversion_batched_findings")
TARGET = 20.0  # the speedup asked of batching (docs/inversion.md)


def workload(name: str, victims: int):
  """Returns (model, params, spec, observed [V, ...]) for real one-example uploads."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fedjax_health import models
  from fedjax_health.attacks import inversion_objective as ino
  from fedjax_health.data import heart_disease, medmnist
  if name == "records":
    d = heart_disease.load(normalize="pooled")
    idx = np.arange(victims) % d.train.num_examples
    x, y = d.train.x[idx][:, None], d.train.y[idx][:, None]
    m = models.get_model("mlp", 2, (13,), hidden=(32,), activation="sigmoid", binary_single_logit=True)
    shape, bounds = (13,), None
  else:
    xs, ys = medmnist.load_arrays("breastmnist")["train"]
    idx = np.arange(victims) % len(ys)
    x = np.asarray(jax.image.resize(jnp.asarray(xs[idx]), (victims, 16, 16, 1), "linear", antialias=True))[:, None]
    y = ys[idx][:, None]
    kw = dict(hidden=(64,), activation="sigmoid") if name == "mlp_images" else dict(activation="sigmoid")
    m = models.get_model("mlp" if name == "mlp_images" else "lenet", 2, (16, 16, 1), **kw)
    shape, bounds = (16, 16, 1), (0.0, 1.0)
  params = m.init(jax.random.key(0))
  observed = jax.jit(jax.vmap(lambda xb, yb: jax.grad(lambda p: ino.batch_mean_loss(m.apply, p, xb, yb))(params)))(x, y)
  return m, params, shape, bounds, observed


def best_of(fn, repeats: int) -> float:
  import jax
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def per_step_runner(m, spec, params):
  """Returns ``run(observed, keys, n)``: n victims one at a time, a Python loop over jitted optimiser steps."""
  import jax
  import optax
  from fedjax_health.attacks import inversion_objective as ino
  opt = ino.attack_optimizer(spec)

  @jax.jit
  def step(z, s, obs, fixed):
    g = jax.grad(lambda z: ino.inversion_objective(m.apply, spec, params, obs, z, fixed))(z)
    u, s = opt.update(g, s, z)
    return ino.project_dummy(spec, optax.apply_updates(z, u)), s

  label_of = jax.jit(lambda obs: ino.fixed_labels(spec, obs))
  init = jax.jit(lambda key: ino.initial_dummy(spec, jax.random.split(key, 1)[0], False))

  def run(observed, keys, n):
    out = []
    for v in range(n):
      obs = jax.tree.map(lambda a: a[v], observed)
      fixed = label_of(obs)
      z = init(keys[v])
      s = opt.init(z)
      for _ in range(spec.num_steps):
        z, s = step(z, s, obs, fixed)
      out.append(ino.project_dummy(spec, z)["x"])
    return out

  return run


def measure(args) -> list[dict]:
  import jax
  from fedjax_health.attacks import inversion as inv
  rows = []
  print(f"backend={jax.default_backend()} devices={jax.device_count()} victims={args.victims} steps={args.steps}")
  for name in args.workloads.split(","):
    m, params, shape, bounds, observed = workload(name, args.victims)
    spec = inv.inverting_gradients_spec(1, shape, 2, num_steps=args.steps, num_restarts=1, tv_weight=0.0, bounds=bounds)
    keys = jax.random.split(jax.random.key(1), args.victims)
    n = min(args.subset, args.victims)
    scale = args.victims / n
    loop = per_step_runner(m, spec, params)
    loop(observed, keys, 1)  # compile
    t_step = best_of(lambda: loop(observed, keys, n), args.repeats) * scale
    one = jax.jit(inv.make_inversion(m, spec))
    jax.block_until_ready(one(params, jax.tree.map(lambda a: a[0], observed), keys[0]))
    t_jit = best_of(lambda: [one(params, jax.tree.map(lambda a: a[v], observed), keys[v]) for v in range(n)],
                    args.repeats) * scale
    batched = {}
    for w in map(int, args.widths.split(",")):
      attack = inv.batched_inversion(m, spec, width=w)
      run = lambda: attack(params, observed, jax.random.key(1))
      jax.block_until_ready(run())
      batched[w] = best_of(run, args.repeats)
    w_best = min(batched, key=batched.get)
    t_b = batched[w_best]
    rows.append({"workload": name, "victims": args.victims, "steps": args.steps, "per_step_loop_s": t_step,
                 "per_victim_jit_s": t_jit, "batched_s": {str(w): t for w, t in batched.items()}, "best_width": w_best,
                 "speedup_vs_per_step": t_step / t_b, "speedup_vs_per_victim_jit": t_jit / t_b})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _load(path=None):
  with open(path or OUT) as f:
    return json.load(f)


def _s(v: float) -> str:
  return f"{v:.3f}" if v < 0.1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _x(v: float) -> str:
  return f"{v:.0f}x" if v >= 20 else f"{v:.1f}x"


def render_table(d: dict | None = None) -> str:
  d = d or _load()
  lines = ["| workload | per-step loop (s) | per-victim jit (s) | batched (s), width | vs per-step loop | "
           "vs per-victim jit |", "|---|---|---|---|---|---|"]
  for r in d["rows"]:
    t_b = r["batched_s"][str(r["best_width"])]
    cell = lambda v: f"**{_x(v)}**" if v >= TARGET else _x(v)
    lines.append(f"| {WORKLOADS.get(r['workload'], r['workload'])} | {_s(r['per_step_loop_s'])} | "
                 f"{_s(r['per_victim_jit_s'])} | {_s(t_b)}, {r['best_width'] or 'all'} | "
                 f"{cell(r['speedup_vs_per_step'])} | {cell(r['speedup_vs_per_victim_jit'])} |")
  lo, hi = d["load_before"], d["load_after"]
  shared = (f"taken on a shared machine (load average {lo:.1f} before, {hi:.1f} after, on {d['machine']}), so "
            "absolute times are inflated and ratios noisy" if report.shared_machine(lo, hi, d["machine"]) else
            f"load average {lo:.1f} before, {hi:.1f} after, on {d['machine']}")
  r0 = d["rows"][0]
  lines += ["", f"{r0['victims']} victims, {r0['steps']} iterations; baselines timed on {d['subset']} victims and "
            f"scaled; best of {d['repeats']} runs; batched widths tried: {d['widths']} (0 = all in one vmap). "
            f"Measured {d['date']}, backend {d['backend']}, jax {d['jax']}, commit {d['commit']}; {shared}. "
            f"Command: `{d['command']}`."]
  return "\n".join(lines)


def findings(d: dict | None = None) -> str:
  """The sentences on the speedup target, every comparison computed from the rows."""
  d = d or _load()
  met, missed = [], []
  for r in d["rows"]:
    for group, keep in ((met, lambda v: v >= TARGET), (missed, lambda v: v < TARGET)):
      parts = [f"{base} ({_x(r[key])})" for key, base in (("speedup_vs_per_step", "the per-step loop"),
                                                          ("speedup_vs_per_victim_jit", "the per-victim jit"))
               if keep(r[key])]
      if parts:
        group.append(f"{WORKLOADS.get(r['workload'], r['workload'])} against " + " and ".join(parts))
  out = (f"The >= {TARGET:.0f}x target is met for " + ("; ".join(met) if met else "no workload") +
         (". It is not met for " + "; ".join(missed) if missed else "") + ".")
  images = [r for r in d["rows"] if r["workload"] != "records"]
  if d["backend"] == "cpu" and images and all(r["speedup_vs_per_victim_jit"] < TARGET for r in images):
    top = max(r["speedup_vs_per_victim_jit"] for r in images)
    out += (f" For images, batching gains at most {_x(top)} over the per-victim jit on this "
            f"{d['backend'].upper()}: each image victim already carries its own full-size dummy gradient "
            "(|theta| floats) through several backward passes per step, so one victim keeps the cores busy and "
            "batching only moves the work into larger, memory-bound tensors (vmapped convolution weight gradients "
            "become grouped convolutions, which XLA:CPU runs no faster). Batching pays where per-victim work is "
            "small (tabular models) or on an accelerator.")
  return out


report.register("inversion_batched_table", render_table, sources=(OUT,))
report.register("inversion_batched_findings", findings, sources=(OUT,))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--victims", type=int, default=256)
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--subset", type=int, default=16, help="victims timed one by one (scaled to --victims)")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--widths", default="0,32", help="batched map widths (0 = all victims in one vmap)")
  ap.add_argument("--workloads", default=",".join(WORKLOADS))
  ap.add_argument("--out", default=OUT,
                  help="the JSON written (the generated sections read docs/inversion_batched.json)")
  ap.add_argument("--report_only", action="store_true", help="re-render the generated sections from the JSON (no runs)")
  args = ap.parse_args()
  for name in args.workloads.split(","):
    if name not in WORKLOADS:
      raise ValueError(f"--workloads must be among {sorted(WORKLOADS)}, got {name!r}")
  if min(args.victims, args.steps, args.subset, args.repeats) < 1:
    raise ValueError("--victims, --steps, --subset and --repeats must be >= 1")
  if not args.report_only:
    import jax
    load_before = os.getloadavg()[0]
    rows = measure(args)
    doc = dict(report.provenance("python benchmarks/inversion_batched.py " + " ".join(sys.argv[1:]),
                                 load_before=load_before, load_after=os.getloadavg()[0]),
               backend=jax.default_backend(), subset=min(args.subset, args.victims), repeats=args.repeats,
               widths=args.widths, rows=rows)
    report.write_json(args.out, report.rounded(doc, 4))
    if os.path.abspath(args.out) != OUT:
      print(render_table(_load(args.out)))
      return
  report.update_all(names=SECTIONS)
  print(render_table())
  print(findings())


if __name__ == "__main__":
  main()
