"""Checks of user input that ``check_core`` leaves open: numbers, misspelt fields, the loaded data.

Registered with ``config_validation.register_check`` (imported at the end of that module), so
``validate_config`` runs them before anything is compiled. Every error names the config field
(``config.server.b1 must be in [0, 1), got -0.5``) or, for data, the dataset and split.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers

import numpy as np

from fedjax_health.config_validation import CHECKS, register_check, require

# Sections of config_base.base_config() whose keys are known; a key there that is not a field but
# looks like one is a misspelling (``learnign_rate``). Other sections belong to plugins.
BASE_SECTIONS = ("", "dataset", "model", "client", "server")


def _is_number(v) -> bool:
  return isinstance(v, numbers.Number) and not isinstance(v, bool)


_ABSENT = object()


def _lookup(config, field: str):
  """``config.<field>``, or _ABSENT where a dataset-specific section (e.g. tfds) has no such field;
  check_structure has already required every field of the section's own defaults."""
  node = config
  for part in field.split("."):
    if not hasattr(node, "items") or part not in node:
      return _ABSENT
    node = node[part]
  return node


def _finite(config, field: str, allowed: str, cond) -> None:
  """Requires ``config.<field>`` to be a finite real number with ``cond(value)``."""
  node = _lookup(config, field)
  if node is _ABSENT:
    return
  ok = _is_number(node) and math.isfinite(float(node)) and cond(node)
  require(ok, field, f"a finite number {allowed}" if allowed else "a finite number", node)


def _int(config, field: str, allowed: str, cond) -> None:
  node = _lookup(config, field)
  if node is _ABSENT:
    return
  require(isinstance(node, numbers.Integral) and not isinstance(node, bool) and cond(node), field,
          f"an integer {allowed}", node)


def nan_fields(node, prefix: str = "") -> list[str]:
  """Returns the dotted names of every NaN number anywhere in the config (lists included)."""
  out = []
  for key, value in node.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      out += nan_fields(value, name + ".")
    elif isinstance(value, (list, tuple)):
      out += [f"{name}[{i}]" for i, v in enumerate(value) if isinstance(v, float) and math.isnan(v)]
    elif isinstance(value, float) and math.isnan(value):
      out.append(name)
  return out


def misspelt_fields(config) -> list[tuple[str, str]]:
  """Returns (field, suggestion) for keys of the base sections that are not fields but look like one."""
  from fedjax_health import config_base, models
  base = config_base.base_config()
  found = []
  for section in BASE_SECTIONS:
    node, known_node = (config, base) if not section else (config.get(section), base.get(section))
    if node is None or known_node is None or not hasattr(node, "items"):
      continue
    known = set(known_node.keys())
    if section == "dataset" and node.get("name") == "tfds":  # tfds fields beside base leftovers
      from fedjax_health.data import tfds_data
      known |= set(tfds_data.dataset_config().keys())
    if section == "model" and node.get("name") in models.MODELS:
      known |= set(inspect.signature(models.MODELS[node.name]).parameters) - {"num_classes", "input_shape", "kw"}
    for key in node.keys():
      if key in known:
        continue
      close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
      if close:
        prefix = f"{section}." if section else ""
        found.append((prefix + key, prefix + close[0]))
  return found


def check_structure(config, data=None) -> None:
  """Sections present, no misspelt field, no NaN anywhere (runs before every other check)."""
  del data
  from fedjax_health import config_base
  base = config_base.base_config()
  for section in ("dataset", "model", "client", "server"):
    require(section in config and hasattr(config[section], "items"), section,
            "a section (start the config from fedjax_health.config_base.base_config())", config.get(section))
    if section == "dataset" and config.dataset.get("name") == "tfds":
      continue  # the tfds section has its own fields, checked by data.tfds_data's registered check
    missing = sorted(set(base[section].keys()) - set(config[section].keys()))
    require(not missing, section, f"a section with every field of config_base.base_config() (missing: {missing})",
            "...")
  bad = misspelt_fields(config)
  if bad:
    field, guess = bad[0]
    raise ValueError(f"config.{field} is not a config field; did you mean config.{guess}?")
  nans = nan_fields(config)
  require(not nans, nans[0] if nans else "", "a number, not NaN", float("nan"))


CHECKS.insert(0, check_structure)  # the other checks read these sections


@register_check
def check_input(config, data=None) -> None:
  """Numbers finite and in range and, given ``data``, labels and features."""
  _int(config, "seed", ">= 0", lambda v: v >= 0)
  _int(config, "dataset.partition_seed", ">= 0", lambda v: v >= 0)
  _finite(config, "client.learning_rate", "> 0", lambda v: v > 0)
  _finite(config, "client.momentum", "in [0, 1)", lambda v: 0 <= v < 1)
  _finite(config, "client.prox_mu", ">= 0", lambda v: v >= 0)
  _finite(config, "server.learning_rate", "> 0", lambda v: v > 0)
  _finite(config, "server.momentum", "in [0, 1)", lambda v: 0 <= v < 1)
  _finite(config, "server.b1", "in [0, 1)", lambda v: 0 <= v < 1)
  _finite(config, "server.b2", "in [0, 1)", lambda v: 0 <= v < 1)
  _finite(config, "server.tau", "> 0", lambda v: v > 0)
  _finite(config, "dataset.alpha", ">= 0", lambda v: v >= 0)
  _finite(config, "dataset.beta", ">= 0", lambda v: v >= 0)
  _int(config, "dataset.num_clusters", ">= 0 (0: no planted clusters)", lambda v: v >= 0)
  _int(config, "dataset.shards_per_client", ">= 1", lambda v: v >= 1)
  _int(config, "client.batch_size", ">= 1", lambda v: v >= 1)
  _int(config, "client.num_steps", ">= 0", lambda v: v >= 0)
  _int(config, "client.num_epochs", ">= 0", lambda v: v >= 0)
  _int(config, "eval_every", ">= 1", lambda v: v >= 1)
  if config.dataset.name == "synthetic":
    _int(config, "dataset.samples_per_client",
         "0 (lognormal sizes) or >= 2 (each client keeps at least one train and one test example)",
         lambda v: v == 0 or v >= 2)
  require(config.get("on_divergence", "stop") in ("stop", "warn"), "on_divergence", "'stop' or 'warn'",
          config.get("on_divergence"))
  if "divergence_loss_limit" in config:
    require(_is_number(config.divergence_loss_limit) and config.divergence_loss_limit > 0, "divergence_loss_limit",
            "a number > 0 (inf: only non-finite values count)", config.divergence_loss_limit)
  require(isinstance(config.get("overwrite", False), bool), "overwrite", "True or False", config.get("overwrite"))
  _check_model(config)
  if data is not None:
    check_data(data, config)


def _check_model(config) -> None:
  m = config.model
  for key in ("hidden", "features"):
    if key in m:
      widths = tuple(m[key]) if isinstance(m[key], (list, tuple)) else (m[key],)
      require(all(isinstance(w, numbers.Integral) and w >= 1 for w in widths), f"model.{key}",
              "a sequence of layer widths >= 1", m[key])
  for key in ("dense", "width"):
    if key in m:
      _int(config, f"model.{key}", ">= 1", lambda v: v >= 1)


def check_data(data, config=None) -> None:
  """Raises ValueError naming the dataset and split if labels or features cannot be trained on."""
  src = ""
  if config is not None:
    path = config.dataset.get("path") or config.dataset.get("data_dir")
    src = f" (config.dataset.name={config.dataset.name!r}{', file ' + path if path else ''})"
  k = data.num_classes
  if not isinstance(k, numbers.Integral) or k < 2:
    raise ValueError(f"dataset{src} has num_classes={k!r}; need >= 2")
  shapes = {}
  for split, ds in (("train", data.train), ("test", data.test)):
    if "x" not in ds.arrays or "y" not in ds.arrays:
      raise ValueError(f"dataset{src}: the {split} split needs arrays 'x' and 'y', has {sorted(ds.arrays)}")
    x, y = np.asarray(ds.x), np.asarray(ds.y)
    if len(x) != len(y):
      raise ValueError(f"dataset{src}: {split} has {len(x)} inputs but {len(y)} labels")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"dataset{src}: {split} labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= k):
      bad = int(y[(y < 0) | (y >= k)][0])
      raise ValueError(f"dataset{src}: {split} labels must be class ids in [0, {k}), found {bad}")
    if np.issubdtype(x.dtype, np.floating) and x.size and not np.all(np.isfinite(x)):
      row = int(np.flatnonzero(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1))[0])
      raise ValueError(f"dataset{src}: {split} inputs hold NaN or inf values (first at example {row})")
    shapes[split] = x.shape[1:]
  if shapes["train"] != shapes["test"]:
    raise ValueError(f"dataset{src}: train inputs have shape {shapes['train']}, test inputs {shapes['test']}")
  if config is not None and config.model.name in ("cnn", "lenet") and len(shapes["train"]) != 3:
    raise ValueError(f"config.model.name={config.model.name!r} needs image inputs [height, width, channels]; "
                     f"dataset{src} has inputs of shape {shapes['train']}")
