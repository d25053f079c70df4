"""The ``inversion`` run mode: attack the client updates of a real FedAvg round.

``config.mode = "inversion"`` runs, from an ordinary simulation config plus a ``config.inversion``
section (``inversion_config()``):
1. load the federation named by ``config.dataset`` (images downsampled to ``inversion.resolution``),
   build ``config.model`` and optionally train it for ``inversion.pretrain_rounds`` FedAvg rounds;
2. pick ``num_victims`` victims, each holding ``batch_size`` real examples of one client of that
   federation, and run ONE FedAvg round of the engine over them (``local_steps`` full-batch steps
   of the configured client optimiser, optional local DP from ``privacy.dp.local_gaussian``); an
   update transform in the server's aggregation chain records the stacked updates it receives;
3. attack every recorded update at once (``invert_victims``), or, with secure aggregation
   (``secure_agg_group = k``), every mean of k updates, which is all such a server sees;
4. write ``summary.json``, ``reconstructions.npz`` and, for images, ``inversion_grid.png``.

The attacker is the honest-but-curious server: it knows the round's model, the client optimiser,
its learning rate and the number of local steps (Geiping et al. 2020, sec. 6).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_health import tensorboard
from fedjax_health.aggregators.base import UpdateTransform, chain, weighted_mean
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.algorithms.registry import build_fedavg_algorithm
from fedjax_health.attacks import inversion as inv
from fedjax_health.attacks import inversion_objective as ino
from fedjax_health.attacks import inversion_metrics as im
from fedjax_health.config_validation import register_check, require, validate_config
from fedjax_health.data import heart_disease
from fedjax_health.data import registry as data_registry
from fedjax_health.data.federated import BatchPlanSpec, FederatedData, FederatedDataset
from fedjax_health.simulation import build_model, register_mode
from fedjax_health import context

ATTACKS = ("dlg", "idlg", "inverting_gradients")


def inversion_config() -> ml_collections.ConfigDict:
  """Returns the ``config.inversion`` section with every field set."""
  c = ml_collections.ConfigDict()
  c.attack = "inverting_gradients"  # dlg | idlg | inverting_gradients (sets the defaults below)
  c.optimizer = ""  # "" = the attack's own (dlg/idlg: lbfgs, inverting_gradients: signed_adam)
  c.distance = ""  # "" = the attack's own (l2 | cosine)
  c.labels = ""  # "" = the attack's own (idlg for one example, else soft) | soft | idlg | given
  c.num_steps = inv.IG_NUM_STEPS  # attack iterations
  c.learning_rate = 0.1  # ignored by lbfgs (line search)
  c.num_restarts = 2
  c.tv_weight = inv.IG_TV_WEIGHT  # images only; the cosine distance of a good match is ~1e-6, keep the prior below it
  c.num_victims = 64  # uploads recorded in the attacked round
  c.batch_size = 1  # examples behind each victim's upload
  c.local_steps = 1  # full-batch local steps before the upload
  c.unroll = True  # the attacker replays the local steps; False: treats the update as one gradient
  c.resolution = 16  # images: side after downsampling 28x28 (0 = native)
  c.clip_norm = 0.0  # local DP (privacy.dp.local_gaussian): clip each update to this L2 norm ...
  c.noise_multiplier = 0.0  # ... and add N(0, (z C)^2); 0 = no noise
  c.secure_agg_group = 1  # the attacker sees only the mean of this many clients' updates
  c.pretrain_rounds = 0  # FedAvg rounds on the whole federation before the attacked round
  c.record_tolerance = 0.25  # tabular: recovered if every feature is within this many std units
  c.grid_examples = 8  # images shown in inversion_grid.png
  c.victim_width = 0  # victims per vmap (0 = all at once), see invert_victims
  return c


@register_check
def check_inversion(config, data=None) -> None:
  if config.get("mode", "train") != "inversion":
    return
  require("inversion" in config, "inversion", "a section (fedjax_health.attacks.inversion_run.inversion_config())", None)
  c = config.inversion
  require(c.attack in ATTACKS, "inversion.attack", f"one of {sorted(ATTACKS)}", c.attack)
  require(c.optimizer in ("",) + ino.OPTIMIZERS, "inversion.optimizer", f"'' or one of {ino.OPTIMIZERS}", c.optimizer)
  require(c.distance in ("",) + ino.DISTANCES, "inversion.distance", f"'' or one of {ino.DISTANCES}", c.distance)
  require(c.labels in ("",) + ino.LABEL_MODES, "inversion.labels", f"'' or one of {ino.LABEL_MODES}", c.labels)
  for name in ("num_steps", "num_restarts", "num_victims", "batch_size", "local_steps", "secure_agg_group"):
    require(int(c[name]) >= 1, f"inversion.{name}", ">= 1", c[name])
  require(c.learning_rate > 0, "inversion.learning_rate", "> 0", c.learning_rate)
  require(c.tv_weight >= 0, "inversion.tv_weight", ">= 0", c.tv_weight)
  require(c.resolution == 0 or 4 <= c.resolution <= 28, "inversion.resolution", "0 (native) or in [4, 28]", c.resolution)
  require(c.noise_multiplier >= 0, "inversion.noise_multiplier", ">= 0", c.noise_multiplier)
  require(c.noise_multiplier == 0 or c.clip_norm > 0, "inversion.clip_norm", "> 0 when noise_multiplier > 0", c.clip_norm)
  require(c.num_victims % c.secure_agg_group == 0, "inversion.secure_agg_group",
          f"a divisor of inversion.num_victims={c.num_victims}", c.secure_agg_group)
  require(c.record_tolerance > 0, "inversion.record_tolerance", "> 0", c.record_tolerance)
  require(c.victim_width >= 0, "inversion.victim_width", ">= 0", c.victim_width)
  require(c.attack != "idlg" or c.batch_size * c.secure_agg_group == 1, "inversion.batch_size",
          "1 (with secure_agg_group 1) for attack 'idlg', which reads one label", c.batch_size)
  if data is not None:
    sizes = data.train.client_sizes
    require(np.any(sizes >= c.batch_size), "inversion.batch_size",
            f"<= the largest client ({int(sizes.max())} examples)", c.batch_size)


class CaptureState(NamedTuple):
  updates: object  # [cohort, ...] as the server received them
  cohort: jax.Array  # [cohort] client indices


def capture_updates(cohort_size: int) -> UpdateTransform:
  """Returns the identity transform that keeps the last stack of updates it saw in its state.

  Placed in the server's ``chain`` it records exactly what the server receives (after any
  client-side transform before it, e.g. local DP noise).
  """

  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros((cohort_size,) + p.shape, p.dtype), params)
    return CaptureState(zeros, jnp.zeros((cohort_size,), jnp.int32))

  def apply(updates, weights, state, rng, ctx):
    del state, rng
    return updates, weights, CaptureState(updates, jnp.asarray(context.require(ctx, "cohort", "update capture"), jnp.int32)), {}

  return UpdateTransform(init, apply)


def downsample(x: np.ndarray, resolution: int) -> np.ndarray:
  """Returns images ``[N, H, W, C]`` resized to ``resolution`` (antialiased bilinear; 0 = unchanged)."""
  if not resolution or resolution == x.shape[1]:
    return x
  out = jax.image.resize(jnp.asarray(x), (x.shape[0], resolution, resolution, x.shape[-1]), "linear", antialias=True)
  return np.asarray(jnp.clip(out, 0.0, 1.0))


def _resize_dataset(ds: FederatedDataset, resolution: int) -> FederatedDataset:
  return FederatedDataset(dict(ds.arrays, x=downsample(ds.x, resolution)), ds.offsets, ds.client_ids)


def load_target_data(config) -> FederatedData:
  """Returns the federation of ``config.dataset``, images downsampled to ``config.inversion.resolution``."""
  data = data_registry.load_data(config.dataset, seed=config.seed)
  if len(data.input_shape) == 3 and config.inversion.resolution:
    r = config.inversion.resolution
    data = FederatedData(_resize_dataset(data.train, r), _resize_dataset(data.test, r), data.num_classes,
                         data.name, data.server_val, data.client_meta)
  return data


def victim_dataset(train: FederatedDataset, num_victims: int, batch_size: int, rng: np.random.Generator):
  """Returns ``(dataset, x [V, B, ...], y [V, B])``: victim v holds B random examples of one real client.

  Victims cycle over the clients holding at least B examples.
  """
  sizes = train.client_sizes
  eligible = np.flatnonzero(sizes >= batch_size)
  if not len(eligible):
    raise ValueError(f"no client holds batch_size={batch_size} examples (largest: {int(sizes.max())})")
  rows = np.stack([train.offsets[c] + rng.choice(sizes[c], batch_size, replace=False)
                   for c in eligible[np.arange(num_victims) % len(eligible)]])
  x, y = train.x[rows], train.y[rows]
  ds = FederatedDataset({"x": x.reshape((-1,) + x.shape[2:]), "y": y.reshape(-1)},
                        np.arange(num_victims + 1) * batch_size, tuple(f"victim_{v}" for v in range(num_victims)))
  return ds, x, y


def pretrained_params(config, data: FederatedData, model):
  """Returns the round's global model: initialised from ``config.seed``, then FedAvg-trained if asked."""
  params = model.init(jax.random.key(config.seed))
  if config.inversion.pretrain_rounds:
    alg = build_fedavg_algorithm(config, data.train, model)
    state, train, rng = alg.init(params), fedavg_lib.device_train_data(data.train), jax.random.key(config.seed + 1)
    round_fn = jax.jit(alg.round_fn)
    for _ in range(config.inversion.pretrain_rounds):
      state, _ = round_fn(state, train, rng)
    params = state.params
  return params


def record_round(config, victims: FederatedDataset, model, params):
  """Runs one FedAvg round of the engine over the victims; returns their uploads ``[V, ...]`` in victim order."""
  c = config.inversion
  v = victims.num_clients
  transforms = []
  if c.noise_multiplier > 0:
    from fedjax_health.privacy import dp
    transforms.append(dp.local_gaussian(c.clip_norm, c.noise_multiplier))
  aggregator = chain(*transforms, capture_updates(v), weighted_mean())
  plan = BatchPlanSpec.create(victims.client_sizes, c.batch_size, num_epochs=None, num_steps=c.local_steps)
  alg = build_fedavg_algorithm(config, victims, model, cohort_size=v, plan=plan, aggregator=aggregator)
  state, _ = jax.jit(alg.round_fn)(alg.init(params), fedavg_lib.device_train_data(victims),
                                   jax.random.key(config.seed + 2))
  captured = state.agg_state[len(transforms)]
  order = np.argsort(np.asarray(captured.cohort))
  return jax.tree.map(lambda u: u[order], captured.updates)


def attack_spec(config, data: FederatedData) -> tuple[inv.InversionSpec, object]:
  """Returns the attack's spec and the victim optimiser it replays."""
  c, cl = config.inversion, config.client
  batch = c.batch_size * c.secure_agg_group
  images = len(data.input_shape) == 3
  overrides = dict(num_steps=c.num_steps, learning_rate=c.learning_rate, num_restarts=c.num_restarts,
                   tv_weight=c.tv_weight if images else 0.0, bounds=(0.0, 1.0) if images else None)
  for key in ("optimizer", "distance", "labels"):
    if c[key]:
      overrides[key] = c[key]
  if c.unroll:
    overrides.update(observation="update", local_steps=c.local_steps)
  if c.attack == "idlg":
    spec = inv.idlg_spec(data.input_shape, data.num_classes, **overrides)
  elif c.attack == "dlg":
    spec = inv.dlg_spec(batch, data.input_shape, data.num_classes, **overrides)
  else:
    spec = inv.inverting_gradients_spec(batch, data.input_shape, data.num_classes, **overrides)
  return spec, fedavg_lib.client_optimizer(cl.optimizer, cl.learning_rate, cl.momentum)


def _heart_disease_scale(config):
  """Returns per-feature (mean, std) of the pooled z-scoring, to report record errors in raw units."""
  if config.dataset.name != "heart_disease" or config.dataset.get("normalize", "pooled") != "pooled":
    return None
  raw = heart_disease.load(config.dataset.get("data_dir") or None, normalize="none").train.x
  return raw.mean(0), raw.std(0)


def attack_round(config, log: Callable[[str], None] = print, data: FederatedData | None = None) -> dict:
  """Runs steps 1-3 of the module docstring; returns metrics and arrays (``x_true``, ``x_rec``, ...)."""
  c = config.inversion
  data = data if data is not None else load_target_data(config)
  model = build_model(config, data)
  params = pretrained_params(config, data, model)
  victims, x, y = victim_dataset(data.train, c.num_victims, c.batch_size, np.random.default_rng(config.seed))
  uploads = record_round(config, victims, model, params)
  k = c.secure_agg_group
  observed = jax.tree.map(lambda s: s / k, inv.secure_sum(uploads, k)) if k > 1 else uploads
  if not c.unroll:  # pseudo-gradient: the update of one SGD step of this size
    observed = jax.tree.map(lambda u: -u / (config.client.learning_rate * c.local_steps), observed)
  x = x.reshape((c.num_victims // k, k * c.batch_size) + x.shape[2:])
  y = y.reshape(c.num_victims // k, k * c.batch_size)
  spec, victim_opt = attack_spec(config, data)
  t0 = time.time()
  rec = inv.invert_victims(model, params, observed, jax.random.key(config.seed + 3), spec,
                           labels=jnp.asarray(y) if spec.labels == "given" else None,
                           victim_optimizer=victim_opt if c.unroll else None, width=c.victim_width)
  rec = jax.device_get(rec)
  seconds = time.time() - t0
  out = {"num_attacks": int(x.shape[0]), "examples_per_attack": int(x.shape[1]), "attack_seconds": round(seconds, 2),
         "x_true": x, "y_true": y, "x_rec": np.asarray(rec.x), "y_rec": np.asarray(rec.labels)}
  if len(data.input_shape) == 3:
    m = im.image_metrics(rec.x, x, rec.labels, y)
    out.update(psnr_mean=float(m["psnr"].mean()), psnr_median=float(np.median(m["psnr"])),
               ssim_mean=float(m["ssim"].mean()), label_accuracy=float(m["label_correct"].mean()),
               psnr=m["psnr"], perm=m["perm"])
  else:
    m = im.record_metrics(rec.x, x, c.record_tolerance, rec.labels, y)
    out.update(feature_mae=float(m["abs_error"].mean()), recovered_fraction=float(m["recovered"].mean()),
               label_accuracy=float(m["label_correct"].mean()), perm=m["perm"],
               per_feature_mae=m["abs_error"].reshape(-1, x.shape[-1]).mean(0))
    scale = _heart_disease_scale(config)
    if scale is not None:
      out["per_feature_mae_raw"] = out["per_feature_mae"] * scale[1]
  if c.noise_multiplier > 0:
    import dp_accounting
    from fedjax_health.privacy import accounting
    # One local-DP release: sensitivity 2C (replace-one), i.e. a Gaussian mechanism of multiplier z / 2.
    out["epsilon_one_upload"] = accounting.compute_epsilon(dp_accounting.GaussianDpEvent(c.noise_multiplier / 2), 1e-5)
  log(f"inversion: {out['num_attacks']} attacks x {out['examples_per_attack']} examples in {seconds:.1f}s: "
      + ", ".join(f"{k}={v:.4g}" for k, v in out.items() if isinstance(v, float)))
  return out


@register_mode("inversion")
def run_inversion(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Validates ``config``, attacks a recorded round, writes outputs to ``workdir``; returns the summary."""
  validate_config(config)
  data = load_target_data(config)
  validate_config(config, data)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  out = attack_round(config, log, data)
  arrays = {k: v for k, v in out.items() if isinstance(v, np.ndarray)}
  np.savez_compressed(os.path.join(workdir, "reconstructions.npz"), **arrays)
  summary = {k: v for k, v in out.items() if not isinstance(v, np.ndarray)}
  for key in ("per_feature_mae", "per_feature_mae_raw"):
    if key in out:
      summary[key] = dict(zip(heart_disease.FEATURE_NAMES if out[key].shape[0] == heart_disease.NUM_FEATURES
                              else map(str, range(out[key].shape[0])), map(float, out[key])))
  summary.update(dataset=data.name, model=config.model.name, attack=config.inversion.attack)
  if "psnr" in out:
    n = min(config.inversion.grid_examples, out["num_attacks"])
    rec = im.reorder(out["x_rec"], out["perm"])
    im.save_grid(os.path.join(workdir, "inversion_grid.png"), out["x_true"][:n, 0], rec[:n, 0], out["psnr"][:n, 0],
                 f"{config.inversion.attack} on {data.name} ({config.model.name})")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  tensorboard.write_inversion(workdir, summary, os.path.join(workdir, "inversion_grid.png") if "psnr" in out else None)
  return summary
