import json

import numpy as np
import pytest

from configs import heart_disease_dp, heart_disease_fedavg
from fedjax_health import simulation
from fedjax_health import stacked_seeds
from fedjax_health import sweep

QUIET = lambda s: None


def _params(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_learning_rate_sweep_times_seeds_equals_separate_runs(tmp_path):
  config = heart_disease_fedavg.get_config("smoke")
  config.seed, config.num_seeds = 3, 2
  config.sweep.field, config.sweep.values = "client.learning_rate", (0.01, 0.05)
  summary = simulation.run(config, str(tmp_path / "sweep"), log=QUIET)
  key = "fedavg[client.learning_rate=0.05]"
  assert list(summary["experiments"]) == ["fedavg[client.learning_rate=0.01]", key]
  # The member (lr 0.05, seed 4): the last value and a seed other than config.seed, so a wrong
  # member order, a value not vmapped, or a wrong seed offset each changes it.
  single = heart_disease_fedavg.get_config("smoke")
  single.seed, single.client.learning_rate = 4, 0.05
  one = simulation.run(single, str(tmp_path / "one"), log=QUIET)
  for m in ("accuracy", "loss", "auc", "mean_client_accuracy"):
    np.testing.assert_allclose(summary["per_seed"][key][1][m], one["experiments"]["fedavg"][m], rtol=1e-5, atol=1e-6)
  a = _params(tmp_path / "sweep" / "final_params_fedavg_client.learning_rate=0.05_seed4.npz")
  b = _params(tmp_path / "one" / "final_params_fedavg.npz")
  for k in b:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
  accs = [m["accuracy"] for m in summary["per_seed"][key]]
  np.testing.assert_allclose(summary["experiments"][key]["accuracy"], np.mean(accs))
  assert summary["sweep"]["field"] == "client.learning_rate" and summary["sweep"]["values"] == [0.01, 0.05]
  best = max((summary["experiments"][f"fedavg[client.learning_rate={v:g}]"]["accuracy"],
              -summary["experiments"][f"fedavg[client.learning_rate={v:g}]"]["loss"], v) for v in (0.01, 0.05))[2]
  assert summary["sweep"]["best"] == best
  with open(tmp_path / "sweep" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert {r["experiment"] for r in rows} == {f"fedavg/client.learning_rate={v:g}/{s}" for v in (0.01, 0.05)
                                             for s in ("seed3", "seed4", "mean")}
  assert {r["client.learning_rate"] for r in rows} == {0.01, 0.05}
  # TensorBoard: one run per member, the same numbers as metrics.jsonl.
  ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  acc = ea.EventAccumulator(str(tmp_path / "sweep" / "tb" / "fedavg" / "client.learning_rate=0.05" / "seed4"))
  acc.Reload()
  member = [r for r in rows if r["experiment"] == "fedavg/client.learning_rate=0.05/seed4"]
  assert {e.step: e.value for e in acc.Scalars("accuracy")} == {r["round"]: np.float32(r["accuracy"]) for r in member}


@pytest.mark.parametrize("module,field,values,metrics", [
    # Each target epsilon is calibrated on the host and traced as its noise multiplier.
    (heart_disease_dp, "privacy.client.target_epsilon", (1.0, 8.0), ("epsilon_client", "noise_multiplier_client")),
    (heart_disease_dp, "privacy.client.clip_norm", (0.5, 2.0), ("epsilon_client",)),
])
def test_dp_sweep_member_equals_separate_run(tmp_path, module, field, values, metrics):
  config = module.get_config("smoke")
  config.seed = 1
  config.sweep.field, config.sweep.values = field, values
  summary = simulation.run(config, str(tmp_path / "sweep"), log=QUIET)
  v = values[-1]  # the last value: a sweep that ran every member with the first would fail
  single = module.get_config("smoke")
  single.seed = 1
  sweep.set_field(single, field, v)
  one = simulation.run(single, str(tmp_path / "one"), log=QUIET)["experiments"]["dp_fedavg"]
  got = summary["per_seed"][f"dp_fedavg[{field}={v:g}]"][0]
  for m in ("accuracy", "loss", "auc") + metrics:
    np.testing.assert_allclose(got[m], one[m], rtol=1e-5, atol=1e-6)
  first = summary["experiments"][f"dp_fedavg[{field}={values[0]:g}]"]
  assert first["loss"] != got["loss"]
  if "noise_multiplier_client" in metrics:
    assert first["noise_multiplier_client"] > got["noise_multiplier_client"] > 0  # smaller epsilon, more noise


def test_traced_config_sets_the_leaves_and_zeroes_a_swept_target_epsilon():
  config = heart_disease_dp.get_config("smoke")
  config.sweep.field = "privacy.client.target_epsilon"
  c = sweep.traced_config(config, {"privacy.client.noise_multiplier": "Z"})
  assert c.privacy.client.noise_multiplier == "Z" and c.privacy.client.target_epsilon == 0.0
  assert config.privacy.client.target_epsilon != 0.0  # the original is untouched
  members = sweep.member_configs(_with(config, values=(1.0, 3.0), num_seeds=2))
  assert [(lab, s) for lab, _, s, _ in members] == [
      ("privacy.client.target_epsilon=1", 0), ("privacy.client.target_epsilon=1", 1),
      ("privacy.client.target_epsilon=3", 0), ("privacy.client.target_epsilon=3", 1)]
  assert [c.privacy.client.target_epsilon for _, _, _, c in members] == [1.0, 1.0, 3.0, 3.0]


def _with(config, **fields):
  config.sweep["values"] = fields.pop("values", config.sweep["values"])
  for k, v in fields.items():
    config[k] = v
  return config


def test_sweep_summary_picks_the_best_value():
  config = heart_disease_fedavg.get_config("smoke")
  config.sweep.field, config.sweep.values = "server.learning_rate", (0.5, 1.0, 2.0)
  experiments = {f"fedavg[server.learning_rate={v:g}]": {"accuracy": a} for v, a in ((0.5, 0.7), (1.0, 0.8), (2.0, 0.6))}
  assert stacked_seeds.sweep_summary(config, experiments)["best"] == 1.0
  tied = {**experiments, "fedavg[server.learning_rate=2]": {"accuracy": 0.8, "loss": 0.1}}
  tied["fedavg[server.learning_rate=1]"] = {"accuracy": 0.8, "loss": 0.2}
  assert stacked_seeds.sweep_summary(config, tied)["best"] == 2.0  # equal accuracy: the lower loss wins
  by_loss = {k: {"loss": 1.0 - m["accuracy"]} for k, m in experiments.items()}
  s = stacked_seeds.sweep_summary(config, by_loss)
  assert s["by"] == "loss" and s["best"] == 1.0
  # A value with a diverged seed (non-finite loss) is never the best, whatever its accuracy.
  per_seed = {k: [{"loss": 0.3, **m}] for k, m in experiments.items()}
  per_seed["fedavg[server.learning_rate=1]"] = [{"loss": float("nan"), "accuracy": 0.8}]
  s = stacked_seeds.sweep_summary(config, experiments, per_seed)
  assert s["best"] == 0.5 and s["diverged"] == {"fedavg[server.learning_rate=1]": [0]}


@pytest.mark.parametrize("module,changes,message", [
    (heart_disease_fedavg, {"sweep.field": "client.batch_size", "sweep.values": (2.0, 4.0)},
     "config.sweep.field must be one of"),
    (heart_disease_fedavg, {"sweep.field": "client.learning_rate", "sweep.values": ()},
     "config.sweep.values must be a non-empty tuple of numbers"),
    (heart_disease_fedavg, {"sweep.field": "client.learning_rate", "sweep.values": (0.1, 0.0)},
     "config.sweep.values must be finite and > 0"),
    (heart_disease_fedavg, {"sweep.field": "client.learning_rate", "sweep.values": (0.1, 0.1)},
     "config.sweep.values must be free of repeated values"),
    (heart_disease_fedavg, {"sweep.field": "", "sweep.values": (0.1,)},
     "config.sweep.values must be empty when config.sweep.field is not set"),
    (heart_disease_fedavg, {"sweep.field": "privacy.client.noise_multiplier", "sweep.values": (1.0,)},
     "config.algorithm must be one of \\['dp_fedavg'\\]"),
    (heart_disease_dp, {"sweep.field": "privacy.client.noise_multiplier", "sweep.values": (1.0, 2.0)},
     "config.privacy.client.target_epsilon must be 0"),
    (heart_disease_fedavg, {"sweep.field": "client.learning_rate", "sweep.values": (0.1, 0.2),
                            "checkpoint_every": 1}, "config.checkpoint_every must be 0"),
])
def test_bad_sweeps_fail_naming_the_field(tmp_path, module, changes, message):
  config = module.get_config("smoke")
  for path, value in changes.items():
    sweep.set_field(config, path, value)
  with pytest.raises(ValueError, match=message):
    simulation.run(config, str(tmp_path), log=QUIET)
  assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything ran
