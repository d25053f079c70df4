"""Gradient inversion: DLG, iDLG and Inverting Gradients, batched over victims and restarts.

An honest-but-curious server (or anyone who intercepts an upload) holds the parameters a victim
started from and the gradient or FedAvg update the victim sent. The attack optimises dummy inputs
(and labels) until the gradient they would produce matches the observed one:

* DLG, Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019: squared L2 gradient distance,
  dummy inputs and soft labels optimised jointly with L-BFGS.
* iDLG, Zhao, Mopuri & Bilen, "iDLG: Improved Deep Leakage from Gradients", 2020: for one example
  the label is read exactly from the last layer's gradient (the only negative entry of the softmax
  head's bias gradient, or the sign of the one-logit sigmoid head's), then only inputs are matched.
* Inverting Gradients, Geiping, Bauermeister, Droge & Moeller, NeurIPS 2020: cosine gradient
  distance + total-variation prior, Adam on signed gradients with step decay, inputs kept in the
  data range, several restarts keeping the best; and the attack on multi-step FedAvg updates,
  which unrolls the victim's local optimiser steps inside the objective.

Everything here is a pure function of ``(params, observed, rng)``: ``make_inversion`` returns one
victim's attack (jit-able), ``invert_victims`` vmaps it over many victims' uploads at once, and
restarts are vmapped inside. ``dlg``, ``idlg`` and ``inverting_gradients`` are one-shot wrappers
that validate their inputs on the host first (shape mismatch, non-finite gradient, unsupported
batch size raise ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_health.attacks.inversion_objective import (ApplyFn, InversionSpec, Params, Reconstruction, apply_fn_of,
                                                       attack_optimizer, find_output_bias, fixed_labels, head_bias,
                                                       initial_dummy, inversion_objective, project_dummy)
from fedjax_health.client import map_clients
from fedjax_health.models import Model

# Inverting Gradients' defaults for images, shared by ``inverting_gradients_spec`` and the
# launcher's ``config.inversion`` (one place, so a script and a config run the same attack).
# Measured at native 28x28 RGB (RetinaMNIST, sigmoid LeNet, docs/inversion_native.md): 500
# iterations with TV 1e-6 gave the best PSNR/SSIM of the settings tried (200 iterations, the
# 16x16 setting, stays above the mean-image guess but ~9 dB lower).
IG_NUM_STEPS = 500
IG_TV_WEIGHT = 1e-6

# ----------------------------------------------------------------------------------------------
# The attack.


def make_inversion(model_or_apply: Model | ApplyFn, spec: InversionSpec,
                   victim_optimizer: optax.GradientTransformation | None = None) -> Callable[..., Reconstruction]:
  """Returns ``attack(params, observed, rng, labels=None) -> Reconstruction`` for one victim.

  Pure and jit-able; ``labels`` (int ``[B]``) is used when ``spec.labels == 'given'``. For
  ``spec.observation == 'update'`` the victim's local optimiser (e.g. ``optax.sgd(lr)``, as the
  simulation's ``client_optimizer``) must be given: the attack replays it.
  """
  if spec.observation == "update" and victim_optimizer is None:
    raise ValueError("victim_optimizer is required when spec.observation='update' (the attack unrolls the "
                     "victim's local steps, Geiping et al. 2020 sec. 6)")
  apply_fn = apply_fn_of(model_or_apply)
  opt = attack_optimizer(spec)
  k = spec.num_classes

  def attack(params, observed, rng, labels=None):
    fixed = fixed_labels(spec, observed, labels)

    def objective(z):
      return inversion_objective(apply_fn, spec, params, observed, z, fixed, victim_optimizer)

    project = functools.partial(project_dummy, spec)

    def one_restart(key):
      z = initial_dummy(spec, key, fixed is None)
      state = opt.init(z)
      if spec.optimizer == "lbfgs":
        value_and_grad = optax.value_and_grad_from_state(objective)

        def step(carry, _):
          z, s = carry
          value, g = value_and_grad(z, state=s)
          u, s = opt.update(g, s, z, value=value, grad=g, value_fn=objective)
          return (project(optax.apply_updates(z, u)), s), None  # projected L-BFGS: stay in bounds
      else:
        value_and_grad = jax.value_and_grad(objective)

        def step(carry, _):
          z, s = carry
          _, g = value_and_grad(z)
          u, s = opt.update(g, s, z)
          return (project(optax.apply_updates(z, u)), s), None

      (z, _), _ = jax.lax.scan(step, (z, state), None, length=spec.num_steps)
      z = project(z)
      value = objective(z)
      return z, jnp.where(jnp.isfinite(value), value, jnp.inf)

    zs, values = jax.vmap(one_restart)(jax.random.split(rng, spec.num_restarts))
    best = jnp.argmin(values)
    z = jax.tree.map(lambda a: a[best], zs)
    if fixed is None:
      probs = jax.nn.softmax(z["label_logits"])
      out_labels = jnp.argmax(probs, -1).astype(jnp.int32)
    else:
      probs, out_labels = jax.nn.one_hot(fixed, k), fixed
    return Reconstruction(z["x"], out_labels, probs, values[best], values)

  return attack


# ----------------------------------------------------------------------------------------------
# Host-side validation and the public entry points.


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def check_observation(params: Params, observed: Params, num_victims: int | None = None, name: str = "observed") -> None:
  """Raises ValueError if ``observed`` does not match ``params`` (tree, shapes, ``[V]`` axis) or is non-finite."""
  if jax.tree.structure(params) != jax.tree.structure(observed):
    p_paths = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    o_paths = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(observed)[0]}
    raise ValueError(f"{name} gradient/update does not match the model's parameters: missing "
                     f"{sorted(p_paths - o_paths)}, unexpected {sorted(o_paths - p_paths)}")
  lead = () if num_victims is None else (num_victims,)
  for (path, p), o in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(observed)):
    want = lead + tuple(np.shape(p))
    if tuple(np.shape(o)) != want:
      stacked = f" (uploads stacked [V, ...] with V={num_victims})" if lead else ""
      raise ValueError(f"{name} leaf {_path_str(path)} has shape {tuple(np.shape(o))}, the model needs {want}{stacked}")
    bad = int(np.size(o) - np.count_nonzero(np.isfinite(np.asarray(o))))
    if bad:
      raise ValueError(f"{name} leaf {_path_str(path)} has {bad} non-finite entries (NaN/inf); gradient "
                       "inversion needs a finite gradient (was the upload rejected or overflowed?)")


def check_model(apply_fn: ApplyFn, params: Params, spec: InversionSpec) -> InversionSpec:
  """Raises ValueError if ``spec.input_shape``/``num_classes`` do not fit the model; returns
  ``spec`` with ``label_layer`` set to the model's output bias when iDLG needs it."""
  try:
    out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((spec.batch_size,) + spec.input_shape, jnp.float32))
  except Exception as e:  # flax raises several error types for a mis-shaped input
    raise ValueError(f"InversionSpec.input_shape={spec.input_shape} does not fit the model: {e}") from None
  outputs = out.shape[-1]
  if outputs not in (spec.num_classes, 1) or (outputs == 1 and spec.num_classes != 2):
    raise ValueError(f"InversionSpec.num_classes={spec.num_classes} does not fit a model with {outputs} outputs")
  if spec.labels == "idlg":
    if spec.label_layer is None:
      spec = dataclasses.replace(spec, label_layer=find_output_bias(apply_fn, params, spec.input_shape))
    head_bias(params, spec.label_layer)
  return spec


def check_single_example(observed: Params, spec: InversionSpec, lead: tuple = (), check_rank: bool = True) -> None:
  """Raises ValueError when iDLG is given a gradient that comes from more than one example.

  For one example the output layer's kernel gradient is the outer product ``h g^T`` (rank 1) and
  a softmax head's bias gradient ``softmax - onehot`` has exactly one negative entry; the mean
  gradient of a batch has neither property in general (Zhao et al. 2020 assume B = 1). The sign
  test also holds for a one-example multi-step SGD update; the rank test (``check_rank``) only for
  a true gradient, so the launcher's pseudo-gradients skip it.
  """
  if spec.labels != "idlg" or spec.observation != "gradient":
    return
  path = spec.label_layer or ("head", "bias")
  bias = np.asarray(head_bias(observed, path)).reshape((-1,) + np.shape(head_bias(observed, path))[len(lead):])
  parent = observed
  for key in path[:-1]:
    parent = parent[key]
  kernel = parent.get("kernel") if isinstance(parent, dict) else None
  for v in range(bias.shape[0]):
    who = f"upload {v}: " if lead else ""
    if bias.shape[1] > 1 and int(np.sum(bias[v] < 0)) > 1:
      raise ValueError(f"{who}iDLG needs the gradient of ONE example (spec.batch_size=1), but the output bias "
                       f"gradient has {int(np.sum(bias[v] < 0))} negative entries (one example has exactly one): "
                       "it comes from a batch; use labels='soft' or 'given' with the batch size")
    if check_rank and kernel is not None and np.ndim(kernel) - len(lead) == 2:
      k = np.asarray(kernel, np.float64).reshape((-1,) + np.shape(kernel)[len(lead):])[v]
      sv = np.linalg.svd(k, compute_uv=False)
      if sv.size > 1 and sv[0] > 0 and sv[1] > 1e-3 * sv[0]:
        raise ValueError(f"{who}iDLG needs the gradient of ONE example (spec.batch_size=1), but the output "
                         f"layer's kernel gradient has rank > 1 (singular values {sv[0]:.3g}, {sv[1]:.3g}): it "
                         "comes from a batch; use labels='soft' or 'given' with the batch size")


def _check_labels(labels, spec: InversionSpec, lead: tuple) -> None:
  if spec.labels != "given":
    if labels is not None:
      raise ValueError(f"labels were passed but spec.labels={spec.labels!r} would ignore them; use an "
                       "InversionSpec with labels='given' (inverting_gradients(..., labels=y) does this)")
    return
  want = lead + (spec.batch_size,)
  if labels is None or tuple(np.shape(labels)) != want:
    raise ValueError(f"labels must have shape {want} when spec.labels='given', got "
                     f"{None if labels is None else tuple(np.shape(labels))}")
  labels = np.asarray(labels)
  if labels.min() < 0 or labels.max() >= spec.num_classes:
    raise ValueError(f"labels must be in [0, {spec.num_classes}), got range [{labels.min()}, {labels.max()}]")


def invert(model_or_apply, params: Params, observed: Params, rng: jax.Array, spec: InversionSpec,
           labels=None, victim_optimizer=None) -> Reconstruction:
  """Validates the inputs, then runs the attack on one victim's upload (compiled per call)."""
  apply_fn = apply_fn_of(model_or_apply)
  spec = check_model(apply_fn, params, spec)
  check_observation(params, observed)
  check_single_example(observed, spec)
  _check_labels(labels, spec, ())
  return jax.jit(make_inversion(apply_fn, spec, victim_optimizer))(params, observed, rng, labels)


def batched_inversion(model_or_apply, spec: InversionSpec, victim_optimizer=None, width: int = 0,
                      per_victim_params: bool = False) -> Callable[..., Reconstruction]:
  """Returns the compiled ``attack(params, observed [V, ...], rng, labels=None)`` over V victims.

  Build it once and call it for every round: it does no input checks (``invert_victims`` does).
  ``width`` victims run side by side in one vmap (0 = all; 1 = one after the other inside one
  compiled program; between = ``lax.map`` over chunks), as the cohort map's ``clients_per_step``.
  Victim v uses key ``jax.random.split(rng, V)[v]``, so the result equals attacking each alone.
  """
  if width < 0:
    raise ValueError(f"width must be >= 0 (0 = all victims in one vmap), got {width}")
  attack = make_inversion(model_or_apply, spec, victim_optimizer)

  @jax.jit
  def run(params, observed, rng, labels=None):
    v = jax.tree.leaves(observed)[0].shape[0]

    def one(xs):
      p = xs["params"] if per_victim_params else params
      return attack(p, xs["observed"], xs["key"], xs.get("labels"))

    xs = {"observed": observed, "key": jax.random.split(rng, v)}
    if labels is not None:
      xs["labels"] = labels
    if per_victim_params:
      xs["params"] = params
    return map_clients(one, xs, width or v)

  return run


def invert_victims(model_or_apply, params: Params, observed: Params, rng: jax.Array, spec: InversionSpec,
                   labels=None, victim_optimizer=None, per_victim_params: bool = False, width: int = 0) -> Reconstruction:
  """Validates the inputs, then attacks ``V`` victims at once; returns a ``[V]``-batched result.

  ``observed`` leaves are ``[V, ...]``; ``params`` is the shared round model, or ``[V, ...]``
  stacked when ``per_victim_params``. Compiles per call: reuse ``batched_inversion`` in loops.
  """
  apply_fn = apply_fn_of(model_or_apply)
  leaves = jax.tree.leaves(observed)
  if not leaves or np.ndim(leaves[0]) < 1:
    raise ValueError("observed must be a pytree of [V, ...] stacked uploads")
  v = int(np.shape(leaves[0])[0])
  one_params = jax.tree.map(lambda a: a[0], params) if per_victim_params else params
  spec = check_model(apply_fn, one_params, spec)
  if per_victim_params:
    check_observation(one_params, params, v, name="per-victim params")
  check_observation(one_params, observed, v)
  check_single_example(observed, spec, (v,), check_rank=False)
  _check_labels(labels, spec, (v,))
  run = batched_inversion(apply_fn, spec, victim_optimizer, width, per_victim_params)
  return run(params, observed, rng, None if labels is None else jnp.asarray(labels, jnp.int32))


def dlg_spec(batch_size: int, input_shape, num_classes: int, **overrides) -> InversionSpec:
  """Returns DLG's settings (Zhu et al. 2019): L2 distance, soft labels, L-BFGS, no prior, unbounded."""
  kw = dict(distance="l2", labels="soft", optimizer="lbfgs", num_steps=100, learning_rate=1.0, bounds=None)
  return InversionSpec(batch_size, tuple(input_shape), num_classes, **{**kw, **overrides})


def idlg_spec(input_shape, num_classes: int, batch_size: int = 1, **overrides) -> InversionSpec:
  """Returns iDLG's settings (Zhao et al. 2020): DLG with the label read from the head bias, B = 1.

  ``batch_size`` other than 1 is a ValueError (iDLG's label rule holds for one example only).
  """
  return dlg_spec(batch_size, input_shape, num_classes, **{"labels": "idlg", **overrides})


def inverting_gradients_spec(batch_size: int, input_shape, num_classes: int, **overrides) -> InversionSpec:
  """Returns Inverting Gradients' settings (Geiping et al. 2020): cosine + TV, signed Adam, restarts.

  Labels come from iDLG for one example and are optimised jointly otherwise.
  """
  kw = dict(distance="cosine", labels="idlg" if batch_size == 1 else "soft", optimizer="signed_adam",
            num_steps=IG_NUM_STEPS, learning_rate=0.1, tv_weight=IG_TV_WEIGHT if len(tuple(input_shape)) == 3 else 0.0,
            num_restarts=2, bounds=(0.0, 1.0), step_decay=True)
  return InversionSpec(batch_size, tuple(input_shape), num_classes, **{**kw, **overrides})


def dlg(model_or_apply, params, observed_grad, rng, *, batch_size: int, input_shape, num_classes: int,
        **overrides) -> Reconstruction:
  """Returns the DLG reconstruction of the batch behind ``observed_grad`` (Zhu et al. 2019)."""
  return invert(model_or_apply, params, observed_grad, rng, dlg_spec(batch_size, input_shape, num_classes, **overrides))


def idlg(model_or_apply, params, observed_grad, rng, *, input_shape, num_classes: int, **overrides) -> Reconstruction:
  """Returns the iDLG reconstruction of the single example behind ``observed_grad`` (Zhao et al. 2020)."""
  return invert(model_or_apply, params, observed_grad, rng, idlg_spec(input_shape, num_classes, **overrides))


def inverting_gradients(model_or_apply, params, observed, rng, *, batch_size: int, input_shape, num_classes: int,
                        victim_optimizer=None, labels=None, **overrides) -> Reconstruction:
  """Returns the Inverting Gradients reconstruction (Geiping et al. 2020) of a gradient or FedAvg update.

  Pass ``observation='update', local_steps=S, victim_optimizer=optax.sgd(lr)`` to attack an update.
  ``labels`` (int ``[B]``), when given, are used as known labels (``labels='given'``).
  """
  if labels is not None:
    overrides.setdefault("labels", "given")
  spec = inverting_gradients_spec(batch_size, input_shape, num_classes, **overrides)
  return invert(model_or_apply, params, observed, rng, spec, labels, victim_optimizer)


# ----------------------------------------------------------------------------------------------
# What secure aggregation leaves visible.


def secure_sum(uploads: Params, group_size: int) -> Params:
  """Returns the sums of consecutive groups of ``group_size`` stacked uploads: what secure aggregation reveals.

  ``[V, ...] -> [V // group_size, ...]``; V must be a multiple of ``group_size``.
  """
  v = jax.tree.leaves(uploads)[0].shape[0]
  if group_size < 1 or v % group_size:
    raise ValueError(f"group_size must be >= 1 and divide the number of uploads ({v}), got {group_size}")
  return jax.tree.map(lambda a: a.reshape((v // group_size, group_size) + a.shape[1:]).sum(1), uploads)
