"""Defences outside the aggregator: client-side data sanitisation and pruning of dormant units.

* ``sanitizing_grad_fn``: each client drops the training examples whose label the round's global
  model finds implausible (probability of the given label below ``min_label_prob``, i.e. loss
  above ``-log(min_label_prob)``) before computing its gradient: loss-based outlier removal in
  the spirit of data sanitisation defences (Steinhardt et al. 2017, "Certified defenses for data
  poisoning attacks"; Tolpegin et al. 2020). Threat model: poisoned *data* at a site that runs
  the honest client software (a model-poisoning client would simply not run it).
* ``prune_dormant_units``: the pruning defence (Liu et al. 2018, "Fine-pruning"; Wu et al. 2020,
  "Mitigating backdoor attacks in federated learning"): the units of the last hidden layer that
  are least active on clean held-out data are the ones a backdoor can hide in; the server
  removes a fraction of them (zeroes their incoming weights, bias and outgoing head weights).
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_health.client import make_grad_fn
from fedjax_health.models import ACTIVATIONS, Model


def sanitizing_grad_fn(example_losses: Callable, min_label_prob: float = 0.05,
                       regularizer: Callable | None = None) -> Callable:
  """Returns a ``grad_fn`` that ignores examples with ``loss(global model) > -log(min_label_prob)``.

  The filter is computed with the round's starting (global) model ``anchor``, so a client with a
  poisoned share of data drops it from every local step; the returned loss is the mean over the
  kept examples (plus the optional regulariser).
  """
  if not 0.0 < min_label_prob < 1.0:
    raise ValueError(f"sanitisation min_label_prob must be in (0, 1), got {min_label_prob}")
  max_loss = float(-np.log(min_label_prob))

  base = make_grad_fn(example_losses, regularizer)

  def grad_fn(params, anchor, x, y, mask, rng):
    suspicious = jax.lax.stop_gradient(example_losses(anchor, x, y)) > max_loss
    return base(params, anchor, x, y, mask & ~suspicious, rng)

  return grad_fn


def last_hidden_layer(params) -> str:
  """Returns the name of the dense layer that feeds the head (its output width = head's input)."""
  if "head" not in params:
    raise ValueError("pruning needs a model whose output layer is named 'head'")
  width = params["head"]["kernel"].shape[0]
  names = [k for k in params if k.startswith("body") and "kernel" in params[k]
           and params[k]["kernel"].ndim == 2 and params[k]["kernel"].shape[1] == width]
  if not names:
    raise ValueError("pruning needs a hidden dense layer before the head (use an mlp or cnn model, not logreg)")
  return max(names, key=natural_key)


def natural_key(name: str) -> tuple:
  """Returns a sort key that orders the numbers inside a name by value (``body_9 < body_10``)."""
  return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def mean_activations(model: Model, params, x: jax.Array) -> tuple[str, jax.Array]:
  """Returns (layer name, mean post-activation of each unit of the last hidden layer over ``x``)."""
  layer = last_hidden_layer(params)
  _, inter = model.module.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])
  pre = inter["intermediates"][layer]["__call__"][0]
  act = ACTIVATIONS[getattr(model.module, "activation", "relu")]
  return layer, jnp.mean(act(pre), axis=0)


def prune_dormant_units(model: Model, params, holdout_x: jax.Array, fraction: float):
  """Returns (pruned params, bool mask of pruned units): the ``fraction`` of the last hidden
  layer's units with the lowest mean activation on ``holdout_x`` are removed."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"pruning fraction must be in [0, 1), got {fraction}")
  layer, mean_act = mean_activations(model, params, holdout_x)
  width = mean_act.shape[0]
  k = int(fraction * width)
  rank = jnp.zeros(width, jnp.int32).at[jnp.argsort(mean_act)].set(jnp.arange(width, dtype=jnp.int32))
  pruned = rank < k
  out = dict(params)
  out[layer] = dict(params[layer], kernel=jnp.where(pruned[None, :], 0.0, params[layer]["kernel"]),
                    bias=jnp.where(pruned, 0.0, params[layer]["bias"]))
  out["head"] = dict(params["head"], kernel=jnp.where(pruned[:, None], 0.0, params["head"]["kernel"]))
  return out, pruned
