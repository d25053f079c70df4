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
the best of ``--repeats``. Writes ``results/inversion_batched.json``.

  nice -n 10 python benchmarks/inversion_batched.py                       # ~5 min on 2 CPU cores
  nice -n 10 python benchmarks/inversion_batched.py --workloads=records --steps=50 --subset=8
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_health import models
from fedjax_health.attacks import inversion as inv
from fedjax_health.attacks import inversion_objective as ino
from fedjax_health.data import heart_disease, medmnist


def workload(name: str, victims: int):
  """Returns (model, params, spec, observed [V, ...]) for real one-example uploads."""
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
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def per_step_runner(m, spec, params):
  """Returns ``run(observed, keys, n)``: n victims one at a time, a Python loop over jitted optimiser steps."""
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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--victims", type=int, default=256)
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--subset", type=int, default=16, help="victims timed one by one (scaled to --victims)")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--widths", default="0,32", help="batched map widths (0 = all victims in one vmap)")
  ap.add_argument("--workloads", default="records,mlp_images,lenet")
  ap.add_argument("--out", default="results/inversion_batched.json")
  args = ap.parse_args()
  rows = []
  print(f"backend={jax.default_backend()} devices={jax.device_count()} victims={args.victims} steps={args.steps}")
  print("| workload | per-step loop (s) | per-victim jit (s) | batched (s), width | vs per-step | vs per-victim jit |")
  print("|---|---|---|---|---|---|")
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
    row = {"workload": name, "victims": args.victims, "steps": args.steps, "per_step_loop_s": t_step,
           "per_victim_jit_s": t_jit, "batched_s": batched, "best_width": w_best,
           "speedup_vs_per_step": t_step / t_b, "speedup_vs_per_victim_jit": t_jit / t_b}
    rows.append(row)
    print(f"| {name} | {t_step:.2f} | {t_jit:.2f} | {t_b:.2f}, {w_best or 'all'} | {t_step / t_b:.1f}x | "
          f"{t_jit / t_b:.1f}x |", flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"backend": jax.default_backend(), "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
  main()
