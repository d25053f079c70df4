"""Config docstrings state the values the config sets (model kind, DP clip norm and epsilon)."""

import ast
import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py"))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  with open(path) as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  return mod.get_config(""), " ".join(doc.split())


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_docstring_agrees_with_the_values(path):
  config, doc = _load(path)
  assert doc, "every config needs a module docstring"
  lower = doc.lower()
  model = config.model.name
  if "logistic regression" in lower:
    assert model == "logreg", f"docstring says logistic regression, config.model.name={model!r}"
  if "mlp" in lower and "logistic regression" not in lower and not re.search(r"\b(cnn|lenet)\b", lower):
    assert model == "mlp", f"docstring says MLP, config.model.name={model!r}"
  if "privacy" in config:
    p = config.privacy
    clip = p.client.clip_norm if p.client.mechanism != "none" else p.patient.clip_norm
    said = re.search(r"clip(?:ped|s its update)? to (?:l2 norm )?([0-9.]*[0-9])", lower)
    if said:
      assert float(said.group(1)) == clip, f"docstring says clip {said.group(1)}, the config clips at {clip}"
    eps = p.client.target_epsilon if p.client.mechanism != "none" else p.patient.target_epsilon
    said = re.search(r"epsilon = ([0-9.]*[0-9])", lower)
    if said:
      assert float(said.group(1)) == eps, f"docstring says epsilon {said.group(1)}, the config targets {eps}"
