"""Architecture-free quantities that heterogeneous clients exchange, as pure functions.

Clients that run different architectures cannot average weights; they exchange quantities whose
shape depends only on the task:
  * per-label mean logits ``[K, K]`` (FD, Jeong et al. 2018, "Communication-efficient on-device
    machine learning: federated distillation and augmentation under non-IID private data"),
  * class prototypes ``[K, D]``, the mean embedding of each class (FedProto, Tan et al. AAAI 2022),
  * logits on a shared public set ``[P, K]`` (FedMD, Li & Wang 2019; FedDF's ensemble teacher,
    Lin et al. NeurIPS 2020).
Everything here is a function of arrays only (no simulation, config or checkpoint imports), so
research code can use it directly; ``algorithms.py`` wires it into registered algorithms.
Clients are always on a leading axis and every reduction over it is a sum, so results do not
depend on client order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_BYTES = 4  # float32 on the wire
COUNT_BYTES = 4  # int32 per-class counts


def as_class_logits(logits: jax.Array) -> jax.Array:
  """Returns ``[..., K]`` class logits; a single binary logit z becomes ``[0, z]`` (same softmax)."""
  if logits.shape[-1] == 1:
    return jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
  return logits


def class_sums(values: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Returns (per-class sums ``[K, D]``, counts ``[K]``) of ``values [N, D]`` over valid rows."""
  m = mask.astype(values.dtype)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=values.dtype) * m[:, None]  # [N, K]
  return onehot.T @ values, jnp.sum(onehot, axis=0)


def class_means(values: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Returns (per-class means ``[K, D]``, 0 for absent classes; counts ``[K]``).

  FD's per-label mean logits (``values`` = logits) and FedProto's local prototypes (``values`` =
  embeddings, eq. 4 of Tan et al.) are both this.
  """
  sums, counts = class_sums(values, labels, mask, num_classes)
  return sums / jnp.maximum(counts, 1.0)[:, None], counts


def aggregate_prototypes(protos: jax.Array, counts: jax.Array, weighted: bool = True) -> tuple[jax.Array, jax.Array]:
  """Returns (global prototypes ``[K, D]``, present ``[K]``) from clients' ``protos [C, K, D]``.

  Each class is averaged over the clients holding it (count > 0), never over all clients: a client
  without class k contributes nothing to prototype k. ``weighted``: by the clients' counts of the
  class (eq. 6 of Tan et al.: sum_i |D_ik| / N_k C_i(k)); otherwise the plain mean over the holders
  (the authors' code). Classes nobody holds get a zero prototype and ``present`` False.
  """
  holds = (counts > 0).astype(protos.dtype)
  w = counts.astype(protos.dtype) if weighted else holds
  total = jnp.sum(w, axis=0)  # [K]
  glob = jnp.einsum("ck,ckd->kd", w, protos) / jnp.maximum(total, 1e-12)[:, None]
  present = jnp.sum(holds, axis=0) > 0
  return jnp.where(present[:, None], glob, 0.0), present


def leave_one_out_label_logits(label_logits: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns FD's teachers ``[C, K, K]`` and their validity ``[C, K]`` from per-label logits ``[C, K, K]``.

  The server averages each label's logit vector over the clients holding the label; client i's
  teacher for label l leaves i's own vector out (Jeong et al. 2018, Alg. 1: the global average
  minus the local one, over M - 1 devices), so a client never distils towards itself. A label held
  by no other client has no teacher (valid False).
  """
  holds = (counts > 0).astype(label_logits.dtype)  # [C, K]
  total = jnp.einsum("ck,ckj->kj", holds, label_logits)  # [K, K]
  n = jnp.sum(holds, axis=0)  # [K]
  others = n[None, :] - holds  # [C, K]
  teacher = (total[None] - holds[..., None] * label_logits) / jnp.maximum(others, 1.0)[..., None]
  valid = others > 0
  return jnp.where(valid[..., None], teacher, 0.0), valid


def kl_distillation(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Returns ``[B]`` KL(softmax(t / T) || softmax(s / T)) * T^2 (Hinton et al. 2015).

  Zero exactly when student and teacher logits agree up to a constant shift; T^2 keeps the
  gradient's scale independent of the temperature. Single binary logits are expanded to two.
  """
  s = as_class_logits(student_logits) / temperature
  t = as_class_logits(teacher_logits) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1) * temperature ** 2


def squared_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Returns ``[B]`` mean squared difference over the last axis (FedProto's L_R, an MSE)."""
  return jnp.mean(jnp.square(a - b), axis=-1)


def nearest_prototype(embeddings: jax.Array, protos: jax.Array, present: jax.Array) -> jax.Array:
  """Returns ``[B]`` the class of the nearest present prototype (FedProto's inference)."""
  d = jnp.sum(jnp.square(embeddings[:, None, :] - protos[None]), axis=-1)  # [B, K]
  return jnp.argmin(jnp.where(present[None], d, jnp.inf), axis=-1).astype(jnp.int32)


def consensus(logits: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Returns the (weighted) mean over parties of ``logits [C, P, K]``: FedMD's consensus, FedDF's teacher."""
  if weights is None:
    return jnp.mean(logits, axis=0)
  w = weights.astype(logits.dtype)
  return jnp.einsum("c,cpk->pk", w, logits) / jnp.maximum(jnp.sum(w), 1e-12)


# ----------------------------------------------------------------------------------------------
# Bytes per client per round, closed forms (float32 values, int32 counts).


def num_params(params) -> int:
  return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))


def fedavg_bytes(params) -> tuple[int, int]:
  """Returns (up, down): a dense update up, the new global model down."""
  b = num_params(params) * FLOAT_BYTES
  return b, b


def fd_bytes(num_classes: int) -> tuple[int, int]:
  """Returns (up, down): K per-label mean logit vectors of K values plus K label counts, each way."""
  b = num_classes * num_classes * FLOAT_BYTES + num_classes * COUNT_BYTES
  return b, b


def fedproto_bytes(num_classes: int, embedding_dim: int) -> tuple[int, int]:
  """Returns (up, down): K prototypes of D values plus K counts (down: the presence mask as counts)."""
  b = num_classes * embedding_dim * FLOAT_BYTES + num_classes * COUNT_BYTES
  return b, b


def fedmd_bytes(num_public: int, num_classes: int) -> tuple[int, int]:
  """Returns (up, down): logits on the round's P public examples up, the consensus down.

  The round's public indices come from a seed both sides share, so they cost nothing.
  """
  b = num_public * num_classes * FLOAT_BYTES
  return b, b
