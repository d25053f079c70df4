"""The default value of every config field; scenario files in ``configs/`` start from here."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns a ConfigDict with every core field set (FedAvg on Fed-Heart-Disease)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_seeds = 1  # > 1: seeds seed..seed+k-1 as one vmapped program (fedjax_health/stacked_seeds.py)
  # One hyperparameter's values (x num_seeds) as one vmapped program (fedjax_health/sweep.py), e.g.
  # --config.sweep.field=client.learning_rate --config.sweep.values="(0.01, 0.1)". "": no sweep.
  config.sweep = ml_collections.ConfigDict()
  config.sweep.field = ""
  config.sweep.values = ()
  config.mode = "train"  # train | modes registered by plugins (e.g. inversion)
  config.algorithm = "fedavg"  # fedavg | fedprox | fedopt | local | pooled (+ registered extensions)
  config.num_rounds = 15
  config.eval_every = 1
  config.checkpoint_every = 0  # rounds between orbax checkpoints in workdir/checkpoints; 0 = off
  config.resume = True  # resume from workdir's last checkpoint when one exists
  config.overwrite = False  # True: delete the outputs of an earlier run with another config in workdir
  config.on_divergence = "stop"  # non-finite params or train loss: "stop" (error naming the round) | "warn"
  config.divergence_loss_limit = 1e6  # a train loss above this counts as diverged too
  config.cohort_size = 0  # clients per round; 0 = all clients (cross-silo)
  config.clients_per_step = 1  # cohort-map width: 1 = lax.map/scan, cohort = full vmap
  config.map_unroll = 1  # unroll of the scan over client chunks (True: small CNN cohorts on CPU)
  config.num_devices = 0  # > 1: shard the cohort across that many devices ('clients' mesh axis)
  # FedAvg-family rounds: "auto" trains SGD clients of dense models as exact low-rank deltas with
  # shared-weight GEMMs when that is smaller (fedjax_health/lowrank.py); "lowrank" insists, "off" never.
  config.fast_path = "auto"
  config.lowrank_width = 0  # clients per low-rank chunk; 0 = sized to the cache (CPU) / memory (GPU)
  # FedAvg family on CPU: > 1 runs each round's client map as that many executions on as many host
  # threads (fedavg(host_threads=); one per core), which XLA's CPU client runs concurrently.
  config.host_threads = 1

  # Input.
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "heart_disease"
  # heart_disease: "pooled" z-scores with all sites' train statistics (one secure sum of first and
  # second moments in a real federation); "per_center" with each site's own; "none".
  config.dataset.normalize = "pooled"
  config.dataset.data_dir = ""  # heart_disease: folder of the UCI files ("" = shipped copy)
  config.dataset.path = ""  # medmnist: .npz file ("" = shipped copy)
  config.dataset.num_clients = 4  # medmnist / synthetic
  config.dataset.partition = "dirichlet"  # medmnist: dirichlet | iid | quantity | shards
  config.dataset.alpha = 0.5  # dirichlet concentration (medmnist) or Synthetic(alpha, .)
  config.dataset.beta = 1.0  # Synthetic(., beta)
  config.dataset.shards_per_client = 2
  config.dataset.partition_seed = 0
  config.dataset.samples_per_client = 0  # synthetic: fixed size; 0 = FedProx lognormal sizes
  config.dataset.size_sigma = 1.0  # synthetic, partition "quantity": lognormal sigma of the sizes (mean samples_per_client)
  config.dataset.iid = False
  config.dataset.num_clusters = 0

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.name = "logreg"

  # Client (local training).
  config.client = ml_collections.ConfigDict()
  config.client.optimizer = "sgd"
  config.client.learning_rate = 0.01
  config.client.momentum = 0.0
  config.client.batch_size = 4
  config.client.num_epochs = 0  # > 0: epochs per round; 0: fixed num_steps per round
  config.client.num_steps = 100
  config.client.prox_mu = 0.0  # FedProx
  # "pow2": each client trains only its own steps, in buckets of 1, 2, 4, ... steps (a round costs the
  # cohort's real steps); "none": every client padded to the largest (same results, slower on skew).
  config.client.step_buckets = "pow2"
  config.client.unroll = 1  # local-step scan unroll (our CNN's convolutions are fast in loops: models/conv.py)

  # Server (FedOpt: pseudo-gradient = -aggregate).
  config.server = ml_collections.ConfigDict()
  config.server.optimizer = "sgd"  # sgd with learning_rate 1 = FedAvg; adam | yogi | adagrad
  config.server.learning_rate = 1.0
  config.server.momentum = 0.0
  config.server.b1 = 0.9
  config.server.b2 = 0.999
  config.server.tau = 1e-8
  # adam | yogi | adagrad: "reddi" = Reddi et al.'s Algorithm 2 as FLamby runs it (no bias
  # correction, momentum b1 for adagrad too); "optax" = optax's bias-corrected adam/yogi, plain adagrad.
  config.server.form = "reddi"
  config.server.initial_accumulator = -1.0  # reddi form: v_{-1}; < 0 = tau^2 (the paper); FLamby: 0
  # Client weights in the aggregate: examples_used (McMahan et al.) | dataset_size (FLamby) | uniform.
  config.server.weighting = "examples_used"
  return config
