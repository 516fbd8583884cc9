"""The layers import only downwards: headstart (app) -> heads -> features -> pipeline ->
contracts (docs/ARCHITECTURE.md). A module importing against the flow fails here, naming it."""
from __future__ import annotations

import ast
import pathlib

from tests.conftest import REPO_ROOT

# Rank of each layer: a module may import its own layer and lower ones only.
LAYERS = {"contracts": 0, "pipeline": 1, "features": 2, "heads": 3, "headstart": 4}
# Third-party packages a layer must not import at all: contracts stays Beam-free, so training a
# head (stage 3) never pays for Beam.
FORBIDDEN = {"contracts": ("apache_beam",), "heads": ("apache_beam",)}
# A package's __main__ is an entry point (`python -m pipeline` is `headstart ingest`), which
# belongs to the app layer wherever the file sits.
ENTRY_POINTS = ("__main__.py",)
# The one stage-3 module allowed Beam: it runs a compare grid's cells as Beam elements, and
# compare imports it only when Beam flags are given.
BEAM_EXCEPTIONS = ("heads/grid_beam.py",)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  found = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.append((node.lineno, node.module))
  return found


def violations(root: pathlib.Path = REPO_ROOT) -> list[str]:
  """Every import against the flow in the product packages, as `file:line imports module`."""
  problems = []
  for layer, rank in LAYERS.items():
    for path in sorted((root / layer).rglob("*.py")):
      if path.name in ENTRY_POINTS:
        continue
      for line, module in _imports(path):
        top = module.split(".")[0]
        relative = path.relative_to(root).as_posix()
        forbidden = top in FORBIDDEN.get(layer, ()) and relative not in BEAM_EXCEPTIONS
        if LAYERS.get(top, -1) > rank or forbidden:
          problems.append(f"{path.relative_to(root)}:{line} imports {module}")
  return problems


def test_no_module_imports_against_the_flow():
  assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path):
  for layer in LAYERS:
    (tmp_path / layer).mkdir()
  (tmp_path / "pipeline" / "bad.py").write_text("from heads import training\n")
  (tmp_path / "contracts" / "beam.py").write_text("def f():\n  import apache_beam\n")
  (tmp_path / "features" / "__main__.py").write_text("from headstart import cli\n")
  assert violations(tmp_path) == ["contracts/beam.py:2 imports apache_beam",
                                  "pipeline/bad.py:1 imports heads"]


def test_training_a_head_does_not_import_beam(tmp_path):
  """Through the real entry point in a fresh process (the check of issue 13's done-means)."""
  import subprocess
  import sys
  code = ("import sys, headstart; from heads import training, compare, report, reader; "
          "print('apache_beam' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO_ROOT, check=True, timeout=120).stdout.strip()
  assert out.splitlines()[-1] == "False"
