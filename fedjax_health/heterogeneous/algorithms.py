"""Registered model-heterogeneous algorithms: config section, checks, datasets with public data.

``config.algorithm`` names one of
  * ``fedmd``, ``fd``, ``feddf``, ``fedproto``: the methods of ``rounds.py``,
  * ``hetero_local``: every client trains its own model alone (the no-collaboration reference),
  * ``hetero_fedavg``: FedAvg within each architecture group (the engine's ``fedavg`` per group),
and ``fedavg`` on the same dataset with one ``config.model`` is the homogeneous reference.
``config.hetero.model_groups`` lists the architectures (each a ``config.model``-like dict) and
``config.hetero.assignment`` which client runs which (``groups.assign_groups``). Every client is
judged with its own model on its own test split; bytes up/down per client per round are logged.

Datasets with a server-held public set (``public_data.py``): ``heart_disease_public``
(``dataset.public_site`` held out whole), ``breastmnist_public`` / ``retinamnist_public``
(``dataset.public_source``: ``val`` = MedMNIST's labelled val split, ``other`` = the other MedMNIST
set converted, unlabelled).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedjax_health import client as client_lib
from fedjax_health import config_validation
from fedjax_health import models as models_lib
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.algorithms import registry as fedavg_registry
from fedjax_health.algorithms.personal_eval import example_outputs
from fedjax_health.data import registry as data_registry
from fedjax_health.data.federated import FederatedData
from fedjax_health.heterogeneous import groups as groups_lib
from fedjax_health.heterogeneous import public_data
from fedjax_health.heterogeneous import rounds
from fedjax_health.heterogeneous import transforms as T
from fedjax_health.simulation import Experiment, build_plan, register_algorithm

ALGORITHM_NAMES = ("hetero_local", "hetero_fedavg", "fd", "fedproto", "fedmd", "feddf")
NEEDS_PUBLIC = ("fedmd", "feddf")


def add_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds ``config.hetero`` and the public-data dataset fields with their defaults; returns ``config``."""
  config.hetero = ml_collections.ConfigDict(dict(
      # Architectures, each a config.model-like dict; list them from the smallest to the largest
      # for assignment='by_size' (the smallest clients run the first).
      model_groups=({"name": "logreg"}, {"name": "mlp", "hidden": (16,)}),
      assignment="round_robin",  # round_robin | by_size | explicit
      explicit_groups=(),  # assignment='explicit': the group index of every client
      fd_weight=1.0,  # FD: beta, weight of the distillation term
      fd_temperature=1.0,
      proto_weight=1.0,  # FedProto: lambda, weight of the prototype distance
      proto_weighted=True,  # FedProto: average prototypes weighted by class counts (paper eq. 6) or plainly
      fedmd_pretrain_epochs=5,  # FedMD transfer learning: epochs on the labelled public set
      fedmd_public_per_round=0,  # public examples scored per round; 0 = all
      fedmd_digest_epochs=1,
      fedmd_digest_lr=1e-3,  # Adam, as the authors' code
      feddf_steps=100,  # server distillation steps per group per round (0 = FedAvg within groups)
      feddf_lr=1e-3,  # Adam, as Lin et al.
      feddf_temperature=1.0,
      feddf_batch_size=32,
      feddf_val_fraction=0.2,  # part of the public set for early stopping
      feddf_eval_every=10,
      feddf_patience=3,
  ))
  config.dataset.public_site = "cleveland"  # heart_disease_public: hospital held out as the public set
  config.dataset.private_sites = ()  # heart_disease_public: the clients ((): every other hospital)
  config.dataset.public_source = "val"  # {breast,retina}mnist_public: val | other
  return config


def _heart_public(cfg, seed: int) -> FederatedData:
  del seed
  return public_data.heart_disease_with_public(cfg.get("public_site", "cleveland"), tuple(cfg.get("private_sites", ())),
                                               cfg.get("normalize", "pooled"), cfg.get("data_dir") or None)


def _medmnist_public(subset: str):
  def load(cfg, seed: int) -> FederatedData:
    return public_data.medmnist_with_public(
        subset, cfg.get("public_source", "val"), num_clients=cfg.num_clients, partition=cfg.get("partition", "dirichlet"),
        alpha=cfg.get("alpha", 0.5), seed=seed + cfg.get("partition_seed", 0), path=cfg.get("path") or None,
        shards_per_client=cfg.get("shards_per_client", 2))
  return load


data_registry.DATASETS["heart_disease_public"] = _heart_public
data_registry.DATASETS["breastmnist_public"] = _medmnist_public("breastmnist")
data_registry.DATASETS["retinamnist_public"] = _medmnist_public("retinamnist")


def _group_specs(config) -> list[dict]:
  return [dict(spec) for spec in config.hetero.model_groups]


def group_models(config, num_classes: int, input_shape) -> list[tuple[str, models_lib.Model]]:
  """Returns [(group name, Model)] of ``config.hetero.model_groups``; errors name the entry."""
  out = []
  for i, spec in enumerate(_group_specs(config)):
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
      model = models_lib.get_model(spec["name"], num_classes, input_shape, **kwargs)
      jax.eval_shape(model.init, jax.random.key(0))
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.hetero.model_groups[{i}] ({spec}) does not build a model: {e}") from None
    desc = "_".join(str(kwargs[k]) if not isinstance(kwargs[k], (tuple, list)) else "x".join(map(str, kwargs[k]))
                    for k in ("features", "dense", "hidden", "width") if k in kwargs)
    out.append((f"g{i}_{spec['name']}" + (f"_{desc}" if desc else ""), model))
  return out


@config_validation.register_check
def check_config(config, data=None) -> None:
  """Validates ``config.hetero`` and the data the heterogeneous methods need, before any compile."""
  if config.algorithm not in ALGORITHM_NAMES:
    return
  require = config_validation.require
  require("hetero" in config, "hetero", "a section (heterogeneous.algorithms.add_config)", None)
  h = config.hetero
  specs = list(h.model_groups)
  require(len(specs) >= 1, "hetero.model_groups", "a non-empty list of model dicts", specs)
  for i, spec in enumerate(specs):
    require(isinstance(spec, Mapping) and "name" in spec, f"hetero.model_groups[{i}]", "a dict with a 'name'", spec)
    require(spec["name"] in models_lib.MODELS, f"hetero.model_groups[{i}].name",
            f"one of {sorted(models_lib.MODELS)}", spec["name"])
  require(h.assignment in groups_lib.ASSIGNMENTS, "hetero.assignment", f"one of {list(groups_lib.ASSIGNMENTS)}",
          h.assignment)
  require(h.fd_weight >= 0, "hetero.fd_weight", ">= 0", h.fd_weight)
  require(h.fd_temperature > 0, "hetero.fd_temperature", "> 0", h.fd_temperature)
  require(h.proto_weight >= 0, "hetero.proto_weight", ">= 0", h.proto_weight)
  require(h.fedmd_pretrain_epochs >= 0, "hetero.fedmd_pretrain_epochs", ">= 0", h.fedmd_pretrain_epochs)
  require(h.fedmd_public_per_round >= 0, "hetero.fedmd_public_per_round", ">= 0 (0: all)", h.fedmd_public_per_round)
  require(h.fedmd_digest_epochs >= 0, "hetero.fedmd_digest_epochs", ">= 0", h.fedmd_digest_epochs)
  require(h.fedmd_digest_lr > 0, "hetero.fedmd_digest_lr", "> 0", h.fedmd_digest_lr)
  require(h.feddf_steps >= 0, "hetero.feddf_steps", ">= 0 (0: FedAvg within groups)", h.feddf_steps)
  require(h.feddf_lr > 0, "hetero.feddf_lr", "> 0", h.feddf_lr)
  require(h.feddf_temperature > 0, "hetero.feddf_temperature", "> 0", h.feddf_temperature)
  require(h.feddf_batch_size >= 1, "hetero.feddf_batch_size", ">= 1", h.feddf_batch_size)
  require(0.0 < h.feddf_val_fraction < 1.0, "hetero.feddf_val_fraction", "in (0, 1)", h.feddf_val_fraction)
  require(h.feddf_eval_every >= 1, "hetero.feddf_eval_every", ">= 1", h.feddf_eval_every)
  require(h.feddf_patience >= 1, "hetero.feddf_patience", ">= 1", h.feddf_patience)
  require(config.num_devices <= 1, "num_devices", f"<= 1 for {config.algorithm} (no sharded group map)",
          config.num_devices)
  if config.algorithm in NEEDS_PUBLIC:
    require(config.dataset.name.endswith("_public"), "dataset.name",
            f"a dataset with a public set ({[n for n in data_registry.DATASETS if n.endswith('_public')]}) for "
            f"{config.algorithm}", config.dataset.name)
  if config.dataset.name.endswith("mnist_public"):
    require(config.dataset.get("public_source", "val") in public_data.MEDMNIST_SOURCES, "dataset.public_source",
            f"one of {list(public_data.MEDMNIST_SOURCES)}", config.dataset.get("public_source"))
  if data is None:
    return
  n = data.num_clients
  require(config.cohort_size in (0, n), "cohort_size", f"0 or {n} (every client every round) for {config.algorithm}",
          config.cohort_size)
  named = group_models(config, data.num_classes, data.input_shape)
  groups_lib.assign_groups(data.train.client_sizes, [name for name, _ in named], h.assignment,
                           tuple(h.explicit_groups))
  if config.algorithm == "fedproto":
    dims = {name: m.embedding_dim for name, m in named}
    require(len(set(dims.values())) == 1, "hetero.model_groups",
            "models of one embedding size (the head's input width) for FedProto", dims)
  if config.algorithm in NEEDS_PUBLIC:
    require(data.public is not None, "dataset.name", f"a dataset with a public set for {config.algorithm}", data.name)
    public_data.check_disjoint(np.asarray(data.public["x"]), np.asarray(data.train.x), "config.dataset (public set)")
  if config.algorithm == "fedmd":
    require(bool(np.all(np.asarray(data.public["y"]) >= 0)), "dataset.public_source",
            "a labelled public set for FedMD (its transfer-learning step fits the public labels)",
            config.dataset.get("public_source", data.name))
  if config.algorithm == "feddf":
    n_val = int(round(h.feddf_val_fraction * len(data.public["x"])))
    require(1 <= n_val < len(data.public["x"]), "hetero.feddf_val_fraction",
            f"a fraction leaving >= 1 public example on each side of {len(data.public['x'])}", h.feddf_val_fraction)


# ----------------------------------------------------------------------------------------------
# Building the groups, the state and the evaluation.


def build_groups(config, data: FederatedData) -> tuple[groups_lib.Group, ...]:
  named = group_models(config, data.num_classes, data.input_shape)
  assign = groups_lib.assign_groups(data.train.client_sizes, [name for name, _ in named], config.hetero.assignment,
                                    tuple(config.hetero.explicit_groups))
  out = []
  for (name, model), clients in zip(named, groups_lib.members(assign, len(named))):
    gd = groups_lib.group_data(data, clients)
    out.append(groups_lib.Group(name, model, clients, gd, build_plan(config, gd.train.client_sizes)))
  return tuple(out)


def init_client_models(groups, seed: int) -> tuple:
  """Returns per group the stacked client models; client c starts from ``fold_in(key(seed), c)``."""
  base = jax.random.key(seed)
  return tuple(jax.vmap(g.model.init)(jax.vmap(lambda c: jax.random.fold_in(base, c))(jnp.asarray(g.clients)))
               for g in groups)


def make_evaluate(groups, data: FederatedData, width: int = 1):
  """Returns ``evaluate(stacked per group, prototypes=None) -> metrics`` (own model, own test split)."""
  fns = [groups_lib.make_group_outputs(g.model, g.data.test, width) for g in groups]
  ys = [jnp.asarray(g.data.test.y) for g in groups]

  @jax.jit
  def outputs_of(emb, logits, y, prototypes):
    out = example_outputs(logits, y)
    if prototypes is not None:
      out["proto_correct"] = (T.nearest_prototype(emb, *prototypes) == y).astype(jnp.float32)
    return out

  def evaluate(stacked, prototypes=None):
    outputs = [jax.device_get(outputs_of(*fn(st), y, prototypes)) for fn, y, st in zip(fns, ys, stacked)]
    return groups_lib.merge_evaluation(groups, outputs, data.num_clients, data.num_classes,
                                       ("proto_correct",) if prototypes is not None else ())

  return evaluate


def comm_metrics(groups, per_client: list[tuple[int, int]]) -> dict:
  """Returns bytes up/down per client per round (mean over clients) and in total per round."""
  sizes = np.array([g.size for g in groups])
  up = np.array([u for u, _ in per_client], np.float64)
  down = np.array([d for _, d in per_client], np.float64)
  n = sizes.sum()
  return {"bytes_up_per_client": float(np.sum(up * sizes) / n), "bytes_down_per_client": float(np.sum(down * sizes) / n),
          "bytes_up_per_round": float(np.sum(up * sizes)), "bytes_down_per_round": float(np.sum(down * sizes))}


def _client_opt(config):
  c = config.client
  return fedavg_lib.client_optimizer(c.optimizer, c.learning_rate, c.momentum)


def _device_trains(groups) -> tuple:
  return tuple(fedavg_lib.device_train_data(g.data.train) for g in groups)


def _with_comm(round_fn, comm: dict):
  consts = {k: jnp.asarray(v, jnp.float32) for k, v in comm.items()}

  def fn(state, train, rng):
    state, metrics = round_fn(state, train, rng)
    return state, {**metrics, **consts}

  return fn


def _experiment(name, state, round_fn, trains, evaluate, groups, comm):
  return Experiment(name, state, _with_comm(round_fn, comm), trains, lambda st: {**evaluate(st), **comm},
                    params_of=lambda st: {g.name: p for g, p in zip(groups, st.clients)})


def build_exchange(config, data, method: str) -> Experiment:
  """Returns the hetero_local / fd / fedproto experiment."""
  groups = build_groups(config, data)
  h = config.hetero
  weight = h.fd_weight if method == "fd" else h.proto_weight
  temp = h.fd_temperature
  rnd = rounds.ExchangeRound(groups, method, _client_opt(config), data.num_classes, weight=weight, temperature=temp,
                             proto_weighted=h.proto_weighted, width=config.clients_per_step,
                             unroll=config.client.get("unroll", 1))
  state = rounds.HeteroState(init_client_models(groups, config.seed), rnd.init_server(), jnp.zeros((), jnp.int32))
  k = data.num_classes
  if method == "fd":
    comm = comm_metrics(groups, [T.fd_bytes(k)] * len(groups))
  elif method == "fedproto":
    comm = comm_metrics(groups, [T.fedproto_bytes(k, groups[0].model.embedding_dim)] * len(groups))
  else:
    comm = comm_metrics(groups, [(0, 0)] * len(groups))
  ev = make_evaluate(groups, data, config.clients_per_step)
  evaluate = (lambda st: ev(st.clients, st.server)) if method == "fedproto" else (lambda st: ev(st.clients))
  name = {"local": "hetero_local"}.get(method, method)
  return _experiment(name, state, rnd.round_fn, _device_trains(groups), evaluate, groups, comm)


def fedmd_transfer(groups, stacked: tuple, public: dict, opt, batch_size: int, epochs: int, seed: int,
                   width: int = 1) -> tuple:
  """Returns every party's model after ``epochs`` on the labelled public set (FedMD's transfer learning)."""
  if epochs == 0:
    return stacked
  n = len(public["y"])
  steps = -(-n // batch_size) * epochs
  x, y = jnp.asarray(public["x"]), jnp.asarray(public["y"])
  out = []
  for g, (group, st) in enumerate(zip(groups, stacked)):
    trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(group.model.example_losses), opt)

    def one(pk, trainer=trainer):
      params, key = pk
      k_perm, k_train = jax.random.split(key)
      perm = jnp.concatenate([jax.random.permutation(k, n) for k in jax.random.split(k_perm, epochs)])
      pad = steps * batch_size - perm.shape[0]
      idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(steps, batch_size)
      mask = (jnp.arange(steps * batch_size) < perm.shape[0]).reshape(steps, batch_size)
      delta, _ = client_lib.local_train(trainer, params, x[idx], y[idx], mask, k_train)
      return client_lib.tree_add(params, delta)

    keys = jax.vmap(lambda c: jax.random.fold_in(jax.random.key(seed + 3), c))(jnp.asarray(group.clients))
    out.append(jax.jit(lambda st, keys, one=one: client_lib.map_clients(one, (st, keys), width))(st, keys))
  return tuple(out)


def build_fedmd_experiment(config, data) -> Experiment:
  groups = build_groups(config, data)
  h = config.hetero
  public = data.public
  n_pub = len(public["y"])
  per_round = h.fedmd_public_per_round or n_pub
  rnd = rounds.FedMDRound(groups, _client_opt(config), optax.adam(h.fedmd_digest_lr), data.num_classes, per_round,
                          n_pub, config.client.batch_size, h.fedmd_digest_epochs, config.clients_per_step,
                          config.client.get("unroll", 1))
  stacked = fedmd_transfer(groups, init_client_models(groups, config.seed), public, _client_opt(config),
                           config.client.batch_size, h.fedmd_pretrain_epochs, config.seed, config.clients_per_step)
  state = rounds.HeteroState(stacked, None, jnp.zeros((), jnp.int32))
  trains = _device_trains(groups) + ({"x": jnp.asarray(public["x"])},)
  comm = comm_metrics(groups, [T.fedmd_bytes(per_round, data.num_classes)] * len(groups))
  ev = make_evaluate(groups, data, config.clients_per_step)
  return _experiment("fedmd", state, rnd.round_fn, trains, lambda st: ev(st.clients), groups, comm)


def _server_opt(config):
  s = config.server
  return fedavg_lib.server_optimizer(s.optimizer, s.learning_rate, s.b1, s.b2, s.tau, s.momentum)


def group_init(groups, seed: int) -> tuple:
  """Returns each group's starting model (FedAvg / FedDF): ``fold_in(key(seed), g)``."""
  return tuple(g.model.init(jax.random.fold_in(jax.random.key(seed), i)) for i, g in enumerate(groups))


def public_split(public: dict, val_fraction: float, seed: int) -> dict:
  """Returns ``{"x_train", "x_val"}``: a seeded split of the public inputs for FedDF's early stopping."""
  n = len(public["x"])
  perm = np.random.default_rng(seed).permutation(n)
  n_val = int(round(val_fraction * n))
  x = np.asarray(public["x"])
  return {"x_train": jnp.asarray(x[perm[n_val:]]), "x_val": jnp.asarray(x[perm[:n_val]])}


def build_feddf_experiment(config, data) -> Experiment:
  groups = build_groups(config, data)
  h = config.hetero
  rnd = rounds.FedDFRound(groups, _client_opt(config), _server_opt(config), data.num_classes, steps=h.feddf_steps,
                          lr=h.feddf_lr, temperature=h.feddf_temperature, batch_size=h.feddf_batch_size,
                          eval_every=h.feddf_eval_every, patience=h.feddf_patience, width=config.clients_per_step,
                          unroll=config.client.get("unroll", 1))
  params = group_init(groups, config.seed)
  state = rounds.HeteroState(params, rnd.init_server(params), jnp.zeros((), jnp.int32))
  trains = _device_trains(groups) + (public_split(data.public, h.feddf_val_fraction, config.seed),)
  comm = comm_metrics(groups, [T.fedavg_bytes(p) for p in params])
  ev = make_evaluate(groups, data, config.clients_per_step)
  evaluate = lambda st: ev([rounds._broadcast(p, g.size) for g, p in zip(groups, st.clients)])
  return _experiment("feddf", state, rnd.round_fn, trains, evaluate, groups, comm)


def build_group_fedavg_experiment(config, data) -> Experiment:
  """FedAvg within each architecture group: the engine's ``fedavg`` round per group, keys ``fold_in(rng, g)``."""
  groups = build_groups(config, data)
  algs = [fedavg_registry.build_fedavg_algorithm(config, g.data.train, g.model) for g in groups]
  params = group_init(groups, config.seed)
  state = tuple(a.init(p) for a, p in zip(algs, params))

  def round_fn(states, trains, rng):
    outs = [a.round_fn(s, t, jax.random.fold_in(rng, g)) for g, (a, s, t) in enumerate(zip(algs, states, trains))]
    w = jnp.stack([m["examples_used"] for _, m in outs])
    loss = jnp.stack([m["train_loss"] for _, m in outs])
    return tuple(s for s, _ in outs), {"train_loss": jnp.sum(w * loss) / jnp.maximum(jnp.sum(w), 1.0),
                                       "examples_used": jnp.sum(w)}

  comm = comm_metrics(groups, [T.fedavg_bytes(p) for p in params])
  ev = make_evaluate(groups, data, config.clients_per_step)
  evaluate = lambda sts: ev([rounds._broadcast(s.params, g.size) for g, s in zip(groups, sts)])
  return Experiment("hetero_fedavg", state, _with_comm(round_fn, comm), _device_trains(groups),
                    lambda sts: {**evaluate(sts), **comm},
                    params_of=lambda sts: {g.name: s.params for g, s in zip(groups, sts)})


@register_algorithm("hetero_local")
def _build_local(config, data, model):
  return [build_exchange(config, data, "local")]


@register_algorithm("fd")
def _build_fd(config, data, model):
  return [build_exchange(config, data, "fd")]


@register_algorithm("fedproto")
def _build_fedproto(config, data, model):
  return [build_exchange(config, data, "fedproto")]


@register_algorithm("fedmd")
def _build_fedmd(config, data, model):
  return [build_fedmd_experiment(config, data)]


@register_algorithm("feddf")
def _build_feddf(config, data, model):
  return [build_feddf_experiment(config, data)]


@register_algorithm("hetero_fedavg")
def _build_group_fedavg(config, data, model):
  return [build_group_fedavg_experiment(config, data)]
