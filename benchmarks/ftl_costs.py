"""Cost of one FTL epoch under each protection, as the overlap and the representation size grow.

One epoch = both parties' cross products (``ftl.protocol_gradients``) on the Fed-Heart-Disease
transfer split, networks as in ``configs/heart_disease_ftl.py`` (hidden (8,), tanh). For each
(overlap N, d) the same intermediate quantities go through plaintext, secret sharing (Beaver
triples, GF(2^127 - 1)) and Paillier (python-paillier + gmpy2; 1024-bit keys over the grid,
2048-bit -- the configs' key size -- at d = 4); the protected results are checked equal to
plaintext within the fixed-point precision. Reports encryptions, decryptions, bytes each party
sends, seconds per party and the ratio of the protected epoch to plaintext in the same process.
Writes docs/ftl_costs.json and docs/img/ftl_costs.png. ~5 min on a shared 2-core CPU.

  /work/venv/bin/python benchmarks/ftl_costs.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import report as report_lib  # noqa: E402
from fedjax_health.transfer import data as tdata, experiment as ftl_exp, ftl  # noqa: E402
from fedjax_health.transfer.fixed_point import FixedPoint  # noqa: E402
from fedjax_health.transfer.paillier import PaillierProtocol  # noqa: E402
from fedjax_health.transfer.secret_sharing import SecretSharingProtocol  # noqa: E402

OUT = os.path.join(ROOT, "docs", "ftl_costs.json")
PLOT = os.path.join(ROOT, "docs", "img", "ftl_costs.png")


def quantities(arrays, overlap: int, dim: int):
  c = ftl_exp.ftl_config()
  split = tdata.heart_disease_split(overlap, 0, arrays=arrays)
  net_a, net_b = ftl.party_network(c.hidden, dim, c.activation), ftl.party_network(c.hidden, dim, c.activation)
  p_a = net_a.init(jax.random.key(0), split.x_a[:1])
  p_b = net_b.init(jax.random.key(1), split.x_b[:1])
  hp = ftl.FTLHyper(c.alpha, c.gamma, c.lam, c.alignment)
  fns, _ = ftl.make_party_fns(net_a, net_b, p_a, p_b, hp)
  return ftl.compute_parties(fns, ravel_pytree(p_a)[0], ravel_pytree(p_b)[0], split.x_a,
                             split.y_a.astype(np.float32), split.x_b[:overlap])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--overlaps", default="10,20,40")
  p.add_argument("--dims", default="2,4,8")
  p.add_argument("--big_key_overlaps", default="10,20")
  args = p.parse_args()
  arrays = tdata.heart_disease_arrays()
  fp = FixedPoint()
  keys = {bits: PaillierProtocol(bits, fp).keys for bits in (1024, 2048)}
  rows = []
  grid = [(n, d, 1024) for d in map(int, args.dims.split(",")) for n in map(int, args.overlaps.split(","))]
  grid += [(n, 4, 2048) for n in map(int, args.big_key_overlaps.split(","))]
  for overlap, dim, bits in grid:
    pa, pb = quantities(arrays, overlap, dim)
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
      ref = ftl.protocol_gradients(pa, pb)
    plain_s = (time.perf_counter() - t0) / reps
    protos = [("paillier", PaillierProtocol(bits, fp, keypairs=keys[bits]))]
    if bits == 1024:
      protos.append(("secret_sharing", SecretSharingProtocol(fp, seed=0)))
    for name, proto in protos:
      t0 = time.perf_counter()
      got = ftl.protocol_gradients(pa, pb, proto)
      wall = time.perf_counter() - t0
      err = max(float(np.max(np.abs(got[0] - ref[0]))), float(np.max(np.abs(got[1] - ref[1]))))
      assert err < 1e-6, (name, err)
      row = {"protection": name, "key_bits": bits if name == "paillier" else None, "overlap": overlap, "dim": dim,
             "params_a": int(pa.w.shape[0] - 1), "params_b": int(pb.w.shape[0]), "sent_by_a": int(pa.v.size),
             "sent_by_b": int(pb.v.size), "costs": proto.cost_summary(), "wall_s": wall,
             "plaintext_s": plain_s, "ratio_to_plaintext": wall / plain_s, "max_abs_error": err}
      rows.append(row)
      print(f"{name:<15} {bits if name == 'paillier' else '':>5} N={overlap:<4} d={dim}: {wall:7.2f} s "
            f"({wall / plain_s:,.0f}x plaintext), bytes A {row['costs']['A']['bytes_sent']:,} "
            f"B {row['costs']['B']['bytes_sent']:,}, err {err:.1e}", flush=True)
  out = {"benchmark": "ftl_costs", "unit": "one FTL epoch (both parties' cross products)",
         "fixed_point": {"frac_bits": fp.frac_bits, "max_abs": fp.max_abs}, "machine": platform.processor() or platform.machine(),
         "cpus": os.cpu_count(),
         **report_lib.provenance("python benchmarks/ftl_costs.py " + " ".join(sys.argv[1:])), "rows": rows}
  report_lib.write_json(OUT, out)
  plot(out)


def plot(out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for (name, bits), style in ((("paillier", 1024), "-"), (("secret_sharing", None), "--"), (("paillier", 2048), ":")):
    for dim in sorted({r["dim"] for r in out["rows"]}):
      rs = [r for r in out["rows"] if r["protection"] == name and r["key_bits"] == bits and r["dim"] == dim]
      if not rs:
        continue
      n = [r["overlap"] for r in rs]
      label = f"{name}{'-' + str(bits) if bits else ''} d={dim}"
      axes[0].plot(n, [r["wall_s"] for r in rs], style, marker="o", label=label)
      axes[1].plot(n, [r["costs"]["A"]["bytes_sent"] + r["costs"]["B"]["bytes_sent"] for r in rs], style, marker="o", label=label)
  axes[0].set_ylabel("seconds per epoch (both parties)")
  axes[1].set_ylabel("bytes exchanged per epoch")
  for ax in axes:
    ax.set_xlabel("shared patients (overlap)")
    ax.set_yscale("log")
  axes[1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(PLOT, dpi=120)


if __name__ == "__main__":
  main()
