import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_health import client as client_lib
from fedjax_health import lowrank
from fedjax_health import models
from fedjax_health import step_buckets as sb
from fedjax_health.aggregators import robust
from fedjax_health.algorithms import fedavg as fa
from fedjax_health.data.federated import BatchPlanSpec, from_client_arrays, make_batch_plan

SIZES = (5, 10, 0, 3, 1, 4, 7, 8, 2, 0, 6, 9)  # ragged, two empty clients: 0..5 steps of batch 2 (buckets 1,2,4,5)


def test_bucket_lengths_and_client_lengths():
  assert sb.bucket_lengths(1) == (1,)
  assert sb.bucket_lengths(9) == (1, 2, 4, 8, 9)
  assert sb.bucket_lengths(8) == (1, 2, 4, 8)
  assert sb.bucket_lengths(9, "none") == (9,)
  with pytest.raises(ValueError, match="step_buckets"):
    sb.bucket_lengths(9, "pow3")
  mask = np.zeros((4, 5, 2), bool)
  mask[0, :3] = True
  mask[1, 4, 0] = True  # a gap: the length is the last active step + 1
  mask[3] = True
  np.testing.assert_array_equal(sb.client_lengths(jnp.asarray(mask)), [3, 5, 0, 5])


@pytest.mark.parametrize("width,tail", [(1, None), (3, None), (4, 1), (16, 2)])
def test_bucketed_map_sum_equals_python_loop(width, tail):
  """Each client runs once, in the shortest bucket that holds it, sums and cohort order kept."""
  rng = np.random.default_rng(0)
  lengths = jnp.asarray(rng.integers(0, 10, 13), jnp.int32)
  xs = {"v": jnp.asarray(rng.normal(size=(13, 9)), jnp.float32), "id": jnp.arange(13)}

  def make_fn(n):
    def fn(x):  # depends on the bucket length: the client must land in the right bucket
      return x["v"][:n].sum() * 0 + jnp.sum(x["v"][:n] ** 2), {"id": x["id"], "bucket": jnp.int32(n)}
    return fn

  buckets = tuple(sb.Bucket(n, make_fn(n), width, tail_width=tail) for n in sb.bucket_lengths(9))
  total, small = jax.jit(lambda x, l: sb.bucketed_map_sum(buckets, x, l))(xs, lengths)
  expect_bucket = [min(n for n in sb.bucket_lengths(9) if n >= max(int(l), 1)) for l in lengths]
  np.testing.assert_array_equal(small["id"], np.arange(13))
  np.testing.assert_array_equal(small["bucket"], expect_bucket)
  ref = sum(float(np.sum(np.asarray(xs["v"][c, :n]) ** 2)) for c, n in enumerate(expect_bucket))
  np.testing.assert_allclose(total, ref, rtol=1e-5)
  stacked = sb.bucketed_map(buckets, xs, lengths)
  np.testing.assert_array_equal(stacked[1]["id"], np.arange(13))


def test_dynamic_bucket_gets_each_clients_own_length():
  """A dynamic bucket runs its clients one at a time with their own length, not the bucket's."""
  rng = np.random.default_rng(1)
  lengths = jnp.asarray(rng.integers(0, 10, 13), jnp.int32)
  xs = {"v": jnp.asarray(rng.normal(size=(13, 9)), jnp.float32), "id": jnp.arange(13)}
  short = sb.Bucket(2, lambda x: (jnp.sum(x["v"][:2] ** 2), {"id": x["id"], "n": jnp.int32(2)}), 3)
  dyn = sb.Bucket(9, lambda x, n: (jnp.sum(jnp.where(jnp.arange(9) < n, x["v"], 0.0) ** 2), {"id": x["id"], "n": n}),
                  dynamic=True)
  total, small = jax.jit(lambda x, l: sb.bucketed_map_sum((short, dyn), x, l))(xs, lengths)
  lens = np.asarray(lengths)
  expect_n = np.where(lens <= 2, 2, lens)
  np.testing.assert_array_equal(small["id"], np.arange(13))
  np.testing.assert_array_equal(small["n"], expect_n)
  v = np.asarray(xs["v"])
  np.testing.assert_allclose(total, sum(float(np.sum(v[c, :n] ** 2)) for c, n in enumerate(expect_n)), rtol=1e-5)
  np.testing.assert_array_equal(sb.bucketed_map((short, dyn), xs, lengths)[1]["n"], expect_n)
  with pytest.raises(ValueError, match="one client at a time"):
    sb.bucketed_map_sum((dataclasses.replace(dyn, width=2),), xs, lengths)


def test_chunk_length_bucket_runs_its_chunks_longest_client():
  """A chunk_length bucket orders its clients longest first and calls each chunk with the longest
  valid client's length; sums and cohort order as a plain bucket's."""
  rng = np.random.default_rng(2)
  lengths = jnp.asarray(rng.integers(0, 10, 13), jnp.int32)
  xs = {"v": jnp.asarray(rng.normal(size=(13, 9)), jnp.float32), "id": jnp.arange(13), "len": lengths}
  short = sb.Bucket(2, lambda x: (jnp.sum(x["v"][:2] ** 2), {"id": x["id"], "n": jnp.int32(2)}), 3)
  # Steps past n are never run: the contribution is right only if n covers the client's own length.
  long = sb.Bucket(9, lambda x, n: (jnp.sum(jnp.where(jnp.arange(9) < jnp.minimum(n, x["len"]), x["v"], 0.0) ** 2),
                                    {"id": x["id"], "n": n}), 3, chunk_length=True)
  total, small = jax.jit(lambda x, l: sb.bucketed_map_sum((short, long), x, l))(xs, lengths)
  lens = np.asarray(lengths)
  in_long = np.flatnonzero(lens > 2)
  ranked = in_long[np.argsort(-lens[in_long], kind="stable")]  # longest first, ties in cohort order
  expect_n = np.full(13, 2)
  for start in range(0, len(ranked), 3):  # chunks of 3: each gets its first (longest) client's length
    expect_n[ranked[start:start + 3]] = lens[ranked[start]]
  np.testing.assert_array_equal(small["id"], np.arange(13))
  np.testing.assert_array_equal(small["n"], expect_n)
  assert len(set(expect_n[in_long])) > 1  # the chunks did not all run the bucket's length
  v = np.asarray(xs["v"])
  np.testing.assert_allclose(total, sum(float(np.sum(v[c, :n if n > 2 else 2] ** 2))
                                        for c, n in enumerate(lens)), rtol=1e-5)
  np.testing.assert_array_equal(sb.bucketed_map((short, long), xs, lengths)[1]["n"], expect_n)
  with pytest.raises(ValueError, match="either dynamic or chunk_length"):
    sb.bucketed_map_sum((dataclasses.replace(long, width=1, dynamic=True),), xs, lengths)


def _data(dim=6, seed=0):
  rng = np.random.default_rng(seed)
  return from_client_arrays([{"x": rng.normal(size=(n, dim)).astype(np.float32),
                              "y": rng.integers(0, 3, n).astype(np.int32)} for n in SIZES])


def _model(ds, hidden=(8,)):
  return models.get_model("mlp", 3, (ds.x.shape[1],), hidden=hidden)


def _rounds(ds, buckets, rounds=2, cohort=None, **kw):
  model = _model(ds, kw.pop("hidden", (8,)))
  plan = BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=kw.pop("epochs", 1), step_buckets=buckets)
  kw.setdefault("client_opt", client_lib.sgd(0.1, 0.5))
  gram = kw.pop("gram", False)
  alg = fa.fedavg(model, num_clients=ds.num_clients, cohort_size=cohort or ds.num_clients, plan=plan, **kw)
  state = alg.init(model.init(jax.random.key(0)))
  round_fn = jax.jit(alg.round_fn)
  train = fa.device_train_data(ds, alg.gram_rows if gram else 0)
  history = []
  for r in range(rounds):
    state, metrics = round_fn(state, train, jax.random.key(r))
    history.append(metrics)
  return alg, state, history


def _assert_same(a, b, atol=2e-6):
  (_, sa, ha), (_, sb_, hb) = a, b
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), sa.params, sb_.params)
  for ma, mb in zip(ha, hb):
    assert set(ma) == set(mb)
    for key in ma:
      np.testing.assert_allclose(ma[key], mb[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_round_equals_per_client_python_loop():
  """FedAvg with step buckets equals a per-client loop over each client's own steps only."""
  ds = _data()
  _, state, _ = _rounds(ds, "pow2", rounds=1, fast_path="off")
  model = _model(ds)
  params = model.init(jax.random.key(0))
  plan = BatchPlanSpec.create(ds.client_sizes, 2, num_epochs=1)
  _, k_plan, k_clients, _, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 5)
  pos, mask = make_batch_plan(k_plan, jnp.asarray(ds.client_sizes), plan)
  keys = jax.random.split(k_clients, ds.num_clients)
  trainer = client_lib.ClientTrainer(client_lib.make_grad_fn(model.example_losses), optax.sgd(0.1, momentum=0.5))
  total, weight = jax.tree.map(jnp.zeros_like, params), 0.0
  for c in range(ds.num_clients):
    n = -(-SIZES[c] // 2)  # 1 epoch, batch 2: this client's own steps
    if n == 0:
      continue
    xs = ds.x[ds.offsets[c] + np.asarray(pos[c, :n])]
    ys = ds.y[ds.offsets[c] + np.asarray(pos[c, :n])]
    delta, aux = client_lib.local_train(trainer, params, xs, ys, mask[c, :n], keys[c])
    total = jax.tree.map(lambda t, d: t + aux["num_examples"] * d, total, delta)
    weight += float(aux["num_examples"])
  expected = jax.tree.map(lambda p, t: p + t / weight, params, total)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), state.params, expected)


@pytest.mark.parametrize("kw", [dict(fast_path="off", clients_per_step=3, prox_mu=0.2),
                                dict(fast_path="off", aggregator=robust.coordinate_median())])
def test_buckets_equal_padded_plan(kw):
  ds = _data()
  _assert_same(_rounds(ds, "pow2", cohort=8, **kw), _rounds(ds, "none", cohort=8, **kw))


def test_dynamic_and_static_dense_buckets_equal_padded_plan():
  """Dense clients one at a time: exact trip counts ("pow2") and power-of-two buckets ("pow2_static")."""
  ds = _data()
  padded = _rounds(ds, "none", cohort=8, fast_path="off")
  _assert_same(_rounds(ds, "pow2", cohort=8, fast_path="off"), padded)
  _assert_same(_rounds(ds, "pow2_static", cohort=8, fast_path="off"), padded)


def test_lowrank_buckets_equal_plain_path_and_mix_paths():
  """Auto: short clients low-rank, long ones dense (the long buckets' factors outgrow the layer: a
  first layer of 3 units); with 8 units and 2 epochs the buckets up to 8 steps are low-rank, the
  8-step one rolled, its chunks stopping at their longest client."""
  ds = _data(dim=40)
  kw = dict(cohort=8, hidden=(3,))
  auto = _rounds(ds, "pow2", fast_path="auto", **kw)
  assert auto[0].path == "plain+lowrank"
  padded = _rounds(ds, "none", fast_path="off", **kw)
  _assert_same(auto, padded)
  # With the input Gram table: it covers the low-rank buckets only (short clients), not the dense ones.
  assert 0 < auto[0].gram_rows < auto[0].plan.num_steps * auto[0].plan.batch_size
  _assert_same(_rounds(ds, "pow2", fast_path="auto", gram=True, **kw), padded)
  _assert_same(_rounds(ds, "pow2", fast_path="lowrank", lowrank_width=3, **kw), padded)
  kw = dict(cohort=8, epochs=2)  # 8 units; the 8-step bucket holds clients of 5 to 8 steps
  auto = _rounds(ds, "pow2", fast_path="auto", **kw)
  assert auto[0].path == "plain+lowrank" and lowrank.suitable(
      lowrank.dense_chain(_model(ds)), jax.eval_shape(_model(ds).init, jax.random.key(0)), 8, 2)
  padded = _rounds(ds, "none", fast_path="off", **kw)
  _assert_same(auto, padded)
  _assert_same(_rounds(ds, "pow2", fast_path="auto", gram=True, lowrank_width=2, **kw), padded)


@pytest.mark.parametrize("poisson", [True, False])
def test_dp_sgd_buckets_equal_padded(poisson):
  """DP-SGD's per-step noise keys do not depend on how the plan is bucketed: Poisson batches
  (empty clients skip their steps) and epoch batches (truncated clients keep their keys)."""
  from fedjax_health.privacy import dp_sgd
  ds = _data()
  model = _model(ds)
  grad_fn = dp_sgd.dp_sgd_grad_fn(model.example_losses, 1.0, 0.8, 2.0, step_slot=poisson)
  base = dict(fast_path="off", grad_fn=grad_fn, client_opt=optax.sgd(0.1))
  if poisson:
    base["plan_fn"] = dp_sgd.poisson_batch_plan(0.4, 3, int(np.max(ds.client_sizes)))
  runs = [_rounds(ds, b, cohort=8, **base) for b in ("pow2", "none")]
  _assert_same(*runs)
  assert float(runs[0][2][-1]["aggregate_norm"]) > 0


def test_sharded_buckets_equal_single_device(require_host_devices, monkeypatch):
  require_host_devices(4)
  ds = _data()
  mesh = client_lib.make_client_mesh(4)
  for kw in (dict(fast_path="lowrank", lowrank_width=2), dict(fast_path="off", aggregator=robust.coordinate_median())):
    _assert_same(_rounds(ds, "pow2", cohort=8, mesh=mesh, **kw), _rounds(ds, "none", cohort=8, **kw))
  # Auto with plain SGD: short clients low-rank, long ones in densified blocks (lowrank.local_train_densified).
  ds, kw = _data(dim=40), dict(fast_path="auto", client_opt=client_lib.sgd(0.1), hidden=(3,))
  calls = []
  densified = lowrank.local_train_densified
  monkeypatch.setattr(lowrank, "local_train_densified", lambda *a, **k: calls.append(1) or densified(*a, **k))
  sharded = _rounds(ds, "pow2", cohort=8, mesh=mesh, **kw)
  assert sharded[0].path == "plain+lowrank" and calls
  _assert_same(sharded, _rounds(ds, "none", cohort=8, fast_path="off", client_opt=client_lib.sgd(0.1), hidden=(3,)))


def test_gather_clamps_rows_past_the_arrays():
  """An empty last client's masked slots point one row past the flat arrays (its offset is their
  length): the gather reads the last real row (which the mask drops) instead of a NaN fill."""
  arrays = {"x": jnp.arange(12.0).reshape(4, 3), "y": jnp.arange(4)}
  got = client_lib.gather_client_batches(arrays, jnp.int32(4), jnp.zeros((2, 2), jnp.int32))
  np.testing.assert_array_equal(got["x"], np.broadcast_to(np.arange(9.0, 12.0), (2, 2, 3)))
  np.testing.assert_array_equal(got["y"], np.full((2, 2), 3))


def test_empty_last_client_is_not_rejected_on_the_lowrank_path():
  """With the NaN fill the low-rank factors of an empty last client held NaN rows, and the round
  rejected it as non-finite; now it is skipped and the round equals the population without it."""
  rng = np.random.default_rng(0)
  clients = [{"x": rng.normal(size=(n, 6)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}
             for n in (3, 4, 0)]
  with_empty, without = from_client_arrays(clients), from_client_arrays(clients[:2])
  kw = dict(rounds=1, fast_path="lowrank", client_opt=client_lib.sgd(0.1))
  _, state_ref, _ = _rounds(without, "pow2", **kw)
  for gram in (False, True):  # the Gram table's lookup clamps the empty client's rows the same way
    _, state, (metrics,) = _rounds(with_empty, "pow2", gram=gram, **kw)
    assert int(metrics["num_nonfinite"]) == 0
    assert np.isfinite(float(metrics["train_loss"])), metrics
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params, state_ref.params)


def test_client_widths_and_narrow_buckets_take_the_clients_that_fit():
  """A client goes to the first bucket at least as long as it whose kept slots hold all its active
  slots (a gap counts: the width is the last active slot + 1), else to its length's full bucket."""
  rng = np.random.default_rng(2)
  mask = rng.random((17, 5, 6)) < 0.3
  mask[:10] = False  # client 0 empty; then (length, width): (1, 5) through a gap, (1, 2), (1, 3), ...
  mask[1, 0, 4] = mask[2, 0, :2] = mask[3, 0, :3] = mask[4, 0, 1] = mask[5, :2] = mask[9, 0, :4] = True
  mask[6, :3, :2] = mask[7, :3] = mask[8, 4, 0] = True  # (3, 2), (3, 6), (5, 1)
  lengths, widths = sb.client_lengths(jnp.asarray(mask)), sb.client_widths(jnp.asarray(mask))
  active = mask.any(axis=1)
  np.testing.assert_array_equal(widths, [max((i + 1 for i in range(6) if a[i]), default=0) for a in active])
  assert int(widths[1]) == 5 and int(lengths[1]) == 1
  xs = {"v": jnp.asarray(rng.normal(size=(17, 5, 6)), jnp.float32), "id": jnp.arange(17)}
  spec = ((1, 2), (1, 4), (1, None), (2, None), (4, 3), (4, None), (5, None))

  def make_fn(k, n, b):
    return lambda x: (jnp.sum(x["v"][:n, :b] ** 2), {"id": x["id"], "bucket": jnp.int32(k)})

  buckets = tuple(sb.Bucket(n, make_fn(k, n, b), 3, batch=b) for k, (n, b) in enumerate(spec))
  total, small = jax.jit(lambda x, l, w: sb.bucketed_map_sum(buckets, x, l, widths=w))(xs, lengths, widths)
  expect = [next(k for k, (n, b) in enumerate(spec) if n >= max(int(l), 1) and (b is None or int(w) <= b))
            for l, w in zip(lengths, widths)]
  np.testing.assert_array_equal(small["id"], np.arange(17))
  np.testing.assert_array_equal(small["bucket"], expect)
  assert expect[:10] == [0, 2, 0, 1, 0, 3, 4, 5, 6, 1]
  v = np.asarray(xs["v"])
  ref = sum(float(np.sum(v[c, :spec[k][0], :spec[k][1]] ** 2)) for c, k in enumerate(expect))
  np.testing.assert_allclose(total, ref, rtol=1e-5)
  np.testing.assert_array_equal(sb.bucketed_map(buckets, xs, lengths, widths=widths)[1]["bucket"], expect)


def test_narrow_bucket_misuse_is_refused():
  lengths = jnp.ones((3,), jnp.int32)
  xs = {"v": jnp.ones((3, 2))}
  fn = lambda x: (jnp.sum(x["v"]), ())
  with pytest.raises(ValueError, match="client_widths"):
    sb.bucketed_map_sum((sb.Bucket(1, fn, batch=1), sb.Bucket(1, fn)), xs, lengths)
  with pytest.raises(ValueError, match="last bucket must keep the whole batch"):
    sb.bucketed_map_sum((sb.Bucket(1, fn), sb.Bucket(2, fn, batch=1)), xs, lengths, widths=lengths)
  with pytest.raises(ValueError, match="increasing"):
    sb.bucketed_map_sum((sb.Bucket(1, fn), sb.Bucket(1, fn, batch=1), sb.Bucket(2, fn)), xs, lengths,
                        widths=lengths)
  with pytest.raises(ValueError, match="positive int"):
    sb.bucketed_map_sum((sb.Bucket(1, fn, batch=True), sb.Bucket(1, fn)), xs, lengths, widths=lengths)


def _record_buckets(monkeypatch):
  seen = []
  real = sb.bucketed_map_sum

  def spy(buckets, *args, **kw):
    seen.append([(b.length, b.batch) for b in buckets])
    return real(buckets, *args, **kw)

  monkeypatch.setattr(fa.step_buckets, "bucketed_map_sum", spy)
  return seen


def test_narrow_one_step_buckets_equal_padded_plan(monkeypatch):
  """Batch 8: one-step clients of <= 2 and <= 4 examples run in buckets keeping 2 and 4 slots (the
  low-rank path), with the same round as the padded plain path and as no narrow buckets."""
  rng = np.random.default_rng(3)
  sizes = (1, 2, 3, 4, 5, 8, 9, 0, 17, 2, 6, 30, 3, 1)
  ds = from_client_arrays([{"x": rng.normal(size=(n, 40)).astype(np.float32),
                            "y": rng.integers(0, 3, n).astype(np.int32)} for n in sizes])
  assert fa.narrow_batches(8) == (2, 4) and fa.narrow_batches(10) == (3, 5) and fa.narrow_batches(1) == ()

  def rounds(buckets, **kw):
    model = _model(ds)
    plan = BatchPlanSpec.create(ds.client_sizes, 8, num_epochs=1, step_buckets=buckets)
    alg = fa.fedavg(model, num_clients=ds.num_clients, cohort_size=10, plan=plan,
                    client_opt=client_lib.sgd(0.1, 0.5), **kw)
    state, step, out = alg.init(model.init(jax.random.key(0))), jax.jit(alg.round_fn), []
    train = fa.device_train_data(ds, alg.gram_rows)
    for r in range(2):
      state, metrics = step(state, train, jax.random.key(r))
      out.append(metrics)
    return alg, state, out

  seen = _record_buckets(monkeypatch)
  narrow = rounds("pow2", fast_path="lowrank", lowrank_width=3)
  assert seen and seen[0][:3] == [(1, 2), (1, 4), (1, None)], seen
  _assert_same(narrow, rounds("none", fast_path="off"))
  _assert_same(narrow, rounds("pow2", fast_path="lowrank", lowrank_width=3, narrow_divisors=()))
  assert seen[-1][0] == (1, None)
  for bad in ((1,), 4, (2.0,), (True,)):
    with pytest.raises(ValueError, match="narrow_divisors must be a tuple of ints >= 2"):
      rounds("pow2", fast_path="lowrank", narrow_divisors=bad)


def test_narrow_buckets_keep_clients_whose_slots_lie_past_them(monkeypatch):
  """A custom plan that puts a one-step client's examples in the batch's last slots: its width is the
  whole batch, so it trains in the full bucket and nothing is cut."""
  ds = from_client_arrays([{"x": np.random.default_rng(c).normal(size=(n, 40)).astype(np.float32),
                            "y": np.arange(n, dtype=np.int32) % 3} for c, n in enumerate((2, 3, 1, 7, 2))])

  def tail_plan(key, sizes):  # one step of batch 8; client c's examples in the last n_c slots
    slots = jnp.arange(8)[None, :]
    mask = slots >= 8 - sizes[:, None]
    pos = jnp.where(mask, slots - (8 - sizes[:, None]), 0)
    return pos[:, None, :].astype(jnp.int32), mask[:, None, :]

  def run(fast_path):
    model = _model(ds)
    plan = BatchPlanSpec.create(ds.client_sizes, 8, num_epochs=1)
    alg = fa.fedavg(model, num_clients=5, cohort_size=5, plan=plan, plan_fn=tail_plan, fast_path=fast_path,
                    client_opt=client_lib.sgd(0.1))
    state, metrics = jax.jit(alg.round_fn)(alg.init(model.init(jax.random.key(0))), fa.device_train_data(ds),
                                           jax.random.key(0))
    return alg, state, [metrics]

  seen = _record_buckets(monkeypatch)
  lowrank = run("lowrank")
  assert (1, 2) in seen[0]
  _assert_same(lowrank, run("off"))
