"""Runs the code blocks of docs/research_api.md, in order, in one namespace."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_research_api_examples_run():
  with open(os.path.join(ROOT, "docs", "research_api.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) >= 5
  namespace = {"__name__": "research_api_doc"}
  for i, code in enumerate(blocks):
    exec(compile(code, f"docs/research_api.md[block {i}]", "exec"), namespace)  # pylint: disable=exec-used
