"""Supervised baselines for the transfer experiments: one party's (or all) features, some labels.

The same flax MLP body as an FTL party with one logit, trained full batch with Adam on the exact
logistic loss plus L2: (1) B's features with only the overlap's labels, (3) B's features with
every label, (4) all features of both parties with every label.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_health import models
from fedjax_health.metrics import roc_auc


def train_logistic_mlp(x, y, hidden, activation: str, epochs: int, lr: float, lam: float, seed: int):
  """Returns ``score(x) -> logits`` of an MLP trained on (x, y) with y in {0, 1}."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if x.shape[0] < 1:
    raise ValueError("baseline needs at least one labelled row")
  net = models.MLP(hidden=tuple(hidden), num_outputs=1, activation=activation)
  params = net.init(jax.random.key(seed), x[:1])
  opt = optax.adam(lr)

  def loss(p):
    logits = net.apply(p, x)[:, 0]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)) + 0.5 * lam * sum(
        jnp.sum(q ** 2) for q in jax.tree.leaves(p))

  @jax.jit
  def run(p):
    def step(carry, _):
      p, s = carry
      upd, s = opt.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, upd), s), None
    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=epochs)
    return p

  params = run(params)
  return lambda xs: np.asarray(net.apply(params, jnp.asarray(xs, jnp.float32))[:, 0], np.float64)


def scores_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
  """Returns AUC and accuracy (class 1 when score > 0)."""
  labels = np.asarray(labels).astype(int)
  return {"auc": roc_auc(scores, labels), "accuracy": float(np.mean((scores > 0).astype(int) == labels))}
