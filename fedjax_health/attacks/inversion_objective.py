"""The pieces of a gradient-inversion attack: its spec, its result, the objective and its blocks.

``inversion.py`` assembles them into DLG, iDLG and Inverting Gradients (papers cited there). Each
block is a pure function tested against a NumPy reference: gradient distances (L2, cosine), the
total-variation prior, iDLG's label read from the head bias gradient, the victim's simulated upload
(one gradient, or a multi-step local update replayed through the victim's optimiser), the attack
optimiser, and the dummy's initialisation and projection.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_health.models import Model, per_example_loss

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

DISTANCES = ("l2", "cosine")
LABEL_MODES = ("soft", "idlg", "given")
OPTIMIZERS = ("adam", "signed_adam", "lbfgs")
OBSERVATIONS = ("gradient", "update")


@dataclasses.dataclass(frozen=True)
class InversionSpec:
  """Static description of an attack on one victim's upload.

  Attributes:
    batch_size: examples behind the upload (the dummy batch size B).
    input_shape: shape of one example, e.g. ``(16, 16, 1)`` or ``(13,)``.
    num_classes: classes of the task (2 for a one-logit sigmoid head).
    distance: ``l2`` (DLG) or ``cosine`` (Inverting Gradients).
    labels: ``soft`` (optimised jointly, DLG), ``idlg`` (read from the head bias, B = 1) or
      ``given`` (passed in: the attacker knows them).
    optimizer: ``lbfgs`` (DLG), ``adam`` or ``signed_adam`` (Inverting Gradients).
    num_steps, learning_rate: optimiser iterations and step size (L-BFGS uses a line search).
    tv_weight: weight of the total-variation prior (images only).
    num_restarts: independent initialisations; the one with the lowest objective is kept.
    bounds: data range ``(lo, hi)`` to initialise in and project onto, or None (unbounded, normal init).
    step_decay: multiply the step size by 0.1 at 3/8, 5/8 and 7/8 of the steps (Geiping et al.).
    observation: ``gradient`` (one gradient of the batch mean loss) or ``update`` (params after
      ``local_steps`` optimiser steps minus params before; the victim optimiser is unrolled).
    local_steps, local_batch_size: the victim's local schedule for ``update``; steps take batches of
      ``local_batch_size`` in order, cycling (0 = the whole batch each step).
    label_layer: path of the output layer's bias that iDLG reads (None: ``head/bias``;
      ``invert`` and ``invert_victims`` find it for any flax model with ``find_output_bias``).
  """

  batch_size: int
  input_shape: tuple[int, ...]
  num_classes: int
  distance: str = "cosine"
  labels: str = "idlg"
  optimizer: str = "signed_adam"
  num_steps: int = 200
  learning_rate: float = 0.1
  tv_weight: float = 0.0
  num_restarts: int = 1
  bounds: tuple[float, float] | None = (0.0, 1.0)
  step_decay: bool = True
  observation: str = "gradient"
  local_steps: int = 1
  local_batch_size: int = 0
  label_layer: tuple[str, ...] | None = None

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
    if self.bounds is not None:
      object.__setattr__(self, "bounds", (float(self.bounds[0]), float(self.bounds[1])))
    if self.label_layer is not None:
      object.__setattr__(self, "label_layer", tuple(str(k) for k in self.label_layer))
    checks = [
        (self.batch_size >= 1, "batch_size", ">= 1"),
        (len(self.input_shape) >= 1 and all(d >= 1 for d in self.input_shape), "input_shape", "non-empty, positive"),
        (self.num_classes >= 2, "num_classes", ">= 2"),
        (self.distance in DISTANCES, "distance", f"one of {DISTANCES}"),
        (self.labels in LABEL_MODES, "labels", f"one of {LABEL_MODES}"),
        (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
        (self.num_steps >= 1, "num_steps", ">= 1"),
        (self.learning_rate > 0, "learning_rate", "> 0"),
        (self.tv_weight >= 0, "tv_weight", ">= 0"),
        (self.num_restarts >= 1, "num_restarts", ">= 1"),
        (self.bounds is None or self.bounds[0] < self.bounds[1], "bounds", "None or (lo, hi) with lo < hi"),
        (self.observation in OBSERVATIONS, "observation", f"one of {OBSERVATIONS}"),
        (self.local_steps >= 1, "local_steps", ">= 1"),
        (0 <= self.local_batch_size <= self.batch_size, "local_batch_size", f"in [0, batch_size={self.batch_size}]"),
    ]
    for ok, name, allowed in checks:
      if not ok:
        raise ValueError(f"InversionSpec.{name} must be {allowed}, got {getattr(self, name)!r}")
    if self.labels == "idlg" and self.batch_size != 1:
      raise ValueError(f"InversionSpec.labels='idlg' reads one label from the head bias gradient and supports "
                       f"batch_size 1 only (Zhao et al. 2020), got batch_size={self.batch_size}; use labels='soft' "
                       "or 'given' for larger batches")
    if self.tv_weight > 0 and len(self.input_shape) != 3:
      raise ValueError(f"InversionSpec.tv_weight > 0 needs image inputs (H, W, C), got input_shape={self.input_shape}")
    if self.observation == "gradient" and self.local_steps != 1:
      raise ValueError(f"InversionSpec.local_steps must be 1 when observation='gradient', got {self.local_steps}")


class Reconstruction(NamedTuple):
  """The attack's output for one victim (a leading ``[V]`` axis when batched over victims).

  ``x``: reconstructed inputs ``[B, ...]``; ``labels``: int ``[B]``; ``label_probs``: ``[B, K]``;
  ``objective``: the best restart's final objective; ``restart_objectives``: ``[R]``.
  """

  x: jax.Array
  labels: jax.Array
  label_probs: jax.Array
  objective: jax.Array
  restart_objectives: jax.Array


def apply_fn_of(model_or_apply: Model | ApplyFn) -> ApplyFn:
  return model_or_apply.apply if isinstance(model_or_apply, Model) else model_or_apply


# ----------------------------------------------------------------------------------------------
# Building blocks (each tested against a NumPy reference).


def batch_mean_loss(apply_fn: ApplyFn, params: Params, x: jax.Array, labels: jax.Array) -> jax.Array:
  """Returns the mean loss of the batch: softmax CE, or sigmoid BCE for one logit; labels int or soft."""
  return jnp.mean(per_example_loss(apply_fn(params, x), labels))


def l2_distance(a: Params, b: Params) -> jax.Array:
  """Returns ``sum_leaves ||a - b||^2`` (DLG)."""
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def cosine_distance(a: Params, b: Params, eps: float = 1e-12) -> jax.Array:
  """Returns ``1 - <a, b> / (|a| |b|)`` over all leaves flattened together (Geiping et al.)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  dot = sum(jnp.sum(x * y) for x, y in zip(la, lb))
  na = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in la))
  nb = jnp.sqrt(sum(jnp.sum(jnp.square(y)) for y in lb))
  return 1.0 - dot / jnp.maximum(na * nb, eps)


def total_variation(x: jax.Array) -> jax.Array:
  """Returns the anisotropic TV of images ``[B, H, W, C]``: mean |dx| + mean |dy|."""
  return jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) + jnp.mean(jnp.abs(x[:, :, 1:] - x[:, :, :-1]))


def head_bias(tree: Params, path: tuple[str, ...] | None = None) -> jax.Array:
  """Returns the output layer's bias leaf of ``tree`` (params or a gradient of them).

  ``path`` names it (e.g. ``("Dense_2", "bias")``, found by ``find_output_bias``); without it,
  ``("head", "bias")`` (the models of this package) or else the only 1-D ``bias`` leaf whose
  size is the model's output width cannot be told apart here, so a model without a ``head``
  layer needs the path (``invert`` / ``invert_victims`` find it for you).
  """
  path = ("head", "bias") if path is None else tuple(path)
  node = tree
  try:
    for key in path:
      node = node[key]
  except (KeyError, TypeError, IndexError):
    raise ValueError(f"iDLG reads the label from the gradient of the last layer's bias; this model has no "
                     f"parameter {'/'.join(path)} (pass InversionSpec(label_layer=...) or let invert() find "
                     "it with find_output_bias)") from None
  return node


def _bias_candidates(params: Params, num_outputs: int) -> list[tuple[str, ...]]:
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
    if keys and keys[-1] == "bias" and jnp.ndim(leaf) == 1 and leaf.shape[0] == num_outputs:
      out.append(keys)
  return out


def find_output_bias(apply_fn: ApplyFn, params: Params, input_shape) -> tuple[str, ...]:
  """Returns the path of the output layer's bias in any flax model's params.

  The output bias is the 1-D ``bias`` leaf that shifts the logits one to one: its Jacobian
  ``d logits / d bias`` is the identity (checked at a random input; a hidden layer's bias passes
  through weights and an activation). Raises ValueError when no leaf, or more than one, does.
  """
  x = jax.random.uniform(jax.random.key(0), (1,) + tuple(input_shape))
  num_outputs = int(jax.eval_shape(apply_fn, params, x).shape[-1])
  found = []
  for path in _bias_candidates(params, num_outputs):
    def logits_of(b, path=path):
      tree = jax.tree_util.tree_map_with_path(
          lambda p, leaf: b if tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) == path else leaf, params)
      return apply_fn(tree, x)[0]
    jac = jax.jacobian(logits_of)(head_bias(params, path))
    if bool(jnp.allclose(jac, jnp.eye(num_outputs), atol=1e-5)):
      found.append(path)
  if len(found) != 1:
    raise ValueError(f"iDLG needs the output layer's bias (a 1-D 'bias' of size {num_outputs} added to the "
                     f"logits); found {['/'.join(p) for p in found] or 'none'} in this model")
  return found[0]


def idlg_label(head_bias_grad: jax.Array) -> jax.Array:
  """Returns the label of a one-example batch from the gradient of the head bias (iDLG).

  Softmax CE: ``dL/db = softmax(z) - onehot(y)``, negative only at the true class. One-logit
  sigmoid BCE: ``dL/db = sigmoid(z) - y``, negative iff y = 1. For an SGD update pass its negation
  (``-update`` has the gradient's sign at every step).
  """
  if head_bias_grad.shape[-1] == 1:
    return (head_bias_grad[..., 0] < 0).astype(jnp.int32)
  return jnp.argmin(head_bias_grad, axis=-1).astype(jnp.int32)


def simulate_upload(apply_fn: ApplyFn, spec: InversionSpec, params: Params, x: jax.Array, labels: jax.Array,
                    victim_optimizer: optax.GradientTransformation | None = None) -> Params:
  """Returns what a victim holding ``(x, labels)`` would upload: the gradient or the local update.

  The update unrolls ``spec.local_steps`` steps of ``victim_optimizer`` on batches taken in order
  (the whole batch each step when ``local_batch_size`` is 0), equal to ``client.local_train`` on
  full batches.
  """
  loss_grad = jax.grad(lambda p, xb, yb: batch_mean_loss(apply_fn, p, xb, yb))
  if spec.observation == "gradient":
    return loss_grad(params, x, labels)
  b = spec.local_batch_size or spec.batch_size

  def step(carry, s):
    p, opt_state = carry
    if b == spec.batch_size:
      xb, yb = x, labels
    else:
      idx = (s * b + jnp.arange(b)) % spec.batch_size
      xb, yb = jnp.take(x, idx, axis=0), jnp.take(labels, idx, axis=0)
    updates, opt_state = victim_optimizer.update(loss_grad(p, xb, yb), opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (p, _), _ = jax.lax.scan(step, (params, victim_optimizer.init(params)), jnp.arange(spec.local_steps))
  return jax.tree.map(jnp.subtract, p, params)


def attack_optimizer(spec: InversionSpec) -> optax.GradientTransformation:
  """Returns the optimiser of the dummy data: Adam, signed Adam (with Geiping's step decay) or L-BFGS."""
  lr = spec.learning_rate
  if spec.step_decay and spec.optimizer != "lbfgs":
    n = spec.num_steps
    lr = optax.piecewise_constant_schedule(lr, {int(n * 3 / 8): 0.1, int(n * 5 / 8): 0.1, int(n * 7 / 8): 0.1})
  if spec.optimizer == "adam":
    return optax.adam(lr)
  if spec.optimizer == "signed_adam":
    return optax.chain(optax.scale_by_sign(), optax.adam(lr))
  return optax.lbfgs(memory_size=10)  # zoom line search picks the step (DLG used torch's L-BFGS, lr 1)


def inversion_objective(apply_fn: ApplyFn, spec: InversionSpec, params: Params, observed: Params, z: dict,
                        fixed_labels: jax.Array | None, victim_optimizer=None) -> jax.Array:
  """Returns the attack's loss of dummy data ``z = {'x', 'label_logits'}``: distance (+ TV prior).

  Soft labels ``softmax(z['label_logits'])`` are used when ``fixed_labels`` is None.
  """
  y = jax.nn.softmax(z["label_logits"]) if fixed_labels is None else fixed_labels
  sim = simulate_upload(apply_fn, spec, params, z["x"], y, victim_optimizer)
  value = (l2_distance if spec.distance == "l2" else cosine_distance)(sim, observed)
  if spec.tv_weight > 0:
    value = value + spec.tv_weight * total_variation(z["x"])
  return value


def initial_dummy(spec: InversionSpec, rng: jax.Array, soft_labels: bool) -> dict:
  """Returns random dummy data: uniform in ``bounds`` (normal if unbounded), normal label logits."""
  kx, ky = jax.random.split(rng)
  shape = (spec.batch_size,) + spec.input_shape
  if spec.bounds is None:
    x0 = jax.random.normal(kx, shape)
  else:
    x0 = jax.random.uniform(kx, shape, minval=spec.bounds[0], maxval=spec.bounds[1])
  logits = jax.random.normal(ky, (spec.batch_size, spec.num_classes)) if soft_labels else jnp.zeros((0,))
  return {"x": x0, "label_logits": logits}


def fixed_labels(spec: InversionSpec, observed: Params, labels=None) -> jax.Array | None:
  """Returns the labels the attack holds fixed (iDLG's or the given ones), or None for soft labels."""
  if spec.labels == "idlg":
    sign = -1.0 if spec.observation == "update" else 1.0  # an SGD update has the gradient's opposite sign
    return idlg_label(sign * head_bias(observed, spec.label_layer))[None]
  if spec.labels == "given":
    if labels is None:
      raise ValueError("spec.labels='given' needs the labels argument")
    return jnp.asarray(labels, jnp.int32).reshape(spec.batch_size)
  return None


def project_dummy(spec: InversionSpec, z: dict) -> dict:
  """Returns ``z`` with inputs clipped to ``spec.bounds`` (unchanged if None); every optimiser,
  L-BFGS included (projected L-BFGS), applies it after each step."""
  return z if spec.bounds is None else dict(z, x=jnp.clip(z["x"], *spec.bounds))
