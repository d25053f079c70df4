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
# W1 at every cohort-map width (on GPU a wide vmap should win, unlike on CPU).
timeout 150 $PY -m benchmarks.throughput --widths 1,32,250,1000 --repeats 5 --out "$OUT" | tee "$OUT/throughput.txt"
# Scale curve up to 10,000 clients, wide chunks.
timeout 120 $PY -m benchmarks.scale --workloads w1 --cohorts 1000,4000,10000 --width 1000 --repeats 3 --out "$OUT" \
  | tee "$OUT/scale.txt"
