#!/usr/bin/env bash
# Creates the baseline venvs the comparison benchmark needs (never part of CI):
#   benchmarks/venvs/fedjax : FedJAX 0.0.17 on jax/jaxlib 0.4.30, dm-haiku 0.0.13
#   benchmarks/venvs/flower : Flower's simulation engine (flwr[simulation], Ray) + jax for the model
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python3}
mkdir -p venvs
if [ ! -x venvs/fedjax/bin/python ]; then
  $PY -m venv venvs/fedjax
  venvs/fedjax/bin/pip install -q --upgrade pip
  venvs/fedjax/bin/pip install -q "fedjax==0.0.17" "jax==0.4.30" "jaxlib==0.4.30" "dm-haiku==0.0.13" \
    "numpy<2" "optax==0.2.2" "chex==0.1.86" "tensorflow-cpu" 
fi
if [ ! -x venvs/flower/bin/python ]; then
  $PY -m venv venvs/flower
  venvs/flower/bin/pip install -q --upgrade pip
  venvs/flower/bin/pip install -q "flwr[simulation]" jax optax flax numpy
fi
echo "baseline venvs ready: $(ls venvs)"
