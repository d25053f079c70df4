"""Flax models and a name registry.

A ``Model`` bundles pure ``init(rng) -> params`` and ``apply(params, x) -> logits`` plus the
per-example loss; everything downstream (client training, attacks, evaluation) uses these three.
Binary tasks may use one output logit (sigmoid + BCE, as FLamby's logistic regression) or two.

Every module ends in a dense layer named ``head``; its input is the model's *embedding* (the
representation FedProto's prototypes live in; the flattened input for logistic regression). It is
sown into the ``intermediates`` collection, which costs nothing unless asked for:
``Model.embed_and_logits`` returns both from one forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_health.models.conv import conv_general_dilated as _conv

Params = Any

ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh, "gelu": nn.gelu}


def _activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
  return ACTIVATIONS[name]


class LogisticRegression(nn.Module):
  num_outputs: int
  init_scheme: str = "lecun_normal"  # "torch": U(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights and bias, as torch.nn.Linear (FLamby)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    self.sow("intermediates", "embedding", x)
    if self.init_scheme == "torch":
      bound = 1.0 / float(x.shape[-1]) ** 0.5
      uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
      return nn.Dense(self.num_outputs, name="head", kernel_init=uniform, bias_init=uniform)(x)
    return nn.Dense(self.num_outputs, name="head")(x)


class MLP(nn.Module):
  hidden: Sequence[int]
  num_outputs: int
  activation: str = "relu"

  @nn.compact
  def __call__(self, x):
    act = _activation(self.activation)
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x = act(nn.Dense(h, name=f"body_{i}")(x))
    self.sow("intermediates", "embedding", x)
    return nn.Dense(self.num_outputs, name="head")(x)


class CNN(nn.Module):
  """FedJAX/LEAF-style EMNIST CNN: two 3x3 convs, max-pool, dense, head (dropout omitted)."""

  num_outputs: int
  features: Sequence[int] = (32, 64)
  dense: int = 128
  activation: str = "relu"

  @nn.compact
  def __call__(self, x):
    act = _activation(self.activation)
    for i, f in enumerate(self.features):
      # Gradients as canonical convolutions: fast inside loops on XLA CPU (models/conv.py).
      x = act(nn.Conv(f, (3, 3), padding="VALID", name=f"body_conv{i}", conv_general_dilated=_conv)(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = act(nn.Dense(self.dense, name="body_dense")(x))
    self.sow("intermediates", "embedding", x)
    return nn.Dense(self.num_outputs, name="head")(x)


class LeNet(nn.Module):
  """Small fully-differentiable CNN used in gradient-inversion work (Zhu et al. 2019)."""

  num_outputs: int
  activation: str = "sigmoid"
  width: int = 12

  @nn.compact
  def __call__(self, x):
    act = _activation(self.activation)
    x = act(nn.Conv(self.width, (5, 5), strides=(2, 2), padding="SAME", name="body_conv0")(x))
    x = act(nn.Conv(self.width, (5, 5), strides=(2, 2), padding="SAME", name="body_conv1")(x))
    x = act(nn.Conv(self.width, (5, 5), strides=(1, 1), padding="SAME", name="body_conv2")(x))
    x = x.reshape(x.shape[0], -1)
    self.sow("intermediates", "embedding", x)
    return nn.Dense(self.num_outputs, name="head")(x)


def per_example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Returns ``[B]`` losses: sigmoid BCE for one logit, softmax cross-entropy otherwise.

  Labels may be integer class ids ``[B]`` or soft labels ``[B, K]`` (used by inversion attacks).
  """
  if logits.shape[-1] == 1:
    z = logits[..., 0]
    t = labels.astype(z.dtype) if labels.ndim == 1 else labels[..., -1]
    return optax.sigmoid_binary_cross_entropy(z, t)
  if labels.ndim == logits.ndim:
    return optax.softmax_cross_entropy(logits, labels)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def predict_labels(logits: jax.Array) -> jax.Array:
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def positive_score(logits: jax.Array) -> jax.Array:
  """Returns the score of class 1 for binary tasks (for AUC)."""
  if logits.shape[-1] == 1:
    return logits[..., 0]
  return logits[..., 1] - jax.nn.logsumexp(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class Model:
  """A flax module bound to an input shape: pure init/apply plus the per-example loss."""

  module: nn.Module
  input_shape: tuple[int, ...]
  name: str = ""

  def init(self, rng: jax.Array) -> Params:
    return self.module.init(rng, jnp.zeros((1,) + tuple(self.input_shape), jnp.float32))["params"]

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    return self.module.apply({"params": params}, x)

  def example_losses(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return per_example_loss(self.apply(params, x), y)

  def embed_and_logits(self, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (embedding ``[B, D]`` = the head's input, logits ``[B, out]``) from one forward pass."""
    logits, state = self.module.apply({"params": params}, x, mutable=["intermediates"])
    return state["intermediates"]["embedding"][0], logits

  @property
  def embedding_dim(self) -> int:
    """Returns D, the width of the embedding the head reads."""
    shapes = jax.eval_shape(lambda k: self.embed_and_logits(self.init(k), jnp.zeros((1,) + tuple(self.input_shape))),
                            jax.random.key(0))
    return int(shapes[0].shape[-1])


def _num_outputs(num_classes: int, binary_single_logit: bool) -> int:
  return 1 if (num_classes == 2 and binary_single_logit) else num_classes


def _logreg(num_classes, input_shape, binary_single_logit=True, init="lecun_normal", **kw):
  if init not in ("lecun_normal", "torch"):
    raise ValueError(f"model.init must be 'lecun_normal' or 'torch', got {init!r}")
  return LogisticRegression(_num_outputs(num_classes, binary_single_logit), init)


def _mlp(num_classes, input_shape, hidden=(200,), activation="relu", binary_single_logit=False, **kw):
  return MLP(tuple(hidden), _num_outputs(num_classes, binary_single_logit), activation)


def _cnn(num_classes, input_shape, features=(32, 64), dense=128, activation="relu", binary_single_logit=False, **kw):
  return CNN(_num_outputs(num_classes, binary_single_logit), tuple(features), dense, activation)


def _lenet(num_classes, input_shape, activation="sigmoid", width=12, binary_single_logit=False, **kw):
  return LeNet(_num_outputs(num_classes, binary_single_logit), activation, width)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "cnn": _cnn,
    "lenet": _lenet,
}


def get_model(name: str, num_classes: int, input_shape: Sequence[int], **kwargs) -> Model:
  """Returns the registered model ``name`` for the task (kwargs: hidden, activation, ...)."""
  if name not in MODELS:
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  module = MODELS[name](num_classes, tuple(input_shape), **kwargs)
  return Model(module, tuple(input_shape), name)
