"""Attacker model and data poisoning: malicious clients, label flipping, backdoor triggers, edge cases.

Attacker model. ``attacker_ctx_fn`` returns the ``client_ctx_fn`` of ``fedavg``: each round it
marks which cohort members are malicious, ``ctx["malicious"] : bool [cohort]``. The malicious set
is either fixed (a set of client ids, or a fraction of the population drawn once) or redrawn per
round (a fraction of each cohort), and the attack can be limited to a window of rounds
(``start_round``, ``stop_round``, every ``every`` rounds) so attacks can start from a model that
is near convergence.

Data poisoning runs on device as ``data_transform(x, y, mask, rng, ctx) -> (x, y)`` hooks on each
local batch, applied only where ``ctx["malicious"]`` (selected with ``jnp.where``):

* ``label_flip``: targeted (source -> target) or all labels ``y -> K - 1 - y`` (Tolpegin et al.
  2020, "Data poisoning attacks against federated learning systems").
* ``backdoor``: a trigger stamped on a fraction of each batch, relabelled to the target class
  (Gu et al. 2017, BadNets; Bagdasaryan et al. 2020, "How to backdoor federated learning").
  Triggers: ``pixel_patch`` for images, ``feature_trigger`` for tabular records.
* ``edge_case``: a fraction of each batch replaced by tail-of-distribution inputs relabelled to
  the target (Wang et al. 2020, "Attack of the tails: yes, you really can backdoor FL").
  ``split_edge_cases`` carves such inputs out of a dataset by low k-NN density.

Attack success rate (ASR): ``triggered_inputs`` stamps the trigger on test inputs *not already of
the target class* and ``attack_success_rate`` is the fraction classified as the target.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_health import context
from fedjax_health.data.federated import FederatedData, FederatedDataset
from fedjax_health.models import predict_labels

DataTransform = Callable[..., tuple[jax.Array, jax.Array]]
Trigger = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# Attacker model.


def check_fraction(fraction: float, name: str = "malicious fraction") -> None:
  if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
    raise ValueError(f"{name} must be in [0, 1), got {fraction!r}")


def fixed_malicious_set(num_clients: int, fraction: float = 0.0, clients: Sequence[int] | None = None,
                        seed: int = 0) -> np.ndarray:
  """Returns ``bool [num_clients]``: the given ``clients``, or ``floor(fraction * N)`` drawn at random."""
  mask = np.zeros(num_clients, bool)
  if clients:
    ids = np.asarray(list(clients), np.int64)
    if ids.min() < 0 or ids.max() >= num_clients:
      raise ValueError(f"malicious clients must be ids in [0, {num_clients}), got {list(clients)}")
    if len(set(ids.tolist())) >= num_clients:
      raise ValueError(f"malicious clients must leave at least one honest client (fraction < 1), got {list(clients)}")
    mask[ids] = True
    return mask
  check_fraction(fraction)
  m = int(np.floor(fraction * num_clients))
  mask[np.random.default_rng(seed).permutation(num_clients)[:m]] = True
  return mask


def attack_active(round_idx: jax.Array, start_round: int = 0, stop_round: int | None = None,
                  every: int = 1) -> jax.Array:
  """Returns whether the attack runs in ``round_idx``: ``start <= r < stop`` and ``(r - start) % every == 0``."""
  active = (round_idx >= start_round) & ((round_idx - start_round) % every == 0)
  if stop_round is not None:
    active &= round_idx < stop_round
  return active


def attacker_ctx_fn(num_clients: int, *, fraction: float = 0.0, clients: Sequence[int] | None = None,
                    per_round: bool = False, seed: int = 0, start_round: int = 0, stop_round: int | None = None,
                    every: int = 1) -> Callable:
  """Returns ``client_ctx_fn(cohort, round, rng) -> {"client_id", "malicious": bool [cohort]}``.

  Args:
    fraction: share of malicious clients, in [0, 1): of the population (fixed set, drawn once
      with ``seed``) or, with ``per_round``, of each cohort (``round(fraction * cohort)`` redrawn
      every round with the round's key).
    clients: explicit fixed malicious client ids (overrides ``fraction``).
    start_round, stop_round, every: the rounds in which the malicious clients attack; outside
      them they behave honestly (and are reported as honest).
  """
  check_fraction(fraction)
  if every < 1:
    raise ValueError(f"attack every must be >= 1, got {every}")
  if start_round < 0:
    raise ValueError(f"attack start_round must be >= 0, got {start_round}")
  if per_round and clients:
    raise ValueError("per_round attackers are a fraction of each cohort; do not also give fixed clients")
  table = None if per_round else jnp.asarray(fixed_malicious_set(num_clients, fraction, clients, seed))

  def ctx_fn(cohort, round_idx, rng):
    if per_round:
      c = cohort.shape[0]
      m = int(round(fraction * c))
      rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (c,))))
      malicious = rank < m
    else:
      malicious = table[cohort]
    malicious = malicious & attack_active(round_idx, start_round, stop_round, every)
    return {"client_id": cohort, "malicious": malicious}

  return ctx_fn


# ----------------------------------------------------------------------------------------------
# Data poisoning hooks.


def _malicious(ctx) -> jax.Array:
  return jnp.asarray(context.client_value(ctx, "malicious", "data poisoning (data_transform hook)"), bool)


def compose_data_transforms(*fns: DataTransform | None) -> DataTransform | None:
  """Returns the data transform applying ``fns`` in order (None entries skipped)."""
  fns = [f for f in fns if f is not None]
  if not fns:
    return None

  def transform(x, y, mask, rng, ctx):
    for f, k in zip(fns, jax.random.split(rng, len(fns))):
      x, y = f(x, y, mask, k, ctx)
    return x, y

  return transform


def label_flip(num_classes: int, source: int | None = None, target: int | None = None) -> DataTransform:
  """Returns the label-flipping hook: ``source -> target`` or, without them, ``y -> K - 1 - y``."""
  if num_classes < 2:
    raise ValueError(f"label_flip num_classes must be >= 2, got {num_classes}")
  if (source is None) != (target is None):
    raise ValueError("label_flip needs both source and target, or neither (flip all labels)")
  for name, v in (("source", source), ("target", target)):
    if v is not None and not 0 <= v < num_classes:
      raise ValueError(f"label_flip {name} must be in [0, {num_classes}), got {v}")

  def transform(x, y, mask, rng, ctx):
    del mask, rng
    flipped = (num_classes - 1 - y) if source is None else jnp.where(y == source, target, y)
    return x, jnp.where(_malicious(ctx), flipped.astype(y.dtype), y)

  return transform


def pixel_patch(size: int = 3, value: float = 1.0, corner: str = "bottom_right", margin: int = 1) -> Trigger:
  """Returns a BadNets-style trigger: a ``size x size`` square of ``value`` in an image corner.

  Works on images ``[..., H, W, C]``; ``margin`` pixels from the border.
  """
  if size < 1 or margin < 0:
    raise ValueError(f"pixel_patch size must be >= 1 and margin >= 0, got size={size}, margin={margin}")
  if corner not in ("bottom_right", "top_left", "top_right", "bottom_left"):
    raise ValueError(f"pixel_patch corner must be bottom_right|top_left|top_right|bottom_left, got {corner!r}")

  def trigger(x):
    h, w = x.shape[-3], x.shape[-2]
    if size + margin > min(h, w):
      raise ValueError(f"pixel_patch of size {size} + margin {margin} does not fit a {h}x{w} image")
    top = margin if corner.startswith("top") else h - margin - size
    left = margin if corner.endswith("left") else w - margin - size
    rows = (jnp.arange(h) >= top) & (jnp.arange(h) < top + size)
    cols = (jnp.arange(w) >= left) & (jnp.arange(w) < left + size)
    patch = (rows[:, None] & cols[None, :])[..., None]
    return jnp.where(patch, jnp.asarray(value, x.dtype), x)

  return trigger


def feature_trigger(indices: Sequence[int], values: Sequence[float]) -> Trigger:
  """Returns a tabular trigger: features ``indices`` of each record ``[..., F]`` set to ``values``."""
  if len(indices) == 0 or len(indices) != len(values):
    raise ValueError(f"feature_trigger needs as many values as (>= 1) indices, got {list(indices)}, {list(values)}")
  idx = np.asarray(indices, np.int64)
  vals = np.asarray(values, np.float32)

  def trigger(x):
    if idx.max() >= x.shape[-1] or idx.min() < -x.shape[-1]:
      raise ValueError(f"feature_trigger indices {idx.tolist()} out of range for {x.shape[-1]} features")
    return x.at[..., idx].set(jnp.asarray(vals, x.dtype))

  return trigger


def _check_poison(target: int, poison_fraction: float) -> None:
  if not 0.0 < poison_fraction <= 1.0:
    raise ValueError(f"poison_fraction must be in (0, 1], got {poison_fraction}")
  if target < 0:
    raise ValueError(f"backdoor target class must be >= 0, got {target}")


def backdoor(trigger: Trigger, target: int, poison_fraction: float = 0.5) -> DataTransform:
  """Returns the backdoor hook: each example of a malicious batch is, with probability
  ``poison_fraction``, stamped with ``trigger`` and relabelled ``target``; the rest stay clean
  (mixing clean data keeps main-task accuracy, Bagdasaryan et al. 2020)."""
  _check_poison(target, poison_fraction)

  def transform(x, y, mask, rng, ctx):
    del mask
    chosen = _malicious(ctx) & jax.random.bernoulli(rng, poison_fraction, y.shape[:1])
    sel = chosen.reshape(chosen.shape + (1,) * (x.ndim - 1))
    return jnp.where(sel, trigger(x), x), jnp.where(chosen, jnp.asarray(target, y.dtype), y)

  return transform


def edge_case(pool_x: jax.Array, target: int, poison_fraction: float = 0.5) -> DataTransform:
  """Returns the edge-case backdoor hook (Wang et al. 2020): with probability ``poison_fraction``
  each example of a malicious batch is replaced by a random input of ``pool_x`` (tail-of-
  distribution inputs held by the attacker) labelled ``target``."""
  _check_poison(target, poison_fraction)
  pool = jnp.asarray(pool_x)
  if pool.shape[0] < 1:
    raise ValueError("edge_case needs a non-empty pool of edge-case inputs")

  def transform(x, y, mask, rng, ctx):
    del mask
    k_pick, k_idx = jax.random.split(rng)
    chosen = _malicious(ctx) & jax.random.bernoulli(k_pick, poison_fraction, y.shape[:1])
    edge = pool[jax.random.randint(k_idx, y.shape[:1], 0, pool.shape[0])].astype(x.dtype)
    sel = chosen.reshape(chosen.shape + (1,) * (x.ndim - 1))
    return jnp.where(sel, edge, x), jnp.where(chosen, jnp.asarray(target, y.dtype), y)

  return transform


# ----------------------------------------------------------------------------------------------
# Edge cases: tail-of-distribution inputs by k-NN density.


def knn_distance(query: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
  """Returns each query row's mean Euclidean distance to its ``k`` nearest reference rows."""
  q = query.reshape(len(query), -1).astype(np.float64)
  r = reference.reshape(len(reference), -1).astype(np.float64)
  d = np.sqrt(np.maximum((q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2 * q @ r.T, 0.0))
  if exclude_self:
    d = np.where(np.eye(len(q), len(r), dtype=bool), np.inf, d)
  return np.sort(d, axis=1)[:, :k].mean(1)


def edge_case_mask(x_ref: np.ndarray, y_ref: np.ndarray, x: np.ndarray, y: np.ndarray, source_class: int,
                   quantile: float, k: int = 5, x_is_ref: bool = False) -> np.ndarray:
  """Returns ``bool [len(x)]``: examples of ``source_class`` whose k-NN distance to the reference
  examples of that class exceeds the ``quantile`` of the reference's own (leave-one-out) k-NN
  distances, i.e. the low-density tail of the class."""
  if not 0.0 < quantile < 1.0:
    raise ValueError(f"edge-case quantile must be in (0, 1), got {quantile}")
  ref = x_ref[y_ref == source_class]
  if len(ref) <= k:
    raise ValueError(f"edge cases need more than k={k} reference examples of class {source_class}, got {len(ref)}")
  threshold = np.quantile(knn_distance(ref, ref, k, exclude_self=True), quantile)
  out = np.zeros(len(x), bool)
  src = np.flatnonzero(y == source_class)
  if len(src):  # x_is_ref: x is x_ref itself, so each query must not count itself as a neighbour
    out[src] = knn_distance(x[src], ref, k, exclude_self=x_is_ref) > threshold
  return out


def drop_examples(ds: FederatedDataset, keep: np.ndarray) -> FederatedDataset:
  """Returns ``ds`` without the examples where ``keep`` is False (client order kept)."""
  keep = np.asarray(keep, bool)
  sizes = np.array([keep[ds.offsets[c]:ds.offsets[c + 1]].sum() for c in range(ds.num_clients)])
  return FederatedDataset({k: v[keep] for k, v in ds.arrays.items()}, np.concatenate([[0], np.cumsum(sizes)]),
                          ds.client_ids)


def split_edge_cases(data: FederatedData, source_class: int, quantile: float = 0.8, k: int = 5
                     ) -> tuple[FederatedData, np.ndarray, np.ndarray]:
  """Returns (data without the edge cases, attacker's edge-case pool, edge-case test inputs).

  Edge cases are the low-density tail of ``source_class`` (``edge_case_mask``) in the training
  split, removed from the honest clients so they stay rare in the federation and handed to the
  attacker; the test split's tail examples (same threshold) measure the backdoor's success and
  are removed from the main-task test set.
  """
  tr, te = data.train, data.test
  train_edge = edge_case_mask(tr.x, tr.y, tr.x, tr.y, source_class, quantile, k, x_is_ref=True)
  test_edge = edge_case_mask(tr.x, tr.y, te.x, te.y, source_class, quantile, k)
  if not train_edge.any() or not test_edge.any():
    raise ValueError(f"no edge cases of class {source_class} at quantile {quantile}; lower the quantile")
  new = dataclasses.replace(data, train=drop_examples(tr, ~train_edge), test=drop_examples(te, ~test_edge))
  return new, tr.x[train_edge], te.x[test_edge]


# ----------------------------------------------------------------------------------------------
# Attack success rate.


def triggered_inputs(x: np.ndarray, y: np.ndarray, trigger: Trigger, target: int) -> np.ndarray:
  """Returns the trigger stamped on the inputs whose true class is not ``target``."""
  keep = np.asarray(y) != target
  return np.asarray(trigger(jnp.asarray(x[keep])))


def attack_success_rate(apply_fn: Callable, params, x_attack: jax.Array, target: int) -> jax.Array:
  """Returns the fraction of ``x_attack`` classified as ``target`` (NaN if empty)."""
  if x_attack.shape[0] == 0:
    return jnp.asarray(jnp.nan)
  return jnp.mean((predict_labels(apply_fn(params, x_attack)) == target).astype(jnp.float32))
