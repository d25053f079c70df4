"""Per-client evaluation, validation choice and local fine-tuning of personalised models.

Helpers of ``personalized.py`` (and ``clustered.py``): each client's own model evaluated on its own
examples (one compiled map over clients), a per-client choice among candidate models by held-out
loss, and fine-tuning of the global model on each client's data, optionally mixed with the whole
federation's data (Mansour et al. 2020's data interpolation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_health import client as client_lib
from fedjax_health import metrics as metrics_lib
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.data.federated import BatchPlanSpec, FederatedData, FederatedDataset, make_batch_plan
from fedjax_health.models import per_example_loss, positive_score, predict_labels


def padded_client_index(ds: FederatedDataset) -> tuple[np.ndarray, np.ndarray]:
  """Returns (rows ``[C, M]`` into the flat arrays, valid ``[C, M]``), M the largest client."""
  sizes = ds.client_sizes
  m = max(int(sizes.max(initial=0)), 1)
  j = np.arange(m)[None, :]
  valid = j < sizes[:, None]
  rows = np.where(valid, ds.offsets[:-1, None] + j, 0)
  return rows.astype(np.int32), valid


def make_client_logits(model, ds: FederatedDataset, width: int = 1):
  """Returns ``logits(stacked_params [C, ...]) -> [N, out]``: client c's model on its own rows.

  The data travel as arguments of the compiled function (not as baked-in constants).
  """
  rows, _ = padded_client_index(ds)
  client = ds.client_of_example()
  within = np.arange(ds.num_examples) - ds.offsets[client]
  arrays = {"x": jnp.asarray(ds.x), "rows": jnp.asarray(rows), "client": jnp.asarray(client),
            "within": jnp.asarray(within)}

  @jax.jit
  def logits_fn(stacked, a):
    out = client_lib.map_clients(lambda pr: model.apply(pr[0], jnp.take(a["x"], pr[1], axis=0)),
                                 (stacked, a["rows"]), width)
    return out[a["client"], a["within"]]

  return lambda stacked: logits_fn(stacked, arrays)


def example_outputs(logits: jax.Array, y: jax.Array) -> dict:
  """Returns the per-example ``loss``, ``correct``, ``score`` that ``metrics.summarize`` reads."""
  return {"loss": per_example_loss(logits, y),
          "correct": (predict_labels(logits) == y).astype(jnp.float32),
          "score": positive_score(logits) if logits.shape[-1] <= 2 else jnp.zeros(logits.shape[0])}


def make_personal_evaluate(model, data: FederatedData, width: int = 1):
  """Returns ``evaluate(stacked_params [num_clients, ...]) -> metrics`` on each client's test split.

  Metrics as ``metrics.summarize``: ``accuracy`` pools every client's own-model predictions;
  ``mean_client_accuracy``, ``worst_client_accuracy``, ``worst10_client_accuracy``, ``loss``, ...
  """
  logits_fn = make_client_logits(model, data.test, width)
  test = metrics_lib.device_eval_data(data.test)
  y = test["y"]

  def evaluate(stacked):
    return metrics_lib.summarize(example_outputs(logits_fn(stacked), y), test, data.test.num_clients,
                                 data.num_classes)

  return evaluate


def split_validation(ds: FederatedDataset, fraction: float,
                     seed: int = 0) -> tuple[FederatedDataset, FederatedDataset]:
  """Returns (fit, val): each client keeps a random ``fraction`` of its rows (>= 1 if it has 2+) for val."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
  rng = np.random.default_rng(seed)
  fit_rows, val_rows, fit_sizes, val_sizes = [], [], [], []
  for c, n in enumerate(ds.client_sizes):  # host-side data preparation, once
    perm = ds.offsets[c] + rng.permutation(n)
    n_val = int(min(max(1, round(fraction * n)), n - 1)) if n >= 2 else 0
    val_rows.append(perm[:n_val])
    fit_rows.append(perm[n_val:])
    fit_sizes.append(n - n_val)
    val_sizes.append(n_val)
  def make(rows, sizes):
    rows = np.concatenate(rows).astype(np.int64)
    return FederatedDataset({k: v[rows] for k, v in ds.arrays.items()}, np.concatenate([[0], np.cumsum(sizes)]),
                            ds.client_ids)

  return make(fit_rows, fit_sizes), make(val_rows, val_sizes)


def make_validation_choice(model, val: FederatedDataset, num_choices: int, width: int = 1):
  """Returns ``choose(params [C, G, ...]) -> [C]``: per client, the choice of lowest val loss.

  Clients without validation rows take choice 0.
  """
  logits_fn = make_client_logits(model, val, width)
  y = jnp.asarray(val.y)
  client = jnp.asarray(val.client_of_example())
  n = val.num_clients
  loss_sums = jax.jit(lambda logits, y, client: jax.ops.segment_sum(per_example_loss(logits, y), client,
                                                                     num_segments=n))

  def choose(stacked):
    losses = [loss_sums(logits_fn(jax.tree.map(lambda p: p[:, g], stacked)), y, client) for g in range(num_choices)]
    return jnp.argmin(jnp.stack(losses, axis=1), axis=1)

  return choose


def mixture_grad_fn(example_losses, lam, own_batch: int) -> client_lib.GradFn:
  """Returns the ``grad_fn`` of ``lam * L(own half) + (1 - lam) * L(C half)`` (Mansour et al. eq. 2).

  A batch holds the client's ``own_batch`` examples first, then as many drawn from C.
  """

  def mixed(q, x, y, m):
    losses = example_losses(q, x, y)
    return (lam * client_lib.masked_mean(losses[:own_batch], m[:own_batch])
            + (1.0 - lam) * client_lib.masked_mean(losses[own_batch:], m[own_batch:]))

  vg = jax.value_and_grad(mixed)

  def grad_fn(q, anchor, x, y, m, rng):
    del anchor, rng
    value, grads = vg(q, x, y, m)
    return grads, value

  return grad_fn


def make_finetune(model, train_ds: FederatedDataset, client_opt, batch_size: int, epochs: int, width: int = 1,
                  lambdas=None):
  """Returns ``finetune(global_params, rng)``: every client's copy of the global model trained locally.

  Each client runs ``epochs`` local epochs from ``global_params``. Without ``lambdas`` it trains on
  its own data (local fine-tuning) and the result has leaves ``[num_clients, ...]``. With
  ``lambdas`` (data interpolation, Mansour et al. 2020) it trains one copy per lambda on
  ``lambda * D_k + (1 - lambda) * C``: every step pairs the client's batch with a batch drawn
  uniformly from all clients' training examples (C); leaves ``[num_clients, len(lambdas), ...]``.
  """
  plan = BatchPlanSpec.create(train_ds.client_sizes, batch_size, num_epochs=epochs)
  plain = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), client_opt)
  train = fedavg_lib.device_train_data(train_ds)
  n = train_ds.num_clients
  grid = None if lambdas is None else jnp.asarray(lambdas, jnp.float32)

  @jax.jit
  def finetune_fn(params, rng, train):
    k_plan, k_train, k_pool = jax.random.split(rng, 3)
    pos, mask = make_batch_plan(k_plan, train["sizes"], plan)
    n_total = train["arrays"]["y"].shape[0]

    def one(a):
      offset, pos_c, mask_c, key, kp = a
      batch = client_lib.gather_client_batches(train["arrays"], offset, pos_c)
      if grid is None:
        delta, _ = client_lib.local_train(plain, params, batch["x"], batch["y"], mask_c, key)
        return client_lib.tree_add(params, delta)
      pool = jax.random.randint(kp, mask_c.shape, 0, n_total)
      x = jnp.concatenate([batch["x"], jnp.take(train["arrays"]["x"], pool, axis=0)], axis=1)
      y = jnp.concatenate([batch["y"], jnp.take(train["arrays"]["y"], pool, axis=0)], axis=1)
      live = jnp.broadcast_to(jnp.any(mask_c, axis=1, keepdims=True), mask_c.shape)  # C is live on live steps
      m = jnp.concatenate([mask_c, live], axis=1)

      def per_lambda(lam):
        trainer = client_lib.ClientTrainer(mixture_grad_fn(model.example_losses, lam, mask_c.shape[1]), client_opt)
        delta, _ = client_lib.local_train(trainer, params, x, y, m, key)
        return client_lib.tree_add(params, delta)

      return jax.lax.map(per_lambda, grid)

    keys = (train["offsets"][:-1], pos, mask, jax.random.split(k_train, n), jax.random.split(k_pool, n))
    return client_lib.map_clients(one, keys, width)

  return lambda params, rng: finetune_fn(params, rng, train)
