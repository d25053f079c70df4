#!/usr/bin/env bash
# What the TensorBoard / tfds pieces add to a fresh CI install (issue 14): seconds and MB of
# `pip install --no-cache-dir` into a fresh venv, step by step, then whether TensorFlow came along.
#   bash benchmarks/install_cost.sh [VENV_DIR]      (a few minutes; needs PyPI)
set -euo pipefail
d=${1:-/tmp/fedjax_health_install_cost}
rm -rf "$d"; python3 -m venv "$d"
step() {
  local s e; s=$(date +%s.%N); "$d/bin/pip" install -q --no-cache-dir "$@" >/dev/null 2>&1; e=$(date +%s.%N)
  echo "$(python3 -c "print(f'{$e-$s:.1f}')") s, venv $(du -sm "$d" | cut -f1) MB"
}
echo "core deps + previous test extra: $(step jax flax optax chex numpy absl-py ml-collections matplotlib \
  dp-accounting orbax-checkpoint dm-pix pytest pytest-xdist hypothesis scikit-learn)"
echo "+ tensorboardX (core):            $(step tensorboardX)"
echo "+ tensorboard (test extra):       $(step tensorboard)"
echo "+ tensorflow-datasets (test):     $(step tensorflow-datasets)"
"$d/bin/python" -c "import sys, tensorflow_datasets, tensorboardX, tensorboard; print('tensorflow imported:', 'tensorflow' in sys.modules)"
"$d/bin/pip" list 2>/dev/null | grep -ci '^tensorflow ' | sed 's/^/tensorflow installed (count): /'
