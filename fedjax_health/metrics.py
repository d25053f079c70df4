"""Evaluation metrics: pooled and per-client accuracy/loss, worst clients, AUC, bytes sent.

Evaluation runs one compiled forward pass over every client's test split at once (flat arrays,
per-client sums with ``segment_sum``), so evaluating 10,000 clients costs one pass over the data.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_health.data.federated import FederatedDataset
from fedjax_health.models import per_example_loss, positive_score, predict_labels

Params = Any


def device_eval_data(dataset: FederatedDataset) -> dict:
  """Returns the device pytree ``{"x", "y", "client"}`` for ``evaluate``."""
  return {"x": jnp.asarray(dataset.x), "y": jnp.asarray(dataset.y),
          "client": jnp.asarray(dataset.client_of_example(), jnp.int32)}


def _chunked_apply(apply_fn, params, x, chunk: int):
  n = x.shape[0]
  if n <= chunk:
    return apply_fn(params, x)
  pad = (-n) % chunk
  xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
  out = jax.lax.map(lambda xb: apply_fn(params, xb), xp.reshape((-1, chunk) + x.shape[1:]))
  return out.reshape((-1,) + out.shape[2:])[:n]


def example_outputs(apply_fn: Callable, params: Params, data: dict, chunk: int = 4096) -> dict:
  """Returns per-example ``loss``, ``correct`` and ``score`` (class-1 score for binary tasks)."""
  logits = _chunked_apply(apply_fn, params, data["x"], chunk)
  return {"loss": per_example_loss(logits, data["y"]),
          "correct": (predict_labels(logits) == data["y"]).astype(jnp.float32),
          "score": positive_score(logits) if logits.shape[-1] <= 2 else jnp.zeros(logits.shape[0])}


def per_client_means(values: jax.Array, client: jax.Array, num_clients: int) -> tuple[jax.Array, jax.Array]:
  """Returns (per-client mean of ``values``, per-client count)."""
  counts = jax.ops.segment_sum(jnp.ones_like(values), client, num_segments=num_clients)
  sums = jax.ops.segment_sum(values, client, num_segments=num_clients)
  return sums / jnp.maximum(counts, 1.0), counts


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Returns the ROC AUC (Mann-Whitney U with average ranks for ties); NaN with one class."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  n_pos, n_neg = labels.sum(), (~labels).sum()
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  s = scores[order]
  ranks = np.empty(len(s))
  i = 0
  while i < len(s):  # average ranks over ties
    j = i
    while j + 1 < len(s) and s[j + 1] == s[i]:
      j += 1
    ranks[i:j + 1] = 0.5 * (i + j) + 1.0
    i = j + 1
  r = np.empty(len(s))
  r[order] = ranks
  return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def worst_fraction_mean(values: np.ndarray, fraction: float = 0.1) -> float:
  """Returns the mean of the worst ``fraction`` of values (at least one)."""
  v = np.sort(np.asarray(values))
  k = max(1, int(np.ceil(fraction * len(v))))
  return float(np.mean(v[:k]))


def summarize(outputs: dict, data: dict, num_clients: int, num_classes: int) -> dict:
  """Returns host-side metrics from per-example outputs (pooled, per-client, worst, AUC)."""
  acc_c, counts = per_client_means(outputs["correct"], data["client"], num_clients)
  loss_c, _ = per_client_means(outputs["loss"], data["client"], num_clients)
  acc_c, counts, loss_c = np.asarray(acc_c), np.asarray(counts), np.asarray(loss_c)
  has = counts > 0
  metrics = {
      "accuracy": float(np.mean(np.asarray(outputs["correct"]))),
      "loss": float(np.mean(np.asarray(outputs["loss"]))),
      "mean_client_accuracy": float(np.mean(acc_c[has])),
      "worst_client_accuracy": float(np.min(acc_c[has])),
      "worst10_client_accuracy": worst_fraction_mean(acc_c[has], 0.1),
      "per_client_accuracy": acc_c.tolist(),
      "per_client_loss": loss_c.tolist(),
  }
  if num_classes == 2:
    metrics["auc"] = roc_auc(np.asarray(outputs["score"]), np.asarray(data["y"]))
  return metrics


def make_evaluator(apply_fn: Callable, num_clients: int, num_classes: int, chunk: int = 4096):
  """Returns ``evaluate(params, data) -> metrics`` with the forward pass compiled once."""
  outputs_fn = jax.jit(lambda p, d: example_outputs(apply_fn, p, d, chunk))

  def evaluate(params, data):
    return summarize(outputs_fn(params, data), data, num_clients, num_classes)

  return evaluate


def bytes_per_update(params: Params, bits: int = 32) -> int:
  """Returns the bytes one client sends for a dense update of ``params`` at ``bits`` per value."""
  return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)) * bits // 8)


def cohort_train_loss(loss: jax.Array, weights: jax.Array, rejected: jax.Array | None = None) -> dict:
  """Returns ``train_loss`` (weighted mean over the clients that contributed) and ``all_rejected``.

  A client contributes when its weight is > 0 and it was not ``rejected``; the losses of the
  others are selected away with ``where`` (a rejected client's loss may be NaN, and NaN x 0 is
  NaN). When no client contributed, ``train_loss`` is 0 and ``all_rejected`` is 1.
  """
  w = weights if rejected is None else jnp.where(rejected, 0.0, weights)
  total = jnp.sum(w)
  loss_sum = jnp.sum(jnp.where(w > 0, loss, 0.0) * w)
  return {"train_loss": loss_sum / jnp.maximum(total, 1.0), "all_rejected": (total <= 0).astype(jnp.float32)}
