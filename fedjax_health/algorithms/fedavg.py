"""FedAvg, FedProx and FedOpt as one compiled round over the whole cohort.

FedAvg (McMahan et al. 2017): clients run local SGD from the global model; the server averages
their updates weighted by examples used. FedProx (Li et al. 2020) adds ``mu/2 ||w - w_t||^2`` to
the local loss. FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization"): the server treats
the negated aggregate as a pseudo-gradient for an optax optimiser (FedAdam, FedYogi, FedAdagrad);
server SGD with learning rate 1 is exactly FedAvg.

``round_fn(state, train, rng) -> (state, metrics)`` is a pure function of the server state, the
device-resident flat training data (``train = {"arrays", "offsets", "sizes"}``) and a PRNG key.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_health import client as client_lib
from fedjax_health import lowrank as lowrank_lib
from fedjax_health import metrics as metrics_lib
from fedjax_health import step_buckets
from fedjax_health.aggregators import base as agg_base
from fedjax_health.algorithms import fedopt as fedopt_lib
from fedjax_health.data.federated import BatchPlanSpec, make_batch_plan, sample_cohort
from fedjax_health.traced import is_traced

Params = Any


class ServerState(NamedTuple):
  params: Params
  opt_state: Any
  agg_state: Any
  round: jax.Array


def server_optimizer(name: str, learning_rate: float = 1.0, b1: float = 0.9, b2: float = 0.99,
                     tau: float = 1e-3, momentum: float = 0.0, form: str = "reddi",
                     initial_accumulator: float | None = None) -> optax.GradientTransformation:
  """Returns the server optimiser of FedOpt: ``sgd`` (lr 1 = FedAvg), ``adam``, ``yogi``, ``adagrad``.

  ``form="reddi"`` (default): Reddi et al.'s Algorithm 2 as FLamby runs it (``fedopt.reddi``: no
  bias correction, ``tau`` outside the square root, momentum ``b1`` for adagrad too, ``v``
  starting at ``initial_accumulator``, default tau^2). ``form="optax"``: optax's bias-corrected
  adam, yogi, and momentum-free adagrad (accumulator starting at tau^2).
  """
  if not is_traced(learning_rate) and learning_rate <= 0:
    raise ValueError(f"server learning_rate must be > 0, got {learning_rate}")
  if form not in ("reddi", "optax"):
    raise ValueError(f"server form must be 'reddi' or 'optax', got {form!r}")
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name in fedopt_lib.ADAPTIVE and form == "reddi":
    return fedopt_lib.reddi(name, learning_rate, b1, b2, tau, initial_accumulator)
  if name == "adam":
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=tau)
  if name == "yogi":
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=tau)
  if name == "adagrad":
    return optax.adagrad(learning_rate, initial_accumulator_value=tau ** 2, eps=tau)
  raise ValueError(f"server optimizer must be one of sgd, adam, yogi, adagrad; got {name!r}")


def client_optimizer(name: str, learning_rate: float, momentum: float = 0.0) -> optax.GradientTransformation:
  """Returns the local optimiser: ``sgd`` (optionally with momentum) or ``adam``."""
  if not is_traced(learning_rate) and learning_rate <= 0:
    raise ValueError(f"client learning_rate must be > 0, got {learning_rate}")
  if name == "sgd":
    return client_lib.sgd(learning_rate, momentum)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"client optimizer must be one of sgd, adam; got {name!r}")


@dataclasses.dataclass(frozen=True)
class FederatedAlgorithm:
  """``init(params) -> ServerState``; ``round_fn(state, train, rng) -> (state, metrics)``."""

  init: Callable[[Params], ServerState]
  round_fn: Callable[..., tuple[ServerState, dict]]
  trainer: client_lib.ClientTrainer
  plan: BatchPlanSpec
  cohort_size: int
  # "plain" (per-client weights), "lowrank" (lowrank.py) or "plain+lowrank" (short clients' step
  # buckets low-rank, long ones dense: see step_buckets.py)
  path: str = "plain"
  # Columns of the input Gram table the round reads when ``train`` has one (``device_train_data(ds,
  # gram_rows=...)``): the largest low-rank bucket's rows; 0 when no bucket can use it.
  gram_rows: int = 0
  # ``fedavg(host_threads=n)``, n > 1: the round as a Python function (not jittable as a whole) whose
  # client map runs as n executions dispatched from n host threads; None otherwise.
  host_round_fn: Callable[..., tuple[ServerState, dict]] | None = None


def default_client_ctx(cohort: jax.Array, round_idx: jax.Array, rng: jax.Array) -> dict:
  del round_idx, rng
  return {"client_id": cohort}


def fedavg(model, *, num_clients: int, cohort_size: int, plan: BatchPlanSpec,
           client_opt: optax.GradientTransformation, server_opt: optax.GradientTransformation | None = None,
           aggregator: agg_base.Aggregator | None = None, prox_mu: float = 0.0,
           clients_per_step: int = 1, mesh=None, grad_fn=None, projection=None, data_transform=None,
           client_ctx_fn: Callable = default_client_ctx, sampling_weights=None, unroll: int | bool = 1,
           map_unroll: int | bool = 1,
           plan_fn: Callable | None = None, fast_path: str = "auto",
           lowrank_width: int | None = None, weighting: str = "examples_used",
           first_layer_products: bool | None = None, densify_steps: int | None = None,
           narrow_divisors: tuple[int, ...] | None = None, host_threads: int = 1) -> FederatedAlgorithm:
  """Returns the FedAvg/FedProx/FedOpt algorithm for ``model``.

  Args:
    num_clients, cohort_size: population and clients per round (sampled without replacement,
      uniformly or proportionally to ``sampling_weights``).
    plan: local data plan (batch size, epochs or steps) from ``BatchPlanSpec.create``.
    client_opt, server_opt: local optimiser; server optimiser (default SGD lr 1 = FedAvg).
    aggregator: a stacked-update Aggregator (robust, clustered, DP, ...), or a
      ``StreamingAggregator`` (linear in the updates, e.g. ``dp.central_gaussian_streaming``).
      Default (None): FedAvg's weighted mean. Non-finite updates are rejected. Streaming forms are
      computed as a running sum over chunks of clients, never the ``[cohort, params]`` stack, so
      memory is bounded by the chunk (and they can take the low-rank path).
    prox_mu: FedProx's proximal coefficient (0 = FedAvg).
    clients_per_step: width of the cohort map (1 = scan, cohort = full vmap).
    mesh: optional ``'clients'`` mesh to shard the cohort across devices.
    grad_fn, projection, data_transform: client hooks (see ``client.py``).
    client_ctx_fn: ``(cohort, round, rng) -> per-client pytree [cohort, ...]`` passed to hooks and
      to the aggregator as ``ctx["client_ctx"]``.
    unroll: unroll of the local-step scan (True: fully; CNNs on CPU, see ``ClientTrainer``).
    map_unroll: unroll of the streaming map over client chunks (True for small conv cohorts on CPU).
    plan_fn: optional ``(rng, sizes[C]) -> (pos, mask)`` replacing ``make_batch_plan(rng, sizes, plan)``
      (e.g. Poisson-sampled batches for DP-SGD).
    fast_path: "auto" takes the exact low-rank path (``lowrank.py``: shared-weight GEMMs, no
      per-client weights) when it applies, per step bucket (``plan.step_buckets``) where its factors
      are small (``lowrank.suitable``), training longer clients dense (with plain SGD, no proximal
      term: in blocks of ``densify_steps`` steps, ``lowrank.local_train_densified``); "lowrank" requires it for
      every bucket (error naming what prevents it); "off" always trains dense copies.
    lowrank_width: clients per chunk on the low-rank path (default ``lowrank.chunk_width`` of each
      bucket's length: ~8 MB of factors on CPU, ~512 MB on accelerators).
    weighting: the server's client weights (``fedopt.aggregation_weights``): "examples_used"
      (McMahan et al.), "dataset_size" (FLamby) or "uniform"; 0 for a non-finite update.
    first_layer_products: on the low-rank path with the input Gram table (``device_train_data``),
      form the first layer's products ``x W`` for the table's rows with one GEMM per round and its
      kernel's weighted sum with one more (``lowrank.first_layer_products``, ``first_layer_delta``)
      instead of per chunk over the clients' padded batch slots. None: when ``cohort_size >=
      FIRST_LAYER_MIN_COHORT * num_clients`` (most rows train each round); True requires it (error
      naming what prevents it); False never. Results agree to float rounding.
    densify_steps: steps per densified block of the low-rank path's long plain-SGD clients
      (``lowrank.local_train_densified``); None: ``lowrank.DENSIFY_STEPS``; 0 trains them dense step
      by step (the same result to float rounding).
    narrow_divisors: the low-rank path's narrow one-step buckets keep ``ceil(batch / d)`` slots per
      divisor ``d`` (``narrow_batches``); None: ``NARROW_DIVISORS``; ``()`` builds none (every
      one-step client pays the whole batch; the same result to float rounding).
    host_threads: n > 1 also builds ``FederatedAlgorithm.host_round_fn``: the same round as three
      jitted stages (plan and first-layer products; the client map split into n parts, each bucket's
      clients dealt in turn, run as n executions from n host threads; the parts' sums, the kernel sum,
      aggregation and server step). On XLA's CPU backend one program runs its small ops on one core and
      independent loops one after the other, while executions dispatched from separate threads run at
      the same time (``benchmarks/host_threads.py``). Needs a streaming aggregator, no mesh, and a
      bucketed client map (several step buckets or the low-rank path). ``round_fn`` is unchanged;
      the two agree to float rounding. For CPU simulations: one thread per core. Memory: each part
      holds its own chunk working set and, with the round's first-layer products, its own ``[rows,
      d_out]`` buffer (at 10,000 skewed clients, 156 MB each: there it ran slower, 1.42x against 1.35x
      the limit; docs/performance.md).
  The client-map stage runs each client only for its own steps, bucketed by length
  (``step_buckets.py``; ``plan.step_buckets="none"``: padded to the longest); results are the same.
  """
  if weighting not in fedopt_lib.WEIGHTINGS:
    raise ValueError(f"weighting must be one of {fedopt_lib.WEIGHTINGS}, got {weighting!r}")
  if not 1 <= cohort_size <= num_clients:
    raise ValueError(f"cohort_size must be in [1, num_clients={num_clients}], got {cohort_size}")
  server_opt = server_opt or optax.sgd(1.0)
  streaming_agg = aggregator if isinstance(aggregator, agg_base.StreamingAggregator) else (
      agg_base.streaming_weighted_mean() if aggregator is None else None)
  streaming = streaming_agg is not None
  if streaming:
    aggregator = agg_base.Aggregator(lambda params: (), None)
  custom_grad = grad_fn is not None
  if grad_fn is None:
    grad_fn = client_lib.make_grad_fn(model.example_losses,
                                      client_lib.prox_regularizer(prox_mu) if prox_mu > 0 else None)
  trainer = client_lib.ClientTrainer(grad_fn, client_opt, projection, data_transform, unroll)
  chain = lowrank_lib.dense_chain(model)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  use_lowrank = _use_lowrank(fast_path, chain, model, shapes, plan, streaming=streaming, custom_grad=custom_grad,
                             projection=projection, data_transform=data_transform, client_opt=client_opt)
  per_device = max(cohort_size // (mesh.shape[client_lib.CLIENTS_AXIS] if mesh is not None else 1), 1)
  if lowrank_width is not None and lowrank_width < 1:
    raise ValueError(f"lowrank_width must be >= 1, got {lowrank_width}")
  if first_layer_products not in (None, True, False):
    raise ValueError(f"first_layer_products must be None, True or False, got {first_layer_products!r}")
  if narrow_divisors is None:
    narrow_divisors = NARROW_DIVISORS
  if not isinstance(narrow_divisors, (tuple, list)) or any(
      isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 2 for d in narrow_divisors):
    raise ValueError(f"narrow_divisors must be a tuple of ints >= 2 (() for no narrow buckets), got {narrow_divisors!r}")
  narrow_divisors = tuple(int(d) for d in narrow_divisors)
  if densify_steps is None:
    densify_steps = lowrank_lib.DENSIFY_STEPS
  if isinstance(densify_steps, bool) or not isinstance(densify_steps, (int, np.integer)) or densify_steps < 0:
    raise ValueError(f"densify_steps must be an int >= 0 (0: long clients step by step), got {densify_steps!r}")
  if isinstance(host_threads, bool) or not isinstance(host_threads, (int, np.integer)) or host_threads < 1:
    raise ValueError(f"host_threads must be an int >= 1 (1: the round is one program), got {host_threads!r}")
  host_threads = int(host_threads)

  def lowrank_at(length: int, batch: int, num_buckets: int = 1) -> int:
    """Chunk width of the low-rank path for clients of ``length`` steps (0: train them dense).

    With several step buckets the automatic width is capped at an eighth of a bucket's average
    share of the cohort: a bucket's last chunk is padded to the width, so a chunk far wider than the
    bucket's clients would pay for empty lanes. Measured on 1,000 lognormal clients (sigma 1, 6
    buckets, 2-core CPU): chunks of 10-20 clients ran the round in 244-246 ms, 41 in 259, 83 in 311.
    The cap stops at ``MIN_LOWRANK_CHUNK`` clients: on 100 such clients (cap 2) chunks of 8 ran the
    round ~10% faster than chunks of 2 in two A/Bs (2.62x vs 2.91x and 3.15x vs 3.50x the limit;
    batch-10 GEMMs of a few dozen rows use the cores poorly, ``benchmarks/small_gemm.py``); 16 was
    not consistently better, 32 was slower (3.11x).
    """
    if not use_lowrank or (fast_path == "auto" and not lowrank_lib.suitable(chain, shapes, length, batch)):
      return 0
    if lowrank_width:
      return lowrank_width
    w = lowrank_lib.chunk_width(chain, shapes, length, batch, per_device, jax.default_backend())
    return w if num_buckets == 1 else max(1, min(w, max(MIN_LOWRANK_CHUNK, per_device // (8 * num_buckets))))

  # Dense clients one at a time run their exact steps (a dynamic trip count; not with unrolled steps,
  # which CNNs on CPU need, nor wider cohort maps, which vmap them).
  dynamic_dense = (plan.step_buckets == "pow2" and clients_per_step == 1
                   and (unroll is False or (unroll is not True and unroll == 1)))
  lens = step_buckets.bucket_lengths(plan.num_steps, plan.step_buckets)
  paths = {"lowrank" if lowrank_at(n, plan.batch_size) else "plain" for n in lens}
  def bucket_examples(steps: int, slots: int) -> int:
    """The most examples a client of an epoch plan's bucket of ``steps x slots`` holds: it makes
    ``num_epochs`` passes, ``ceil(n * num_epochs / batch)`` steps (n * num_epochs <= steps * slots)."""
    return steps * slots // plan.num_epochs

  # A client in an epoch plan's bucket holds at most bucket_examples of it, so the Gram table covers
  # it; fixed-step and custom plans (plan_fn) put no such bound on a bucket's clients. With several
  # epochs the table is narrower and covers fewer clients (5 epochs of 50 examples: none of them, all
  # in the dense 25-step bucket, where the round-wide products would be formed for nobody).
  gram_rows = max([bucket_examples(n, plan.batch_size) for n in lens if lowrank_at(n, plan.batch_size, len(lens))]
                  if plan.num_epochs is not None and plan_fn is None and streaming else [], default=0)
  # The first layer's products once per round over the table's rows (device_train_data puts the
  # clients it covers first), when most of those rows train: see FIRST_LAYER_MIN_COHORT.
  product_blockers = [why for cond, why in [
      (gram_rows > 0, "the round has no low-rank bucket covered by the input Gram table (low-rank path, "
                      "epoch plan without plan_fn, streaming aggregator)"),
      (mesh is None, "a client mesh is set (shard_map rounds form the products per chunk)")] if not cond]
  if first_layer_products and product_blockers:
    raise ValueError("first_layer_products=True cannot be used: " + "; ".join(product_blockers))
  round_products = not product_blockers and (
      first_layer_products if first_layer_products is not None
      else cohort_size >= FIRST_LAYER_MIN_COHORT * num_clients)

  def init(params):
    return ServerState(params, server_opt.init(params), aggregator.init(params), jnp.zeros((), jnp.int32))

  def client_fn(shared, per_client, length=None):
    params, arrays = shared[:2]
    offset, pos, mask, key, ctx, _ = per_client
    num_keys = pos.shape[0]
    pos, mask = pos[:length], mask[:length]  # a step bucket: the client's steps past `length` are masked
    batch = client_lib.gather_client_batches(arrays, offset, pos)
    return client_lib.local_train(trainer, params, batch["x"], batch["y"], mask, key, ctx, num_keys=num_keys)

  # Long clients of plain local SGD on the low-rank path train in blocks of DENSIFY_STEPS steps, the
  # weights materialised once per block (lowrank.local_train_densified), not once per dense step.
  densify_steps = int(densify_steps) if use_lowrank and client_opt.momentum == 0 and prox_mu == 0 else 0

  def densified_client_fn(shared, per_client, length):
    params, arrays = shared[:2]
    offset, pos, mask = per_client[:3]
    k, (n, b) = densify_steps, pos.shape
    # The plan's steps padded (masked) to whole blocks; block i holds steps i*k .. i*k + k - 1.
    pos, mask = (jnp.pad(a, ((0, -n % k), (0, 0))).reshape(-1, k, b) for a in (pos, mask))

    def get_block(i):
      batch = client_lib.gather_client_batches(arrays, offset, pos[i])
      return batch["x"], batch["y"], mask[i]

    num_blocks = (jnp.minimum(length, n) + k - 1) // k
    return lowrank_lib.local_train_densified(chain, params, get_block, num_blocks,
                                             learning_rate=client_opt.learning_rate)

  def dynamic_client_fn(shared, per_client, length):
    if densify_steps:
      return densified_client_fn(shared, per_client, length)
    params, arrays = shared[:2]
    offset, pos, mask, key, ctx, _ = per_client

    def get_step(t):
      batch = client_lib.gather_client_batches(arrays, offset, pos[t])
      return batch["x"], batch["y"], mask[t]

    return client_lib.local_train_dynamic(trainer, params, get_step, length, pos.shape[0], key, ctx)

  def contribution_fn(shared, per_client, length=None, dynamic=False):
    delta, aux = (dynamic_client_fn if dynamic else client_fn)(shared, per_client, length)
    # One pass for the norm and finiteness (a NaN/inf anywhere, or a norm past float32's range, makes
    # the squared norm non-finite), one for the scaled contribution: on the dynamic path these passes
    # over the weights were a third of the round.
    sq_norm = client_lib.tree_sq_norm(delta)
    finite = jnp.isfinite(sq_norm)
    aux, norm, scale, stats = weigh(aux, sq_norm, finite, per_client[4], per_client[5])
    return (jax.tree.map(lambda d: jnp.where(finite, d * scale, 0.0), delta), stats), (aux, norm, finite)

  def dynamic_contribution_fn(shared, per_client, length):
    return contribution_fn(shared, per_client, length, dynamic=True)

  def weigh(aux, sq_norm, finite, ctx, size):
    """A client's weight (per ``weighting``, 0 if its update is not finite), norm and aggregation scale."""
    w = jnp.where(finite, fedopt_lib.aggregation_weights(weighting, aux["num_examples"], size), 0.0)
    norm = jnp.sqrt(jnp.where(finite, sq_norm, 0.0))
    scale, stats = streaming_agg.client_scale(norm, w, ctx)
    return dict(aux, num_examples=jnp.where(finite, aux["num_examples"], 0.0), weight=w), norm, scale, stats

  def uses_table(gram, steps: int, slots: int) -> bool:
    """Whether a low-rank bucket of ``steps x slots`` reads the input Gram table: every client of it
    fits in the table (``bucket_examples``)."""
    return gram is not None and bucket_examples(steps, slots) <= min(gram.shape[1], gram_rows)

  def lowrank_contribution_fn(shared, per_client, length=None, slots=None, num_steps=None):
    params, arrays, gram, products = shared
    offset, pos, mask, _, _, _ = per_client
    # A bucket's clients are masked past `length` steps and, in a narrow bucket, past `slots` slots.
    pos, mask = pos[:length, :slots], mask[:length, :slots]
    use_table = uses_table(gram, pos.shape[0], pos.shape[1])
    kw = dict(learning_rate=client_opt.learning_rate, momentum=client_opt.momentum, prox_mu=prox_mu,
              gram_x=lowrank_lib.slot_gram(gram, offset, pos) if use_table else None, num_steps=num_steps)
    if use_table and products is not None:
      # The first layer's x W from the round's products: no inputs gathered; the chunk scatters U
      # at the slots' rows (masked slots to a row past the buffer, dropped).
      idx = offset + pos
      xw = jnp.take(products, idx, axis=0, mode="clip")
      y = jnp.take(arrays["y"], idx, axis=0, mode="clip")
      factors, aux = lowrank_lib.local_train(chain, params, None, y, mask, xw=xw, **kw)
      extra = (jnp.where(mask, idx, products.shape[0]),)
    else:
      # The input Gram from the precomputed table where the bucket fits in it; else x @ x.T per client.
      batch = client_lib.gather_client_batches(arrays, offset, pos)
      factors, aux = lowrank_lib.local_train(chain, params, batch["x"], batch["y"], mask, **kw)
      extra = ()
    sq_norm = aux.pop("sq_norm")
    finite = jnp.isfinite(sq_norm) & client_lib.tree_all_finite(factors)
    aux, norm, scale, stats = weigh(aux, sq_norm, finite, per_client[4], per_client[5])
    return (factors, scale, finite, stats) + extra, (aux, norm, finite)

  def lowrank_scatter(buf, contrib, valid):
    """Adds a chunk's first-layer ``U`` (weighted) at its examples' rows; padded or rejected clients add nothing."""
    factors, scale, finite, _, rows = contrib
    keep = valid & finite
    rows = jnp.where(keep[:, None, None], rows, buf.shape[0])
    return lowrank_lib.scatter_first_layer(buf, rows, factors[0][1], jnp.where(keep, scale, 0.0))

  def lowrank_chunk_sum(contrib, valid):
    factors, scale, finite, stats = contrib[:4]
    scale = jnp.where(valid, scale, 0.0)
    # Zero weight does not cancel a NaN in a factor: only chunks holding a non-finite client pay
    # for selecting its factors away (the common all-finite chunk goes straight to the GEMMs).
    factors = jax.lax.cond(jnp.all(finite), lambda f: f,
                           lambda f: jax.tree.map(lambda a: jnp.where(
                               finite.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0), f), factors)
    total = lowrank_lib.weighted_sum(chain, factors, scale)
    first = chain.layers[0]
    if "kernel" not in total[first]:  # summed from the round's buffer (lowrank_scatter); XLA drops + 0
      total[first]["kernel"] = jnp.zeros(shapes[first]["kernel"].shape, shapes[first]["kernel"].dtype)
    return total, client_lib.masked_chunk_sum(stats, valid)

  def make_buckets(shared, num_steps: int, batch: int, stacked: bool):
    """The client-map stage's buckets: per static length, the low-rank or the dense client function.

    Dense clients trained one at a time (``clients_per_step=1``, local steps not unrolled) share one
    dynamic bucket: each runs exactly its own steps (``client.local_train_dynamic``) instead of
    its power-of-two bucket's length. On the low-rank path one-step clients also go to narrow
    buckets (``narrow_batches``) when their examples fit in part of the batch.
    """
    buckets = []
    lengths = step_buckets.bucket_lengths(num_steps, plan.step_buckets)
    for length in lengths:
      w = 0 if stacked else lowrank_at(length, batch, len(lengths))
      if w:
        # Buckets whose clients read the round's first-layer products scatter their U into its buffer.
        scatter = lambda n, nb: (lowrank_scatter if shared[3] is not None and uses_table(shared[2], n, nb)
                                 else None)
        for nb in narrow_batches(batch, narrow_divisors) if length == 1 else ():
          fn = lambda pc, nb=nb: lowrank_contribution_fn(shared, pc, 1, nb)
          # As many rows per chunk as the full bucket's (its clients times batch / nb), within the
          # factors' memory budget: at the full bucket's client count the GEMMs had fewer rows and
          # the narrow buckets saved less (a 25-repeat A/B, 4 runs: 0-3.4% against 2-4%).
          wn = max(lowrank_at(1, nb, len(lengths)), min(w * -(-batch // nb), lowrank_at(1, nb)))
          buckets.append(step_buckets.Bucket(1, fn, wn, lowrank_chunk_sum, batch=nb, scatter=scatter(1, nb)))
        # Rolled buckets stop after their chunk's longest client (clients ordered by length).
        rolled = length > lowrank_lib.MAX_STEPS
        fn = (lambda pc, steps, n=length: lowrank_contribution_fn(shared, pc, n, num_steps=steps)) if rolled else (
            lambda pc, n=length: lowrank_contribution_fn(shared, pc, n))
        buckets.append(step_buckets.Bucket(length, fn, w, lowrank_chunk_sum, scatter=scatter(length, batch),
                                           chunk_length=rolled))
      elif dynamic_dense:
        f = dynamic_client_fn if stacked else dynamic_contribution_fn
        buckets.append(step_buckets.Bucket(num_steps, lambda pc, n, f=f: f(shared, pc, n), dynamic=True))
        break  # every longer client goes to this bucket
      else:
        f = client_fn if stacked else contribution_fn
        buckets.append(step_buckets.Bucket(length, lambda pc, n=length, f=f: f(shared, pc, n), clients_per_step))
    return tuple(buckets)

  def client_map(shared, per_client, stacked: bool):
    """Returns (sum of contributions, per-client outputs), or the stacked (updates, aux) if ``stacked``."""
    num_steps, batch = per_client[2].shape[1], per_client[2].shape[2]
    if len(step_buckets.bucket_lengths(num_steps, plan.step_buckets)) == 1 and not use_lowrank:
      # One bucket (padded plan, or one step): the plain cohort map, which can unroll over chunks.
      if stacked:
        if mesh is None:
          return client_lib.map_clients(lambda pc: client_fn(shared, pc), per_client, clients_per_step)
        return client_lib.map_clients_sharded(client_fn, shared, per_client, clients_per_step, mesh)
      if mesh is None:
        return client_lib.map_sum_clients(lambda pc: contribution_fn(shared, pc), per_client, clients_per_step,
                                          unroll=map_unroll)
      return client_lib.map_sum_clients_sharded(contribution_fn, shared, per_client, clients_per_step, mesh,
                                                map_unroll)
    lengths = step_buckets.client_lengths(per_client[2])
    # Read only when make_buckets builds narrow buckets (low-rank one-step clients); one pass over the mask.
    widths = None if stacked else step_buckets.client_widths(per_client[2])
    if mesh is None:
      if stacked:
        return step_buckets.bucketed_map(make_buckets(shared, num_steps, batch, stacked), per_client, lengths)
      (sums, buf), small = client_map_part(shared, per_client)
      return add_first_layer_delta(sums, shared[1]["x"], [buf]), small
    return step_buckets.bucketed_map_sum_sharded(lambda sh: make_buckets(sh, num_steps, batch, stacked), shared,
                                                 per_client, lengths, mesh, stacked, widths)

  def client_map_part(shared, per_client, part: tuple[int, int] | None = None):
    """The bucketed streaming client map, or its part ``i`` of ``n`` (``host_threads``): (sums, the
    low-rank clients' first-layer U buffer or None), per-client outputs (zero outside the part:
    ``step_buckets.combine_parts`` adds the parts up). The buffer is not yet summed against the rows
    (``add_first_layer_delta``)."""
    num_steps, batch = per_client[2].shape[1], per_client[2].shape[2]
    buckets = make_buckets(shared, num_steps, batch, False)
    lengths, widths = step_buckets.client_lengths(per_client[2]), step_buckets.client_widths(per_client[2])
    products = shared[3]
    if products is None or not any(b.scatter for b in buckets):
      sums, small = step_buckets.bucketed_map_sum(buckets, per_client, lengths, widths=widths, part=part)
      return (sums, None), small
    ((total, stats), buf), small = step_buckets.bucketed_map_sum(
        buckets, per_client, lengths, widths=widths, extra=jnp.zeros_like(products), part=part)
    return ((total, stats), buf), small

  def add_first_layer_delta(sums, x, bufs):
    """``sums`` with the first layer's kernel sum added: the U buffers (None: none) against the rows."""
    bufs = [b for b in bufs if b is not None]
    if not bufs:
      return sums
    # The low-rank clients' first-layer U, scattered at their rows, then one GEMM against the rows.
    total, stats = sums
    first = chain.layers[0]
    delta = lowrank_lib.first_layer_delta(x, sum(bufs[1:], bufs[0]))
    return {**total, first: {**total[first], "kernel": total[first]["kernel"] + delta}}, stats

  def _streaming_aggregate(shared, per_client, rng):
    return _streaming_finish(client_map(shared, per_client, stacked=False), rng)

  def _streaming_finish(mapped, rng):
    (total, stats), (aux, norms, finite) = mapped
    agg, info = streaming_agg.finalize(total, stats, rng)
    return agg, aux, norms, dict(info, rejected=~finite, num_nonfinite=jnp.sum(~finite))

  def round_fn(state: ServerState, train: dict, rng: jax.Array):
    prep = prepare(state, train, rng)
    if streaming:
      agg, aux, norms, info = _streaming_aggregate(prep["shared"], prep["per_client"], prep["k_agg"])
      return finish(state, agg, aux, norms, info, state.agg_state, aux["weight"])
    updates, aux = client_map(prep["shared"], prep["per_client"], stacked=True)
    weights = fedopt_lib.aggregation_weights(weighting, aux["num_examples"], prep["sizes"])
    norms = agg_base.client_norms(updates)
    agg_ctx = {"params": state.params, "round": state.round, "client_ctx": prep["ctx"], "cohort": prep["cohort"]}
    agg, agg_state, info = aggregator.apply(updates, weights, state.agg_state, prep["k_agg"], agg_ctx)
    return finish(state, agg, aux, norms, info, agg_state, weights)

  def prepare(state: ServerState, train: dict, rng: jax.Array) -> dict:
    """The round up to its client map: cohort, batch plan, per-client inputs, Gram checks, products."""
    k_cohort, k_plan, k_clients, k_ctx, k_agg = jax.random.split(jax.random.fold_in(rng, state.round), 5)
    cohort = sample_cohort(k_cohort, num_clients, cohort_size, sampling_weights)
    if plan_fn is None:
      pos, mask = make_batch_plan(k_plan, train["sizes"][cohort], plan)
    else:
      pos, mask = plan_fn(k_plan, train["sizes"][cohort])
    ctx = client_ctx_fn(cohort, state.round, k_ctx)
    sizes = train["sizes"][cohort]
    per_client = (train["offsets"][cohort], pos, mask, jax.random.split(k_clients, cohort_size), ctx, sizes)
    gram = train.get("gram") if gram_rows else None
    rows = jax.tree.leaves(train["arrays"])[0].shape[0]
    if gram is not None:
      if gram.shape[0] > rows:
        raise ValueError(f"train['gram'] has {gram.shape[0]} rows, more than the arrays' {rows}: build it with "
                         "device_train_data from the same dataset")
      probe = train.get(GRAM_PROBE)
      if probe is None or jnp.ndim(probe) != 2 or jnp.shape(probe)[0] != 2 or not jnp.issubdtype(
          jnp.result_type(probe), jnp.integer):
        raise ValueError(f"train[{GRAM_PROBE!r}] must be device_train_data's [2, P] int rows and columns of "
                         f"the Gram table, got {None if probe is None else (jnp.shape(probe), jnp.result_type(probe))}"
                         ": build train['gram'] and it with device_train_data")
      # The fixed probe's diagonal entries and random entries of this round's clients.
      entries = _random_gram_entries(jax.random.fold_in(k_cohort, 1), gram, train["offsets"], train["sizes"], cohort)
      fixed = (probe[0], probe[1], probe[0], jnp.ones(probe.shape[1], bool))
      _check_gram_probe(gram, train["arrays"]["x"], *(jnp.concatenate(p) for p in zip(fixed, entries)))
    products = None
    # Only over inputs device_train_data found finite: a rejected client's zero rows of the U buffer
    # times an inf input would make the kernel's sum NaN (lowrank.first_layer_delta).
    if round_products and gram is not None and "x" in train["arrays"] and FINITE_TABLE_INPUTS in train:
      kernel = state.params[chain.layers[0]]["kernel"]
      # The products and the U buffer ([rows, d_out] each) within the inputs' memory or the budget.
      if 2 * gram.shape[0] * kernel.shape[1] * 4 <= max(GRAM_TABLE_BUDGET, gram.shape[0] * kernel.shape[0] * 4):
        products = lowrank_lib.first_layer_products(train["arrays"]["x"], kernel, gram.shape[0])
    return {"shared": (state.params, train["arrays"], gram, products), "per_client": per_client, "k_agg": k_agg,
            "sizes": sizes, "ctx": ctx, "cohort": cohort}

  def finish(state: ServerState, agg, aux, norms, info, agg_state, weights):
    """The round after its aggregate: server step and metrics."""
    pseudo_grad = jax.tree.map(jnp.negative, agg)
    server_updates, opt_state = server_opt.update(pseudo_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, server_updates)
    metrics = {
        **metrics_lib.cohort_train_loss(aux["loss"], weights, info.get("rejected")),
        "examples_used": jnp.sum(aux["num_examples"]),
        "mean_update_norm": jnp.mean(norms),
        "aggregate_norm": jnp.sqrt(client_lib.tree_sq_norm(agg)),
    }
    metrics.update({k: v for k, v in info.items() if jnp.ndim(v) == 0})
    if "rejected" in info:
      metrics["num_rejected"] = jnp.sum(info["rejected"])
    return ServerState(params, opt_state, agg_state, state.round + 1), metrics

  host_round_fn = None
  if host_threads > 1:
    blockers = [why for cond, why in [
        (streaming, "the aggregator is not streaming (a stacked aggregator needs every update at once)"),
        (mesh is None, "a client mesh is set (shard_map already splits the cohort)"),
        (len(lens) > 1 or use_lowrank, "the client map is one padded bucket (plan.step_buckets='none' or one "
                                       "step, no low-rank path)")] if not cond]
    if blockers:
      raise ValueError(f"host_threads={host_threads} cannot be used: " + "; ".join(blockers))
    host_round_fn = _host_round(host_threads, prepare, client_map_part, add_first_layer_delta, _streaming_finish,
                                finish)

  return FederatedAlgorithm(init, round_fn, trainer, plan, cohort_size, "+".join(sorted(paths, reverse=True)),
                            gram_rows, host_round_fn)


def _host_round(n: int, prepare: Callable, client_map_part: Callable, add_first_layer_delta: Callable,
                streaming_finish: Callable, finish: Callable) -> Callable:
  """``round_fn`` as three jitted stages, the middle one as ``n`` executions on ``n`` host threads."""
  import concurrent.futures

  uses_gram = []  # whether the round reads train["gram"] (known when the head is traced)

  def head(state, train, rng):
    prep = prepare(state, train, rng)
    uses_gram[:] = [prep["shared"][2] is not None]
    # Stages take params and train themselves: an input returned as an output is copied (the Gram
    # table, ~25 MB for 20,000 MNIST-sized rows).
    return {k: v for k, v in prep.items() if k != "shared"} | {"products": prep["shared"][3]}

  def shared_of(params, train, prep):
    return (params, train["arrays"], train["gram"] if uses_gram[0] else None, prep["products"])

  def part(i):
    return jax.jit(lambda params, train, prep: client_map_part(shared_of(params, train, prep), prep["per_client"],
                                                               (i, n)))

  def tail(state, train, prep, outs):
    sums = step_buckets.combine_parts([o[0][0] for o in outs])
    small = step_buckets.combine_parts([o[1] for o in outs])
    # The parts' buffers added, then one GEMM (over n row ranges as n executions on the threads it ran
    # no faster: a paired A/B, sigma 1, 1.359x against 1.357x the limit).
    sums = add_first_layer_delta(sums, train["arrays"]["x"], [o[0][1] for o in outs])
    agg, aux, norms, info = streaming_finish((sums, small), prep["k_agg"])
    return finish(state, agg, aux, norms, info, state.agg_state, aux["weight"])

  head_jit, tail_jit, parts = jax.jit(head), jax.jit(tail), [part(i) for i in range(n)]
  pool = []

  def host_round_fn(state: ServerState, train: dict, rng: jax.Array):
    if is_traced(state.round):
      raise ValueError("host_round_fn runs its stages on host threads: call it outside jit/vmap (round_fn is the "
                       "jittable round)")
    if not pool:
      pool.append(concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="fedjax_health_round"))
    prep = head_jit(state, train, rng)
    # Each thread waits for its own execution: XLA's CPU client runs executions dispatched from one
    # thread one after the other.
    outs = list(pool[0].map(lambda f: jax.block_until_ready(f(state.params, train, prep)), parts))
    return tail_jit(state, train, prep, outs)

  return host_round_fn


# One-step clients on the low-rank path holding at most batch/4 or batch/2 examples run in buckets that
# keep only that many slots (step_buckets.Bucket.batch), not the whole batch's masked slots.
NARROW_DIVISORS = (4, 2)


def narrow_batches(batch: int, divisors: tuple[int, ...] | None = None) -> tuple[int, ...]:
  """Returns the narrow one-step buckets' batch widths: ``ceil(batch / d)`` per divisor (default
  ``NARROW_DIVISORS``), increasing, distinct and below ``batch``."""
  return tuple(sorted({-(-batch // d) for d in (NARROW_DIVISORS if divisors is None else divisors)} - {batch}))


GRAM_TABLE_BUDGET = 256 << 20  # bytes of input Gram table always allowed (device_train_data)
MIN_LOWRANK_CHUNK = 8  # clients per low-rank chunk below which the several-bucket cap stops (lowrank_at)
# fedavg(first_layer_products=None) forms the first layer's products over the Gram table's rows once
# per round when the cohort holds at least this share of the clients: per chunk, the products run over
# the cohort's share of those rows times ~1.4 (the padded slots of the sigma 1 and 1.5 populations).
# Measured (1,000 lognormal clients, sigma 1, 2-core CPU, 11 repeats, round-wide / per-chunk time):
# cohort 1,000: 0.90; 750: 0.99; 500: 1.06 (a script like ``benchmarks.first_layer --cohorts``).
FIRST_LAYER_MIN_COHORT = 0.75
# device_train_data's key saying the table's rows of x are finite (checked once): the round's
# first-layer products need it (fedavg(first_layer_products=...)); its presence is what counts.
FINITE_TABLE_INPUTS = "gram_inputs_finite"
# device_train_data's [2, P] rows and columns of the Gram table's diagonal entries <x_r, x_r> at P rows
# spread over it: every round compares them with its inputs (``_check_gram_probe``).
GRAM_PROBE = "gram_probe"
GRAM_PROBE_ROWS = 16


def _random_gram_entries(key: jax.Array, gram: jax.Array, offsets: jax.Array, sizes: jax.Array,
                         cohort: jax.Array, num: int | None = None):
  """Returns ``num`` (default ``GRAM_PROBE_ROWS``) random entries of the Gram table for ``_check_gram_probe``:
  rows, columns, the partner rows whose inner products they hold, and whether each is in the table.

  Each entry is a random pair of examples of a random client of the cohort: over rounds the checks
  reach every client the table covers and its off-diagonal entries, which the fixed probe
  (``GRAM_PROBE``) never reads (e.g. inputs changed after ``device_train_data`` for some clients only).
  """
  num = GRAM_PROBE_ROWS if num is None else num
  kc, ki, kj = jax.random.split(key, 3)
  c = cohort[jax.random.randint(kc, (num,), 0, cohort.shape[0])]
  n, start = sizes[c], offsets[c]
  valid = (n > 0) & (n <= gram.shape[1]) & (start >= 0) & (start + n <= gram.shape[0])
  i, j = (jnp.minimum(jnp.floor(jax.random.uniform(k, (num,)) * n), n - 1).astype(jnp.int32) for k in (ki, kj))
  rows, cols, partners = (jnp.where(valid, v, 0) for v in (start + i, j, start + j))
  return rows, cols, partners, valid


def _check_gram_probe(gram: jax.Array, x: jax.Array, rows: jax.Array, cols: jax.Array, partners: jax.Array,
                      valid: jax.Array) -> None:
  """Raises (when the round runs) if a probed entry ``gram[rows, cols]`` is not ``<x[rows], x[partners]>``:
  a table built from other inputs, or inputs changed after device_train_data (e.g. normalised), would
  otherwise give wrong corrections silently. Entries with ``valid`` False are skipped. Costs a few
  dozen rows' products per round (the fixed probe's diagonal entries and ``_random_gram_entries``)."""
  xr, xp = (jnp.take(x, r, axis=0).reshape(r.shape[0], -1).astype(jnp.float32) for r in (rows, partners))
  dots = jnp.sum(xr * xp, axis=1)
  scale = jnp.sqrt(jnp.sum(jnp.square(xr), axis=1) * jnp.sum(jnp.square(xp), axis=1))
  table = gram[rows, cols].astype(jnp.float32)
  both_finite = jnp.isfinite(dots) & jnp.isfinite(table) & jnp.isfinite(scale)
  off = valid & jnp.where(both_finite, jnp.abs(table - dots) > 1e-3 * scale + 1e-5,
                          jnp.isfinite(dots) != jnp.isfinite(table))

  def fail(off, rows, cols):
    if np.any(off):
      e = int(np.argmax(off))
      r, col = int(np.asarray(rows)[e]), int(np.asarray(cols)[e])
      raise ValueError(f"train['gram'] does not match train['arrays']['x'] at row {r}, column {col} (not the "
                       "inner product of the inputs it stands for): build train with device_train_data from the "
                       "inputs the round reads, after any change to them")

  # The host callback only where a probe is off (a callback every round cost ~2% of the sigma 1 round).
  jax.lax.cond(jnp.any(off), lambda: jax.debug.callback(fail, off, rows, cols), lambda: None)


def _use_lowrank(fast_path: str, chain, model, shapes, plan: BatchPlanSpec, **setting) -> bool:
  """Returns whether the round takes the low-rank path; "lowrank" raises naming what prevents it."""
  if fast_path not in ("auto", "lowrank", "off"):
    raise ValueError(f"fast_path must be one of auto, lowrank, off; got {fast_path!r}")
  if fast_path == "off":
    return False
  blockers = []
  if chain is None:
    blockers.append(f"model {model.name or type(model.module).__name__!r} is not a chain of dense layers")
  if not setting["streaming"]:
    blockers.append("a stacked aggregator is set (the low-rank path needs a StreamingAggregator)")
  if setting["custom_grad"]:
    blockers.append("a custom grad_fn is set")
  if setting["projection"] is not None or setting["data_transform"] is not None:
    blockers.append("a projection or data_transform hook is set")
  if not isinstance(setting["client_opt"], client_lib.SGD):
    blockers.append("the client optimiser is not client.sgd (config client.optimizer='sgd')")
  if fast_path == "lowrank":
    if blockers:
      raise ValueError("fast_path='lowrank' cannot be used: " + "; ".join(blockers))
    return True
  if blockers:
    return False
  # Per step bucket, the round then trains short clients low-rank and long ones dense (``lowrank_at``).
  return lowrank_lib.suitable(chain, shapes, 1, plan.batch_size)


def device_train_data(dataset, gram_rows: int = 0) -> dict:
  """Returns the device pytree ``{"arrays", "offsets", "sizes"}`` that ``round_fn`` reads.

  ``gram_rows > 0`` (pass the algorithm's ``gram_rows``) adds ``"gram"``: ``lowrank.gram_table`` of
  ``x`` over clients of at most that many examples, computed once here so low-rank rounds look their
  input Gram matrices up instead of forming them every round (the same values up to float rounding).
  The clients the table covers (at most ``gram_rows`` examples) then come first in the arrays (each
  client's rows contiguous and in order, ``offsets`` following), so the table is ``[R, gram_rows]``
  for their R rows, and so are the round's first-layer products (``fedavg(first_layer_products=)``),
  which also need ``FINITE_TABLE_INPUTS`` (added when those rows' inputs are all finite). With the
  table comes ``GRAM_PROBE``: rounds check the table's diagonal at a few rows against the inputs they
  read and raise on a mismatch (inputs changed after this call, or a table from other inputs).
  The table is left out, and rounds form the products, when it would take more
  than ``GRAM_TABLE_BUDGET`` bytes and more than half the inputs' memory: few input features and
  wide hidden layers let the low-rank path take many rows per client (e.g. 4 inputs, 126 rows).
  """
  if isinstance(gram_rows, bool) or not isinstance(gram_rows, (int, np.integer)) or gram_rows < 0:
    raise ValueError(f"gram_rows must be an int >= 0, got {gram_rows!r}")
  arrays = dict(dataset.arrays)
  offsets = np.asarray(dataset.offsets)
  sizes = np.asarray(dataset.client_sizes)
  table = None
  if gram_rows:
    if "x" not in arrays:
      raise ValueError(f"gram_rows needs the inputs under arrays['x']; the dataset has {sorted(arrays)}")
    x = np.asarray(arrays["x"])
    small = sizes <= gram_rows
    table_bytes = int(np.sum(sizes[small])) * int(gram_rows) * max(x.dtype.itemsize, 4)
    if not np.any(sizes[small]):
      pass  # no example of a client the table would cover: rounds never read it
    elif table_bytes > max(GRAM_TABLE_BUDGET, x.nbytes / 2):
      logging.getLogger(__name__).info(
          "device_train_data: no input Gram table (%d MB for %d rows x %d; inputs %d MB): rounds form the products",
          table_bytes >> 20, int(np.sum(sizes[small])), gram_rows, x.nbytes >> 20)
    else:
      # The clients the table covers first (each client's rows stay contiguous and in order; offsets
      # follow), so the table and the round's first-layer products span rows [0, R) only.
      order = np.concatenate([np.flatnonzero(small), np.flatnonzero(~small)])
      starts = np.cumsum(sizes[order]) - sizes[order]
      if not np.array_equal(order, np.arange(len(sizes))):
        rows = np.repeat(offsets[:-1][order] - starts, sizes[order]) + np.arange(int(offsets[-1]))
        arrays = {k: np.asarray(v)[rows] for k, v in arrays.items()}
        offsets = np.append(np.zeros(len(sizes), np.int64), offsets[-1])
        offsets[order] = starts
      covered = int(np.sum(sizes[small]))
      bounds = np.append(0, np.cumsum(sizes[small]))  # the covered clients, now rows [0, covered)
      table = lowrank_lib.gram_table(np.asarray(arrays["x"])[:covered], bounds, int(gram_rows))
      finite = bool(np.all(np.isfinite(np.asarray(arrays["x"])[:covered])))
  out = {
      "arrays": {k: jnp.asarray(v) for k, v in arrays.items()},
      "offsets": jnp.asarray(offsets, jnp.int32),
      "sizes": jnp.asarray(sizes, jnp.int32),
  }
  if table is not None:
    out["gram"] = jnp.asarray(table)
    probe = np.unique(np.linspace(0, covered - 1, min(GRAM_PROBE_ROWS, covered)).astype(np.int64))
    out[GRAM_PROBE] = jnp.asarray(np.stack([probe, probe - bounds[np.searchsorted(bounds, probe, "right") - 1]]),
                                  jnp.int32)
    if finite:  # a key, so the round knows it when it traces
      out[FINITE_TABLE_INPUTS] = jnp.ones((), jnp.bool_)
  return out
