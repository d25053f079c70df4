"""Compiled rounds of the model-heterogeneous methods: one client map per architecture group.

Every method trains each group's clients with the engine's ``client.local_train`` mapped over the
group (``client.map_clients``); the per-client loss is the task loss plus a method term built from
what the server sent (``make_grad_fn`` with a per-client closure). Python loops run over groups
only; between groups pass only shape-independent quantities (transforms.py). The PRNG keys of a
group's round are split exactly as in ``algorithms.fedavg`` (``fold_in(rng, g)`` then the same
five-way split), so FedDF with no distillation is FedAvg within each group.

* ``local``: every client trains alone (no exchange).
* FD (Jeong et al. 2018): loss CE + beta * KL(teacher[y] || f(x)) with the teacher the other
  clients' mean logits for label y; clients upload per-label mean logits of the round's examples.
* FedProto (Tan et al. 2022): loss CE + lambda * ||embed(x) - P[y]||^2 (mean over D) with P the
  global prototypes; clients upload per-class mean embeddings, averaged per class over holders.
* FedMD (Li & Wang 2019): after transfer learning on the labelled public set, each round every
  party scores a public subset, the server averages the scores (consensus), each party
  *digests* (fits the consensus, L1 on logits as the authors' code) and *revisits* its private data.
* FedDF (Lin et al. 2020): FedAvg within each group, then the server distils each group model on
  unlabelled public data towards the mean logits of all clients' models (KL at temperature T,
  Adam), keeping the best model on a validation part of the public data (early stopping).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_health import client as client_lib
from fedjax_health.data.federated import make_batch_plan
from fedjax_health.heterogeneous import transforms as T
from fedjax_health.heterogeneous.groups import Group
from fedjax_health.models import per_example_loss

Params = Any
# loss(model, params, x, y, extra) -> [B] per-example losses; ``extra`` is this client's server message.
ClientLoss = Callable[..., jax.Array]


class HeteroState(NamedTuple):
  clients: tuple  # per group: stacked client models [n_g, ...] (or the group model for FedDF)
  server: Any  # per method: FD teachers, FedProto prototypes, FedDF optimiser states
  round: jax.Array


def local_loss(model, params, x, y, extra):
  del extra
  return model.example_losses(params, x, y)


def fd_loss(weight: float, temperature: float) -> ClientLoss:
  """FD's client loss: CE + weight * KL towards the teacher of the example's label (where one exists)."""

  def loss(model, params, x, y, extra):
    teacher, valid = extra  # [K, K], [K]
    logits = model.apply(params, x)
    y = y.astype(jnp.int32)
    distill = T.kl_distillation(logits, teacher[y], temperature) * valid[y].astype(logits.dtype)
    return per_example_loss(logits, y) + weight * distill

  return loss


def fedproto_loss(weight: float) -> ClientLoss:
  """FedProto's client loss: CE + weight * MSE(embedding, global prototype of the label) where present."""

  def loss(model, params, x, y, extra):
    protos, present = extra  # [K, D], [K]
    emb, logits = model.embed_and_logits(params, x)
    y = y.astype(jnp.int32)
    reg = T.squared_distance(emb, protos[y]) * present[y].astype(emb.dtype)
    return per_example_loss(logits, y) + weight * reg

  return loss


def group_keys(rng: jax.Array, g: int, round_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (plan key, clients key) of group g's round, split as ``fedavg.round_fn`` splits them."""
  _, k_plan, k_clients, _, _ = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, g), round_idx), 5)
  return k_plan, k_clients


def train_group(group: Group, train: dict, stacked: Params, extra: Any, loss: ClientLoss, opt, rng: jax.Array,
                width: int = 1, unroll: int | bool = 1, num_classes: int = 2):
  """Returns (new stacked params, deltas, aux, stats) after each client of ``group`` trains locally.

  ``train`` is the group's device data (``fedavg.device_train_data``); ``extra`` is stacked per
  client (``[n_g, ...]`` leaves) or None. ``stats`` = per-label mean logits ``[n_g, K, K]``,
  prototypes ``[n_g, K, D]`` and counts ``[n_g, K]`` of the round's examples under the new models.
  """
  k_plan, k_clients = rng
  n = group.size
  pos, mask = make_batch_plan(k_plan, train["sizes"], group.plan)
  keys = jax.random.split(k_clients, n)
  model = group.model

  def one(pc):
    params, offset, pos_c, mask_c, key, ex = pc
    batch = client_lib.gather_client_batches(train["arrays"], offset, pos_c)
    grad_fn = client_lib.make_grad_fn(lambda p, x, y: loss(model, p, x, y, ex))
    trainer = client_lib.ClientTrainer(grad_fn, opt, unroll=unroll)
    delta, aux = client_lib.local_train(trainer, params, batch["x"], batch["y"], mask_c, key)
    new = client_lib.tree_add(params, delta)
    x = batch["x"].reshape((-1,) + batch["x"].shape[2:])
    y = batch["y"].reshape(-1).astype(jnp.int32)
    m = mask_c.reshape(-1)
    emb, logits = model.embed_and_logits(new, x)
    label_logits, counts = T.class_means(T.as_class_logits(logits), y, m, num_classes)
    protos, _ = T.class_means(emb, y, m, num_classes)
    return new, delta, aux, (label_logits, protos, counts)

  offsets = train["offsets"][:-1]
  return client_lib.map_clients(one, (stacked, offsets, pos, mask, keys, extra), width)


def _train_loss(auxes: Sequence[dict]) -> jax.Array:
  loss = jnp.concatenate([a["loss"] for a in auxes])
  w = jnp.concatenate([a["num_examples"] for a in auxes])
  return jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1.0)


def _broadcast(tree, n):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), tree)


@dataclasses.dataclass(frozen=True)
class ExchangeRound:
  """Local / FD / FedProto: train every group with a method loss, then the server exchange.

  ``method`` is ``local``, ``fd`` or ``fedproto``. The server part of the state is, for FD, the
  per-group teachers ``([n_g, K, K], [n_g, K])``; for FedProto the global ``(protos [K, D],
  present [K])``; for local, None.
  """

  groups: tuple
  method: str
  opt: Any
  num_classes: int
  weight: float = 1.0
  temperature: float = 1.0
  proto_weighted: bool = True
  width: int = 1
  unroll: int | bool = 1

  def __post_init__(self):
    if self.method not in ("local", "fd", "fedproto"):
      raise ValueError(f"method must be local, fd or fedproto, got {self.method!r}")
    if self.weight < 0:
      raise ValueError(f"distillation / prototype weight must be >= 0, got {self.weight}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    if self.method == "fedproto":
      dims = {g.name: g.model.embedding_dim for g in self.groups}
      if len(set(dims.values())) > 1:
        raise ValueError("config.hetero.model_groups: FedProto needs one embedding size across groups "
                         f"(the head's input width), got {dims}")

  def init_server(self):
    k = self.num_classes
    if self.method == "fd":
      return tuple((jnp.zeros((g.size, k, k)), jnp.zeros((g.size, k), bool)) for g in self.groups)
    if self.method == "fedproto":
      d = self.groups[0].model.embedding_dim
      return (jnp.zeros((k, d)), jnp.zeros((k,), bool))
    return None

  def _loss(self):
    if self.method == "fd":
      return fd_loss(self.weight, self.temperature)
    if self.method == "fedproto":
      return fedproto_loss(self.weight)
    return local_loss

  def round_fn(self, state: HeteroState, trains: tuple, rng: jax.Array):
    loss = self._loss()
    news, auxes, stats = [], [], []
    for g, group in enumerate(self.groups):
      if self.method == "fd":
        extra = state.server[g]
      elif self.method == "fedproto":
        extra = _broadcast(state.server, group.size)
      else:
        extra = None
      new, _, aux, st = train_group(group, trains[g], state.clients[g], extra, loss, self.opt,
                                    group_keys(rng, g, state.round), self.width, self.unroll, self.num_classes)
      news.append(new)
      auxes.append(aux)
      stats.append(st)
    label_logits = jnp.concatenate([s[0] for s in stats])
    protos = jnp.concatenate([s[1] for s in stats])
    counts = jnp.concatenate([s[2] for s in stats])
    metrics = {"train_loss": _train_loss(auxes)}
    if self.method == "fd":
      teacher, valid = T.leave_one_out_label_logits(label_logits, counts)
      cuts = [0]
      for group in self.groups:
        cuts.append(cuts[-1] + group.size)
      server = tuple((teacher[a:b], valid[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    elif self.method == "fedproto":
      server = T.aggregate_prototypes(protos, counts, self.proto_weighted)
      metrics["classes_with_prototype"] = jnp.sum(server[1])
    else:
      server = None
    return HeteroState(tuple(news), server, state.round + 1), metrics


def l1_to_consensus(model, params, x, y, extra):
  """FedMD's digest loss: mean absolute difference between the party's logits and the consensus ``y``."""
  del extra
  return jnp.mean(jnp.abs(T.as_class_logits(model.apply(params, x)) - y), axis=-1)


@dataclasses.dataclass(frozen=True)
class FedMDRound:
  """FedMD: consensus on a public subset, digest, revisit. ``public_x`` lives in ``trains[-1]``."""

  groups: tuple
  opt: Any
  digest_opt: Any
  num_classes: int
  num_public: int  # public examples per round
  public_size: int  # examples in the public set
  digest_batch: int
  digest_epochs: int = 1
  width: int = 1
  unroll: int | bool = 1

  def __post_init__(self):
    if not 1 <= self.num_public <= self.public_size:
      raise ValueError(f"config.hetero.fedmd_public_per_round must be in [1, {self.public_size}] (public "
                       f"examples), got {self.num_public}")
    if self.digest_batch < 1 or self.digest_epochs < 0:
      raise ValueError("FedMD digest batch must be >= 1 and digest epochs >= 0")

  def round_fn(self, state: HeteroState, trains: tuple, rng: jax.Array):
    public = trains[-1]
    k_pub = jax.random.fold_in(jax.random.fold_in(rng, len(self.groups)), state.round)
    idx = jax.random.choice(k_pub, self.public_size, (self.num_public,), replace=False)
    x_pub = jnp.take(public["x"], idx, axis=0)
    scores = [client_lib.map_clients(lambda p, m=group.model: T.as_class_logits(m.apply(p, x_pub)),
                                     state.clients[g], self.width) for g, group in enumerate(self.groups)]
    cons = T.consensus(jnp.concatenate(scores))  # [P, K]
    b = self.digest_batch
    steps_per_epoch = -(-self.num_public // b)
    steps = steps_per_epoch * self.digest_epochs
    slots = jnp.arange(steps * b) % (steps_per_epoch * b)
    dmask = (slots < self.num_public).reshape(steps, b)
    slots = jnp.minimum(slots, self.num_public - 1)
    dx = x_pub[slots].reshape((steps, b) + x_pub.shape[1:])
    dy = cons[slots].reshape(steps, b, -1)
    news, auxes = [], []
    for g, group in enumerate(self.groups):
      trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(
          lambda p, x, y, m=group.model: l1_to_consensus(m, p, x, y, None)), self.digest_opt, unroll=self.unroll)
      k_plan, k_clients = group_keys(rng, g, state.round)
      dkeys = jax.random.split(jax.random.fold_in(k_clients, 1), group.size)
      digested = client_lib.map_clients(
          lambda pk: client_lib.tree_add(pk[0], client_lib.local_train(trainer, pk[0], dx, dy, dmask, pk[1])[0]),
          (state.clients[g], dkeys), self.width) if steps else state.clients[g]
      new, _, aux, _ = train_group(group, trains[g], digested, None, local_loss, self.opt, (k_plan, k_clients),
                                   self.width, self.unroll, self.num_classes)
      news.append(new)
      auxes.append(aux)
    metrics = {"train_loss": _train_loss(auxes),
               "consensus_l1": jnp.mean(jnp.abs(jnp.concatenate(scores) - cons[None]))}
    return HeteroState(tuple(news), None, state.round + 1), metrics


def distill(model, params: Params, x_train, t_train, x_val, t_val, rng: jax.Array, *, steps: int, lr: float,
            temperature: float, batch_size: int, eval_every: int, patience: int) -> tuple[Params, dict]:
  """Returns (best params, info): Adam on KL(teacher || student) at ``temperature``, early stopping.

  The validation KL is measured at the start and every ``eval_every`` steps; the model with the
  lowest one is kept and training stops after ``patience`` evaluations without improvement
  (FedDF's server-side fusion, Lin et al. 2020, Alg. 1). ``steps == 0`` returns ``params``.
  """
  if steps == 0:
    return params, {"distill_steps": jnp.zeros((), jnp.int32), "distill_val_kl": jnp.zeros(())}
  opt = optax.adam(lr)
  n = x_train.shape[0]

  def val_kl(p):
    return jnp.mean(T.kl_distillation(model.apply(p, x_val), t_val, temperature))

  def train_kl(p, x, t):
    return jnp.mean(T.kl_distillation(model.apply(p, x), t, temperature))

  grad = jax.grad(train_kl)
  v0 = val_kl(params)

  def step(carry, inp):
    p, s, best_p, best_v, since, stopped, used = carry
    i, key = inp
    idx = jax.random.randint(key, (batch_size,), 0, n)
    upd, s_new = opt.update(grad(p, x_train[idx], t_train[idx]), s, p)
    p_new = optax.apply_updates(p, upd)
    p = client_lib.tree_where(stopped, p, p_new)
    s = client_lib.tree_where(stopped, s, s_new)
    used = used + (~stopped).astype(jnp.int32)
    check = ((i + 1) % eval_every == 0) & ~stopped
    v = jax.lax.cond(check, val_kl, lambda _: jnp.inf, p)
    better = check & (v < best_v)
    best_p = client_lib.tree_where(better, p, best_p)
    best_v = jnp.where(better, v, best_v)
    since = jnp.where(check, jnp.where(better, 0, since + 1), since)
    stopped = stopped | (since >= patience)
    return (p, s, best_p, best_v, since, stopped, used), None

  carry = (params, opt.init(params), params, v0, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
           jnp.zeros((), jnp.int32))
  (_, _, best, best_v, _, _, used), _ = jax.lax.scan(step, carry, (jnp.arange(steps), jax.random.split(rng, steps)))
  return best, {"distill_steps": used, "distill_val_kl": best_v, "distill_val_kl_start": v0}


@dataclasses.dataclass(frozen=True)
class FedDFRound:
  """FedDF: FedAvg within each group (weighted by examples used), then ensemble distillation.

  ``state.clients[g]`` is group g's model; ``state.server[g]`` its server-optimiser state.
  ``trains[-1]`` holds the public inputs: ``x_train`` / ``x_val`` (the validation part).
  """

  groups: tuple
  opt: Any
  server_opt: Any
  num_classes: int
  steps: int = 100
  lr: float = 1e-3
  temperature: float = 1.0
  batch_size: int = 32
  eval_every: int = 10
  patience: int = 3
  width: int = 1
  unroll: int | bool = 1

  def __post_init__(self):
    if self.steps < 0 or self.lr <= 0 or self.temperature <= 0 or self.batch_size < 1:
      raise ValueError("FedDF needs feddf_steps >= 0, feddf_lr > 0, feddf_temperature > 0, feddf_batch_size >= 1")
    if self.eval_every < 1 or self.patience < 1:
      raise ValueError("FedDF needs feddf_eval_every >= 1 and feddf_patience >= 1")

  def init_server(self, group_params):
    return tuple(self.server_opt.init(p) for p in group_params)

  def round_fn(self, state: HeteroState, trains: tuple, rng: jax.Array):
    public = trains[-1]
    models, opt_states, auxes, teachers = [], [], [], []
    for g, group in enumerate(self.groups):
      params = state.clients[g]
      stacked = _broadcast(params, group.size)
      new, delta, aux, _ = train_group(group, trains[g], stacked, None, local_loss, self.opt,
                                       group_keys(rng, g, state.round), self.width, self.unroll, self.num_classes)
      finite = jax.vmap(client_lib.tree_all_finite)(delta)
      w = jnp.where(finite, aux["num_examples"], 0.0)
      agg = jax.tree.map(lambda d: jnp.einsum("c,c...->...", w, jnp.where(
          finite.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0)) / jnp.maximum(jnp.sum(w), 1e-12), delta)
      upd, opt_state = self.server_opt.update(jax.tree.map(jnp.negative, agg), state.server[g], params)
      models.append(optax.apply_updates(params, upd))
      opt_states.append(opt_state)
      auxes.append(dict(aux, num_examples=w))
      x_all = jnp.concatenate([public["x_train"], public["x_val"]])
      teachers.append(client_lib.map_clients(lambda p, m=group.model: T.as_class_logits(m.apply(p, x_all)),
                                             new, self.width))
    teacher = T.consensus(jnp.concatenate(teachers))  # [P, K], every client's model weighs the same
    n_tr = public["x_train"].shape[0]
    metrics = {"train_loss": _train_loss(auxes)}
    fused = []
    for g, group in enumerate(self.groups):
      key = jax.random.fold_in(jax.random.fold_in(rng, len(self.groups) + g), state.round)
      p, info = distill(group.model, models[g], public["x_train"], teacher[:n_tr], public["x_val"], teacher[n_tr:],
                        key, steps=self.steps, lr=self.lr, temperature=self.temperature,
                        batch_size=self.batch_size, eval_every=self.eval_every, patience=self.patience)
      fused.append(p)
      metrics.update({f"{group.name}_{k}": v for k, v in info.items()})
    return HeteroState(tuple(fused), tuple(opt_states), state.round + 1), metrics
