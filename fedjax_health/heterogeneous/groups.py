"""Architecture groups: which client runs which model, and per-client evaluation across groups.

A federation with G architectures is G stacked groups. ``assign_groups`` maps every client to a
group (round robin, by dataset size, or an explicit list) and refuses an assignment that leaves a
group without clients. Each group's clients are a ``FederatedDataset`` of their own (one flat array
with offsets), trained with the engine's normal client map; Python loops run over groups only.
``merge_evaluation`` turns the groups' per-example outputs back into per-client metrics in the
original client order (each client judged with its own model on its own test split).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_health import client as client_lib
from fedjax_health import metrics as metrics_lib
from fedjax_health.data.federated import BatchPlanSpec, FederatedData, FederatedDataset

ASSIGNMENTS = ("round_robin", "by_size", "explicit")


def assign_groups(client_sizes: Sequence[int], group_names: Sequence[str], rule: str,
                  explicit: Sequence[int] = ()) -> np.ndarray:
  """Returns ``[num_clients]`` group ids.

  round_robin: client c runs group c mod G. by_size: clients sorted by train size (ties by index)
  are cut into G equal blocks, the smallest clients running group 0 (list groups from the
  smallest model to the largest). explicit: ``explicit[c]`` is client c's group.
  Raises ValueError naming ``hetero.*`` when a group would have no client.
  """
  n, g = len(client_sizes), len(group_names)
  if g < 1:
    raise ValueError("config.hetero.model_groups must list at least one model, got none")
  if rule == "round_robin":
    assign = np.arange(n) % g
  elif rule == "by_size":
    order = np.argsort(np.asarray(client_sizes), kind="stable")
    assign = np.empty(n, np.int64)
    assign[order] = np.arange(n) * g // max(n, 1)
  elif rule == "explicit":
    assign = np.asarray(explicit, np.int64).reshape(-1)
    if assign.shape[0] != n:
      raise ValueError(f"config.hetero.explicit_groups must give one group per client ({n}), got {len(assign)}")
    if np.any((assign < 0) | (assign >= g)):
      raise ValueError(f"config.hetero.explicit_groups must hold group indices in [0, {g}), got {list(assign)}")
  else:
    raise ValueError(f"config.hetero.assignment must be one of {list(ASSIGNMENTS)}, got {rule!r}")
  counts = np.bincount(assign, minlength=g)
  for i in np.flatnonzero(counts == 0):
    raise ValueError(f"config.hetero.assignment={rule!r} leaves config.hetero.model_groups[{i}] "
                     f"({group_names[i]}) without clients ({n} clients for {g} groups)")
  return assign


def members(assign: np.ndarray, num_groups: int) -> list[np.ndarray]:
  """Returns each group's client indices, ascending."""
  return [np.flatnonzero(assign == g) for g in range(num_groups)]


def group_data(data: FederatedData, clients: np.ndarray) -> FederatedData:
  """Returns the federated task restricted to ``clients`` (train and test), public set kept."""
  return dataclasses.replace(data, train=data.train.select_clients(clients), test=data.test.select_clients(clients))


@dataclasses.dataclass(frozen=True)
class Group:
  """One architecture group: its model, its clients (original indices), their data and batch plan."""

  name: str
  model: Any
  clients: np.ndarray
  data: FederatedData
  plan: BatchPlanSpec

  @property
  def size(self) -> int:
    return int(len(self.clients))


def make_group_outputs(model, test: FederatedDataset, width: int = 1) -> Callable:
  """Returns ``fn(stacked [n, ...]) -> (embeddings [N, D], logits [N, out])``: client c's model on its rows."""
  from fedjax_health.algorithms.personal_eval import padded_client_index
  rows, _ = padded_client_index(test)
  client = test.client_of_example()
  within = np.arange(test.num_examples) - test.offsets[client]
  arrays = {"x": jnp.asarray(test.x), "rows": jnp.asarray(rows), "client": jnp.asarray(client),
            "within": jnp.asarray(within)}

  @jax.jit
  def fn(stacked, a):
    emb, logits = client_lib.map_clients(lambda pr: model.embed_and_logits(pr[0], jnp.take(a["x"], pr[1], axis=0)),
                                         (stacked, a["rows"]), width)
    return emb[a["client"], a["within"]], logits[a["client"], a["within"]]

  return lambda stacked: fn(stacked, arrays)


def merge_evaluation(groups: Sequence[Group], outputs: Sequence[dict], num_clients: int, num_classes: int,
                     extra_correct: Sequence[str] = ()) -> dict:
  """Returns per-client metrics over all groups from each group's per-example outputs.

  ``outputs[g]`` holds ``loss``, ``correct``, ``score`` (``personal_eval.example_outputs``) and any
  ``extra_correct`` keys (e.g. ``proto_correct``) for group g's test rows in its own client order.
  Metrics as ``metrics.summarize`` (mean, worst, worst-10% client accuracy, pooled accuracy, AUC),
  plus ``<g>_mean_client_accuracy`` / ``<g>_worst10_client_accuracy`` per group and the same
  statistics for each ``extra_correct`` key.
  """
  client = np.concatenate([g.clients[g.data.test.client_of_example()] for g in groups])
  y = np.concatenate([np.asarray(g.data.test.y) for g in groups])
  cat = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
  data = {"client": client.astype(np.int32), "y": y}
  out = metrics_lib.summarize(cat, data, num_clients, num_classes)
  per_client = np.asarray(out["per_client_accuracy"])
  counts = np.bincount(client, minlength=num_clients)
  for g in groups:
    acc = per_client[g.clients][counts[g.clients] > 0]
    if len(acc):
      out[f"{g.name}_mean_client_accuracy"] = float(np.mean(acc))
      out[f"{g.name}_worst10_client_accuracy"] = metrics_lib.worst_fraction_mean(acc, 0.1)
  for key in extra_correct:
    acc_c = (np.bincount(client, cat[key], minlength=num_clients) / np.maximum(counts, 1))[counts > 0]
    prefix = key.removesuffix("_correct")
    out[f"{prefix}_accuracy"] = float(np.mean(np.asarray(cat[key])))
    out[f"{prefix}_mean_client_accuracy"] = float(np.mean(acc_c))
    out[f"{prefix}_worst10_client_accuracy"] = metrics_lib.worst_fraction_mean(acc_c, 0.1)
  return out
