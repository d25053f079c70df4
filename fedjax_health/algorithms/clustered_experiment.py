"""Wiring of clustered FL: ``config.clustering``, its checks, and the ``multicenter`` / ``ifca`` /
``cfl`` algorithms registered for the launcher (listed in ``fedjax_health/plugins.py``).

The methods themselves (the clustered round, IFCA's choice, CFL's split, evaluation) are pure
functions in ``fedjax_health.algorithms.clustered``, importable without the simulation or config
machinery.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fedjax_health import config_validation
from fedjax_health.aggregators import clustered as agg_clustered
from fedjax_health.algorithms import fedavg as fedavg_lib
from fedjax_health.algorithms.clustered import ALGORITHM_NAMES, cfl_split, clustered_round, make_cluster_evaluate
from fedjax_health.data.federated import FederatedData
from fedjax_health.simulation import Experiment, build_plan, register_algorithm


# ----------------------------------------------------------------------------------------------
# Config section, checks and builders.


def add_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds ``config.clustering`` with its defaults; returns ``config``."""
  config.clustering = ml_collections.ConfigDict(dict(
      num_clusters=4,  # K for multicenter / ifca; the most clusters CFL may create
      distance="l2",  # multicenter: l2 (squared Euclidean, Xie et al.) | cosine
      kmeans_iters=5,  # multicenter: Lloyd steps per round, warm-started from last round's centres
      kmeans_restarts=5,  # multicenter: K-means++ seedings tried in the first round (best objective kept)
      ifca_reseed_empty=True,  # ifca: reseed a cluster no client chose with the worst-fit client's model
      cfl_eps1=0.4,  # CFL: split when ||mean update|| < eps1 * max ||update_i|| ...
      cfl_eps2=0.0,  # ... and max ||update_i|| > eps2
      cfl_warmup_rounds=5,  # CFL: no split before this round
      cfl_min_size=2,  # CFL: smallest cluster (cohort clients) that may be split
  ))
  return config


@config_validation.register_check
def check_config(config, data=None) -> None:
  """Validates ``config.clustering`` for the clustered algorithms; K <= clients once data is known."""
  if config.algorithm not in ALGORITHM_NAMES:
    return
  require = config_validation.require
  require("clustering" in config, "clustering", "a section (clustered.add_config)", None)
  c = config.clustering
  require(isinstance(c.num_clusters, int) and c.num_clusters >= 1, "clustering.num_clusters", ">= 1", c.num_clusters)
  require(c.distance in agg_clustered.DISTANCES, "clustering.distance", f"one of {sorted(agg_clustered.DISTANCES)}",
          c.distance)
  require(c.kmeans_iters >= 1, "clustering.kmeans_iters", ">= 1", c.kmeans_iters)
  require(c.kmeans_restarts >= 1, "clustering.kmeans_restarts", ">= 1", c.kmeans_restarts)
  require(0.0 < c.cfl_eps1 <= 1.0, "clustering.cfl_eps1", "in (0, 1]", c.cfl_eps1)
  require(c.cfl_eps2 >= 0, "clustering.cfl_eps2", ">= 0", c.cfl_eps2)
  require(c.cfl_warmup_rounds >= 0, "clustering.cfl_warmup_rounds", ">= 0", c.cfl_warmup_rounds)
  require(c.cfl_min_size >= 2, "clustering.cfl_min_size", ">= 2", c.cfl_min_size)
  require(config.num_devices <= 1, "num_devices", f"<= 1 for {config.algorithm} (no sharded cohort map)",
          config.num_devices)
  if data is not None:
    require(c.num_clusters <= data.num_clients, "clustering.num_clusters",
            f"<= the number of clients ({data.num_clients})", c.num_clusters)


def build_clustered_experiment(config, data: FederatedData, model, name: str) -> Experiment:
  """Returns the ``multicenter``, ``ifca`` or ``cfl`` experiment configured by ``config``."""
  cc, c, s = config.clustering, config.client, config.server
  k = cc.num_clusters
  agg_clustered.check_num_clusters(k, data.num_clients)
  n = data.num_clients
  common = dict(num_clients=n, cohort_size=min(config.cohort_size or n, n),
                plan=build_plan(config, data.train.client_sizes),
                num_clusters=k, client_opt=fedavg_lib.client_optimizer(c.optimizer, c.learning_rate, c.momentum),
                server_opt=fedavg_lib.server_optimizer(s.optimizer, s.learning_rate, s.b1, s.b2, s.tau, s.momentum),
                clients_per_step=config.clients_per_step)
  key = jax.random.key(config.seed)
  same = jax.tree.map(lambda p: jnp.broadcast_to(p, (k,) + p.shape), model.init(key))
  if name == "multicenter":
    aggregator = agg_clustered.multicenter_kmeans(k, cc.distance, cc.kmeans_iters, cc.kmeans_restarts)
    init, round_fn = clustered_round(model, aggregator=aggregator, select="stored", **common)
    state = init(same)
  elif name == "ifca":
    init, round_fn = clustered_round(model, aggregator=agg_clustered.per_cluster_mean(k), select="min_loss",
                                     reseed_empty=cc.ifca_reseed_empty, **common)
    state = init(jax.vmap(model.init)(jax.random.split(key, k)))  # K different random starts
  elif name == "cfl":
    split = cfl_split(k, cc.cfl_eps1, cc.cfl_eps2, cc.cfl_warmup_rounds, cc.cfl_min_size)
    init, round_fn = clustered_round(model, aggregator=agg_clustered.per_cluster_mean(k), select="stored",
                                     split_fn=split, **common)
    state = init(same, num_active=1)
  else:
    raise ValueError(f"clustered algorithm must be one of {ALGORITHM_NAMES}, got {name!r}")
  evaluate = make_cluster_evaluate(model, data)

  def ev(st):
    out = evaluate(st.params, st.clients["cluster"], st.num_active)
    out["num_clusters"] = int(st.num_active)
    return out

  return Experiment(name, state, round_fn, fedavg_lib.device_train_data(data.train), ev)


@register_algorithm("multicenter")
@register_algorithm("ifca")
@register_algorithm("cfl")
def build_clustered(config, data, model):
  return [build_clustered_experiment(config, data, model, config.algorithm)]
