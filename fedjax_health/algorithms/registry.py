"""Builders that turn a config into Experiments: FedAvg/FedProx/FedOpt and the two baselines.

* ``fedavg``: FedAvg, or FedProx when ``client.prox_mu > 0``, or FedOpt when ``server.optimizer``
  is adam/yogi/adagrad (``fedprox`` and ``fedopt`` are aliases kept for readable configs).
* ``local``: every site trains alone on its own data (one experiment per site), each model
  evaluated on every site's test split, as FLamby's "Local i" baselines.
* ``pooled``: one model trained on the union of all sites' train data (the centralised limit).
"""

from __future__ import annotations

import jax

from fedjax_health import client as client_lib
from fedjax_health import distributed
from fedjax_health import metrics as metrics_lib
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.simulation import Experiment, build_plan, make_global_evaluate, register_algorithm


def _mesh(config):
  """The 'clients' mesh: config.num_devices devices, or all processes' devices in a multi-process run."""
  if distributed.is_multiprocess():
    return client_lib.make_client_mesh(config.num_devices or None)
  return client_lib.make_client_mesh(config.num_devices) if config.num_devices > 1 else None


def build_fedavg_algorithm(config, train_ds, model, **overrides) -> fedavg_lib.FederatedAlgorithm:
  """Returns the FedAvg-family algorithm for ``train_ds`` configured by ``config``."""
  c, s = config.client, config.server
  n = train_ds.num_clients
  kwargs = dict(
      num_clients=n,
      cohort_size=min(config.cohort_size or n, n),
      plan=build_plan(config, train_ds.client_sizes),
      client_opt=fedavg_lib.client_optimizer(c.optimizer, c.learning_rate, c.momentum),
      server_opt=fedavg_lib.server_optimizer(s.optimizer, s.learning_rate, s.b1, s.b2, s.tau, s.momentum,
                                             form=s.get("form", "reddi"),
                                             initial_accumulator=_initial_accumulator(s)),
      weighting=s.get("weighting", "examples_used"),
      prox_mu=c.prox_mu,
      clients_per_step=config.clients_per_step,
      mesh=_mesh(config),
      unroll=config.client.get("unroll", 1),
      map_unroll=config.get("map_unroll", 1),
      fast_path=config.get("fast_path", "auto"),
      lowrank_width=config.get("lowrank_width", 0) or None,
  )
  kwargs.update(overrides)
  return fedavg_lib.fedavg(model, **kwargs)


def _initial_accumulator(server):
  """config.server.initial_accumulator: < 0 means the paper's tau^2 (None)."""
  v0 = server.get("initial_accumulator", -1.0)
  return None if v0 < 0 else v0


def comm_bytes(params, cohort_size: int) -> dict:
  """Returns FedAvg's bytes per participating client per round (a dense update up, the model down)."""
  b = metrics_lib.bytes_per_update(params)
  return {"bytes_up_per_client": float(b), "bytes_down_per_client": float(b),
          "bytes_up_per_round": float(b * cohort_size), "bytes_down_per_round": float(b * cohort_size)}


def _single(name, config, train_ds, model, evaluate) -> Experiment:
  alg = build_fedavg_algorithm(config, train_ds, model, host_threads=config.get("host_threads", 1))
  state = alg.init(model.init(jax.random.key(config.seed)))
  comm = comm_bytes(state.params, alg.cohort_size)

  def with_comm(fn):
    def round_fn(s, t, k):
      s, m = fn(s, t, k)
      return s, {**m, **{key: jax.numpy.asarray(v, jax.numpy.float32) for key, v in comm.items()}}
    return round_fn

  return Experiment(name, state, with_comm(alg.round_fn), fedavg_lib.device_train_data(train_ds, alg.gram_rows),
                    lambda st: {**evaluate(st.params), **comm}, round_path=alg.path,
                    host_round_fn=alg.host_round_fn and with_comm(alg.host_round_fn))


@register_algorithm("fedavg")
@register_algorithm("fedprox")
@register_algorithm("fedopt")
def build_fedavg(config, data, model):
  return [_single(config.algorithm, config, data.train, model, make_global_evaluate(model, data))]


@register_algorithm("local")
def build_local(config, data, model):
  evaluate = make_global_evaluate(model, data)
  names = data.train.client_ids or tuple(str(i) for i in range(data.num_clients))
  return [_single(f"local_{names[i]}", config, data.train.select_clients([i]), model, evaluate)
          for i in range(data.num_clients)]


@register_algorithm("pooled")
def build_pooled(config, data, model):
  return [_single("pooled", config, data.train.pooled(), model, make_global_evaluate(model, data))]
