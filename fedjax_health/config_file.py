"""Checks of the launcher's command line before ml_collections loads the config file.

``--config=configs/<name>.py[:variant]`` and ``--config.<field>=<value>`` overrides are checked
here so that a missing file, a file without ``get_config``, a variant the file does not define
(``:smok``) or a misspelt override (``--config.client.learnign_rate``) fail with one sentence
naming the file, variant or field (and a suggestion), instead of a traceback from deep inside
config_flags, or, for a variant, silently running the full config.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys


class ConfigFileError(ValueError):
  """The --config file, its variant or a --config.<field> override is wrong."""


def config_arguments(argv: list[str]) -> tuple[str | None, list[str]]:
  """Returns (the --config value, the dotted fields overridden with --config.<field>)."""
  spec, fields = None, []
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg[len("--config="):]
    elif arg.startswith("--config."):
      fields.append(arg[len("--config."):].split("=", 1)[0])
  return spec, fields


def load_module(path: str):
  """Imports a config file; errors name it."""
  if not os.path.isfile(path):
    raise ConfigFileError(f"--config file not found: {path}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  sys.path.insert(0, root)  # configs import each other as configs.<name>
  try:
    spec = importlib.util.spec_from_file_location(f"_fedjax_health_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except Exception as e:
    raise ConfigFileError(f"--config file {path} cannot be imported: {type(e).__name__}: {e}") from e
  finally:
    sys.path.remove(root)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigFileError(f"--config file {path} defines no get_config() function; a config file must "
                          f"define get_config(arg='') returning an ml_collections.ConfigDict (see configs/)")
  return module


def known_variants(module, path: str) -> list[str]:
  """Returns the variants a config file names: ``VARIANTS`` if it sets it, else ``arg == "x"`` tests."""
  if hasattr(module, "VARIANTS"):
    return sorted(module.VARIANTS)
  with open(path) as f:
    source = f.read()
  found = set(re.findall(r"""\barg\s*==\s*["'](\w+)["']""", source))
  return sorted(found | {"smoke"})


def load_config(spec: str):
  """Returns the ConfigDict of ``path[:variant]``; an unknown variant is an error naming the file."""
  path, _, variant = spec.partition(":")
  module = load_module(path)
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except Exception as e:
    raise ConfigFileError(f"--config={spec}: get_config({variant!r}) failed: {type(e).__name__}: {e}") from e
  if variant and variant not in getattr(module, "VARIANTS", ()):
    default = module.get_config()
    if config.to_dict() == default.to_dict():
      known = known_variants(module, path)
      close = difflib.get_close_matches(variant, known, n=1)
      hint = f"; did you mean :{close[0]}?" if close else ""
      raise ConfigFileError(f"--config={spec}: {path} has no variant {variant!r} (get_config({variant!r}) "
                            f"returns the default config); known variants: {known}{hint}")
  return config


def all_fields(node, prefix: str = "") -> list[str]:
  out = []
  for key, value in node.items():
    out.append(prefix + key)
    if hasattr(value, "items"):
      out += all_fields(value, prefix + key + ".")
  return out


def check_command_line(argv: list[str]) -> None:
  """Raises ConfigFileError for a bad --config file/variant or an override of a field that does not exist."""
  spec, fields = config_arguments(argv)
  if not spec:
    return  # absl reports the missing required flag
  config = load_config(spec)
  known = all_fields(config)
  for field in fields:
    if field in known:
      continue
    close = difflib.get_close_matches(field, known, n=1, cutoff=0.7)
    hint = f"; did you mean --config.{close[0]}?" if close else ""
    parent = field.rpartition(".")[0]
    where = f"section config.{parent}" if parent in known else "the config"
    raise ConfigFileError(f"--config.{field}: {where} has no field {field.rpartition('.')[2]!r}{hint}")
