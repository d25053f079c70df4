#!/usr/bin/env bash
# Prepared GPU check (one H100/H200, < 5 minutes): installs jax[cuda12] into a fresh venv and runs
# the throughput and scale benchmarks on the accelerator, writing JSON under $OUT (or benchmarks/out).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
python3 -m venv /tmp/gpu_venv
/tmp/gpu_venv/bin/pip install -q --upgrade pip
/tmp/gpu_venv/bin/pip install -q "jax[cuda12]" flax optax chex absl-py ml-collections numpy matplotlib \
  dp-accounting orbax-checkpoint dm-pix
/tmp/gpu_venv/bin/pip install -q --no-deps -e .
PY=/tmp/gpu_venv/bin/python
$PY -c "import jax; print(jax.devices())" | tee "$OUT/devices.txt"
# W1: dense path at several cohort-map widths (on GPU a wide vmap should win, unlike on CPU) and the
# exact low-rank path at several chunk widths (0 = automatic: ~512 MB of factors per chunk on GPU).
timeout 150 $PY -m benchmarks.throughput --widths 1,250,1000 --lowrank-widths 0,250,1000 --repeats 5 \
  --out "$OUT" | tee "$OUT/throughput.txt"
# Scale curve up to 10,000 clients on both paths.
timeout 100 $PY -m benchmarks.scale --workloads w1,w1_dense --cohorts 1000,10000 --width 1000 --repeats 3 \
  --out "$OUT" | tee "$OUT/scale.txt"
# Gradient inversion, batched vs one victim at a time (issue 6's >= 20x target on images).
timeout 60 $PY benchmarks/inversion_batched.py --workloads=mlp_images,lenet --steps=50 --subset=4 --repeats=1 \
  --out "$OUT/inversion_batched.json" | tee "$OUT/inversion.txt" || true
