"""A sweep over one hyperparameter, times seeds, as one compiled program.

``--config.sweep.field=client.learning_rate --config.sweep.values="(0.01, 0.03, 0.1)"`` runs one
member per (value, seed) pair (``len(values) x num_seeds`` members) with ``jax.vmap`` over a leading
member axis of the server state, the round keys and the swept hyperparameter. Inside the vmapped
round the experiment is rebuilt from the config with the swept value as a traced scalar, so every
member runs the program a separate run with that value would run (tested equal to float rounding);
the k members cost one compile and one program instead of k.

Sweepable fields (``SWEEPABLE``) are the ones that enter the round only as arithmetic; those that
shape the program (batch size, epochs, cohort, model) cannot be traced and are refused:

* ``client.learning_rate``, ``server.learning_rate``: FedAvg-family and DP-FedAvg.
* ``privacy.client.noise_multiplier`` (with ``privacy.client.target_epsilon = 0``),
  ``privacy.client.target_epsilon`` (each value calibrated to its noise multiplier on the host, then
  traced as that multiplier): DP-FedAvg, central mechanism without SecAgg or adaptive clipping.
* ``privacy.patient.noise_multiplier`` (with ``privacy.patient.target_epsilon = 0``) and
  ``privacy.patient.target_epsilon``: DP-FedAvg with patient-level DP-SGD.
* ``privacy.client.clip_norm`` (central, as above) and ``privacy.patient.clip_norm`` (DP-SGD): the
  clip bound C (the noise std is z C; epsilon does not depend on C).

Outputs (``stacked_seeds.run_training``): ``metrics.jsonl`` rows per member
(``<name>/<field>=<value>/seed<s>``) and per value (``<name>/<field>=<value>/mean``, mean and sd over
seeds); ``summary.json`` with ``experiments`` keyed ``<name>[<field>=<value>]``, ``sweep`` (field,
values, the best value by final accuracy); learning curves with one band per value.
"""

from __future__ import annotations

import math

import ml_collections

from fedjax_health.config_validation import register_check, require

ALGORITHMS = ("fedavg", "fedprox", "fedopt", "local", "pooled", "dp_fedavg")
SWEEPABLE = {
    "client.learning_rate": ALGORITHMS,
    "server.learning_rate": ALGORITHMS,
    "privacy.client.noise_multiplier": ("dp_fedavg",),
    "privacy.client.clip_norm": ("dp_fedavg",),
    "privacy.patient.clip_norm": ("dp_fedavg",),
    "privacy.client.target_epsilon": ("dp_fedavg",),
    "privacy.patient.noise_multiplier": ("dp_fedavg",),
    "privacy.patient.target_epsilon": ("dp_fedavg",),
}


def active(config) -> bool:
  """Whether ``config`` asks for a sweep (``config.sweep.field`` set)."""
  return bool(config.get("sweep") and config.sweep.get("field"))


def get_field(config, path: str):
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def set_field(config, path: str, value) -> None:
  *parents, leaf = path.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def label(field: str, value: float) -> str:
  return f"{field}={value:g}"


@register_check
def check_sweep(config, data=None) -> None:
  """config.sweep: a sweepable field of this algorithm and a non-empty tuple of values."""
  del data
  if not config.get("sweep"):
    return
  field, values = config.sweep.get("field", ""), config.sweep.get("values", ())
  if not field:
    require(not values, "sweep.values", "empty when config.sweep.field is not set", values)
    return
  require(field in SWEEPABLE, "sweep.field", f"one of {sorted(SWEEPABLE)} (fields that only enter the round's "
          "arithmetic; a field that shapes the program cannot be swept in one program)", field)
  require(config.algorithm in SWEEPABLE[field], "algorithm", f"one of {list(SWEEPABLE[field])} to sweep "
          f"config.sweep.field={field!r}", config.algorithm)
  require(isinstance(values, (tuple, list)) and len(values) >= 1 and
          all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
          "sweep.values", f"a non-empty tuple of numbers for config.sweep.field={field!r}", values)
  require(len(set(values)) == len(values), "sweep.values", "free of repeated values", values)
  require(all(math.isfinite(v) and v > 0 for v in values), "sweep.values",
          f"finite and > 0 for {field} (a value of 0 or inf changes the program, not just a number in it)", values)
  why = f"config.sweep.field={field!r} (members stacked in one vmapped program)"
  require(config.get("mode", "train") == "train", "mode", f"'train' with {why}", config.get("mode"))
  require(config.checkpoint_every == 0, "checkpoint_every", f"0 with {why} (stacked runs are not checkpointed)",
          config.checkpoint_every)
  require(config.num_devices <= 1, "num_devices", f"0 or 1 with {why}", config.num_devices)
  if field.startswith("privacy."):
    level_name = field.split(".")[1]
    level = config.privacy[level_name]
    if level_name == "client":
      require(level.mechanism == "central", "privacy.client.mechanism", f"'central' with {why}", level.mechanism)
      require(not config.privacy.secagg.enabled, "privacy.secagg.enabled", f"False with {why}",
              config.privacy.secagg.enabled)
      require(not level.adaptive, "privacy.client.adaptive", f"False with {why}", level.adaptive)
    else:
      require(level.enabled, "privacy.patient.enabled", f"True with {why}", level.enabled)
    if field.endswith("noise_multiplier"):
      require(level.target_epsilon == 0, f"privacy.{level_name}.target_epsilon",
              f"0 with {why} (otherwise the noise multiplier is calibrated from it)", level.target_epsilon)


def member_configs(config) -> list[tuple[str, float | None, int, ml_collections.ConfigDict]]:
  """Returns ``(label, value, seed, config)`` per member: values outer, seeds inner.

  Without a sweep: one member per seed, label "". A ``target_epsilon`` value stays in the member's
  config (its run calibrates the noise multiplier as a separate run would).
  """
  seeds = [config.seed + i for i in range(config.get("num_seeds", 1))]
  field = config.sweep.field if active(config) else ""
  values = list(config.sweep["values"]) if field else [None]
  out = []
  for v in values:
    for s in seeds:
      c = ml_collections.ConfigDict(config.to_dict())
      c.seed = s
      if field:
        set_field(c, field, type(get_field(c, field))(v))
      out.append((label(field, v) if field else "", v, s, c))
  return out


def traced_leaves(member_config, data) -> dict[str, float]:
  """Returns ``{config path: value}`` of what the round reads for this member's swept field.

  A target epsilon is calibrated here to its noise multiplier (the value the round uses).
  """
  field = member_config.sweep.field
  if not field.endswith("target_epsilon"):
    return {field: float(get_field(member_config, field))}
  from fedjax_health.privacy import experiment as privacy_experiment
  level = field.split(".")[1]
  z = privacy_experiment.build_privacy(member_config, data)[f"{level}_noise"]
  return {f"privacy.{level}.noise_multiplier": float(z)}


def traced_config(config, leaves: dict):
  """Returns a copy of ``config`` (type checks off) with ``leaves`` (config path -> traced scalar) set.

  A swept target epsilon is set to 0 ("use the given noise multiplier"): its calibrated multiplier
  is among ``leaves``.
  """
  c = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  if active(config) and config.sweep.field.endswith("target_epsilon"):
    set_field(c, config.sweep.field, 0.0)
  for path, value in leaves.items():
    set_field(c, path, value)
  return c
