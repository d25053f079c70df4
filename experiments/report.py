"""Regenerates every registered table in README.md and docs/*.md from committed result files.

  python -m experiments.report            # rewrite the generated sections from docs/results, docs/perf_*.json
  python -m experiments.report --check    # exit 1 if any generated section differs (CI / tests)

A generated section sits between two markers in a Markdown file::

  <!-- BEGIN generated:NAME -->
  ...written by the renderer registered as NAME...
  <!-- END generated:NAME -->

Experiments register a renderer with ``register(name, render, sources)``: ``render() -> str`` reads
only small committed files (``sources``: JSON/CSV under docs/), never reruns anything. A marker
whose name nobody registered is an error, so a table cannot silently stop being generated.
``RENDERER_MODULES`` lists the modules that register (importing them must be cheap).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import os
import re
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

RENDERER_MODULES = ["experiments.heart_disease_table", "experiments.perf_tables", "benchmarks.stacked_seeds",
                    "benchmarks.sweep",
                    "experiments.security_report", "experiments.heterogeneity", "experiments.inversion_sweep",
                    "experiments.inversion_native", "experiments.privacy", "experiments.ftl",
                    "experiments.heterogeneity_models", "benchmarks.inversion_batched", "benchmarks.dp_streaming"]
_MARKER = re.compile(r"(<!-- BEGIN generated:([\w.-]+) -->\n)(.*?)(<!-- END generated:\2 -->)", re.S)


@dataclasses.dataclass(frozen=True)
class Renderer:
  render: Callable[[], str]
  sources: tuple[str, ...]


REGISTRY: dict[str, Renderer] = {}


def register(name: str, render: Callable[[], str], sources=()) -> None:
  """Registers ``render() -> markdown`` for the sections marked ``generated:name``."""
  REGISTRY[name] = Renderer(render, tuple(sources))


def provenance(command: str, **extra) -> dict:
  """Returns where a result file came from: UTC date, machine, jax version, git commit and ``command``."""
  import datetime
  import platform
  import subprocess
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
  except OSError:
    commit = ""
  try:
    import jax
    jax_version = jax.__version__
  except ImportError:
    jax_version = ""
  out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPU cores",
         "jax": jax_version, "commit": commit, "command": command.strip()}
  out.update(extra)
  return out


def write_json(path: str, doc) -> None:
  """Writes a small result file (indented JSON, final newline), creating its folder."""
  import json
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")


def shared_machine(load_before: float, load_after: float, machine: str) -> bool:
  """Whether a measurement's machine was shared: a load average above its core count (``machine`` as
  ``provenance`` writes it, "... N CPU cores"; 1 core when it does not say). The benchmark's own
  threads add up to about the core count, so a load below it says nothing else ran."""
  m = re.search(r"(\d+) CPU cores", machine or "")
  return max(load_before, load_after) > (int(m.group(1)) if m else 1)


def rounded(tree, digits: int = 4):
  """Returns ``tree`` (dicts/lists of floats) with floats rounded and NaN as None, for small JSON files."""
  if isinstance(tree, dict):
    return {k: rounded(v, digits) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [rounded(v, digits) for v in tree]
  if isinstance(tree, float):
    return None if tree != tree else tree if abs(tree) == float("inf") else round(tree, digits)
  return tree


def load_renderers() -> None:
  for module in RENDERER_MODULES:
    importlib.import_module(module)


def targets(root: str = ROOT) -> list[str]:
  return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def render_file(text: str, names=None, path: str = "") -> str:
  """Returns ``text`` with every generated section (of ``names``, default all) re-rendered."""

  def sub(m):
    name = m.group(2)
    if name not in REGISTRY:
      raise KeyError(f"{path}: section 'generated:{name}' has no registered renderer "
                     f"(known: {sorted(REGISTRY)}); add its module to experiments/report.py RENDERER_MODULES")
    if names is not None and name not in names:
      return m.group(0)
    body = REGISTRY[name].render().rstrip("\n") + "\n"
    return m.group(1) + body + m.group(4)

  return _MARKER.sub(sub, text)


def update_all(names=None, check: bool = False, root: str = ROOT) -> list[str]:
  """Re-renders the generated sections of README.md and docs/*.md; returns the files that changed
  (with ``check``, only reports them)."""
  load_renderers()
  changed = []
  for path in targets(root):
    with open(path) as f:
      text = f.read()
    new = render_file(text, names, os.path.relpath(path, root))
    if new != text:
      changed.append(os.path.relpath(path, root))
      if not check:
        with open(path, "w") as f:
          f.write(new)
  return changed


def sections(root: str = ROOT) -> dict[str, list[str]]:
  """Returns ``{file: [section names]}`` of every generated section found."""
  out = {}
  for path in targets(root):
    with open(path) as f:
      found = [m.group(2) for m in _MARKER.finditer(f.read())]
    if found:
      out[os.path.relpath(path, root)] = found
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--check", action="store_true", help="only report sections that are out of date (exit 1)")
  args = ap.parse_args()
  # Run as a script this file is __main__; renderers register into the importable module.
  from experiments import report as registry_module
  changed = registry_module.update_all(check=args.check)
  for path, names in registry_module.sections().items():
    print(f"{path}: {', '.join(names)}")
  if changed:
    print(("out of date: " if args.check else "rewrote: ") + ", ".join(changed))
    if args.check:
      sys.exit(1)


if __name__ == "__main__":
  main()
