"""Dependencies fit a library: compatible ranges in setup.py, the tested exact set in
requirements/constraints.txt (what setup_env.sh, CI and the worker containers install), every
imported package declared and nothing declared that is not imported; the containers' requirement
set resolves against those pins.

    .venv/bin/python -m pytest tests/test_dependencies.py -q          # -m slow: resolve on PyPI
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import urllib.request

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT

CONSTRAINTS = REPO_ROOT / "requirements" / "constraints.txt"
DOCKERFILE = REPO_ROOT / "containers" / "gpu" / "Dockerfile"
# The image's two builds: GPU (the default) and CPU (`--build-arg TENSORFLOW=tensorflow`).
TENSORFLOW_BUILDS = ("tensorflow[and-cuda]", "tensorflow")
NOT_PACKAGES = {"tests", "benchmarks", "configs", "data", "docs", "containers", "requirements"}


def _setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
  """install_requires and extras_require, read from setup.py's literals (it cannot be imported)."""
  tree = ast.parse((REPO_ROOT / "setup.py").read_text())
  required, extras = None, None
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "REQUIRED_PACKAGES":
      required = ast.literal_eval(node.value)
    if isinstance(node, ast.keyword) and node.arg == "extras_require":
      extras = ast.literal_eval(node.value)
  return required, extras


def _pins() -> dict[str, str]:
  pins = {}
  for line in CONSTRAINTS.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, version = line.split("==")
      pins[canonicalize_name(name)] = version
  return pins


def _distribution_of(module: str, by_top: dict[str, list[str]]) -> str:
  """The distribution providing `module`; for a namespace like `google`, the one holding the
  sub-package (`google.protobuf` -> protobuf)."""
  candidates = by_top[module.split(".")[0]]
  if len(set(candidates)) == 1:
    return candidates[0]
  prefix = "/".join(module.split(".")[:2])
  for name in candidates:
    if any(str(f).startswith(prefix) for f in importlib.metadata.distribution(name).files or ()):
      return name
  raise AssertionError(f"no single distribution provides {module!r}: {candidates}")


def _imported_distributions() -> set[str]:
  """Distributions whose modules the installable code (every top-level package) imports."""
  roots = [p for p in REPO_ROOT.iterdir() if (p / "__init__.py").exists()
           and p.name not in NOT_PACKAGES]
  roots += [p for p in REPO_ROOT.glob("*.py") if p.name != "setup.py"]
  files = [f for root in roots for f in ([root] if root.is_file() else root.rglob("*.py"))]
  own = {root.stem for root in roots}
  modules = set()
  for path in files:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        modules |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        modules.add(node.module)
  third_party = {m for m in modules
                 if m.split(".")[0] not in own | set(sys.stdlib_module_names)}
  by_top = importlib.metadata.packages_distributions()
  missing = {m for m in third_party if m.split(".")[0] not in by_top}
  assert not missing, f"imported but not installed: {missing}"
  return {canonicalize_name(_distribution_of(m, by_top)) for m in third_party}


def test_every_imported_package_is_declared_and_nothing_else():
  required, _ = _setup_requirements()
  declared = {canonicalize_name(Requirement(r).name) for r in required}
  imported = _imported_distributions()
  assert imported - declared == set(), "imported but not in install_requires"
  assert declared - imported == set(), "declared but imported nowhere"


def test_setup_ranges_admit_the_tested_pins_which_are_what_is_installed():
  required, extras = _setup_requirements()
  pins = _pins()
  for text in [*required, *extras["test"], *extras["gcp"]]:
    requirement = Requirement(text)
    assert "==" not in str(requirement.specifier), f"{text}: a range, not an exact pin"
    assert requirement.specifier, f"{text}: no range at all"
    name = canonicalize_name(requirement.name)
    if name in pins:
      assert requirement.specifier.contains(pins[name]), f"{text} excludes the pin {pins[name]}"
    else:
      assert requirement.extras == {"gcp", "tfrecord"}, f"{text} is not in the tested set"
  for name, version in pins.items():
    assert importlib.metadata.version(name) == version, f"tested set pins {name}=={version}"


def test_setup_env_and_ci_install_from_the_constraints_and_reinstall_when_they_change():
  setup_env = (REPO_ROOT / "setup_env.sh").read_text()
  assert re.search(r'pip install .*--constraint "\$constraints"', setup_env)
  assert 'constraints="$root/requirements/constraints.txt"' in setup_env
  assert re.search(r'want=.*"\$root/setup.py" "\$constraints"', setup_env)  # in the stamp
  assert "./run_tests.sh" in (REPO_ROOT / ".ci" / "run").read_text()
  assert "source ./setup_env.sh" in (REPO_ROOT / "run_tests.sh").read_text()


def test_container_installs_the_tested_set_on_the_launching_beam_and_python():
  text = DOCKERFILE.read_text()
  pins = _pins()
  python = ".".join(sys.version.split(".")[:2])
  boot = re.findall(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", text)
  assert boot and all(found == (python, pins["apache-beam"]) for found in boot)
  assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text
  assert re.findall(r"^FROM python:(\d+\.\d+)", text, flags=re.M) == [python]
  installs = re.findall(r"pip install ([^\n\\]*)", text)
  assert installs and all("--constraint requirements/constraints.txt" in i for i in installs)
  # No version is repeated in the Dockerfile: every one comes from the constraints file.
  assert not re.search(r"pip install[^\n]*==", text)
  assert "COPY requirements/constraints.txt" in text and '".[gcp]"' in text
  # TensorFlow's CUDA build by default, at the pinned version.
  assert f'ARG TENSORFLOW="{TENSORFLOW_BUILDS[0]}"' in text and '"${TENSORFLOW}"' in text


def test_constraints_resolve_offline_against_the_installed_set():
  # The resolver, not a string comparison: headstart[test] with the tested pins, no index.
  result = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
       "--quiet", "--constraint", str(CONSTRAINTS), f"{REPO_ROOT}[test]"],
      capture_output=True, text=True, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-2000:]


def _pypi_reachable() -> bool:
  try:
    urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5).close()
    return True
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.parametrize("tensorflow", TENSORFLOW_BUILDS)
def test_container_requirement_set_resolves_on_pypi(tensorflow):
  if not _pypi_reachable():
    pytest.skip("PyPI is not reachable from here")
  requirements = []
  for install in re.findall(r"pip install --constraint requirements/constraints.txt ([^\n\\]*)",
                            DOCKERFILE.read_text()):
    requirements += [r.strip('"').replace("${TENSORFLOW}", tensorflow)
                     .replace(".[", f"{REPO_ROOT}[") for r in install.split()]
  result = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
       "--constraint", str(CONSTRAINTS), *requirements],
      capture_output=True, text=True, cwd=REPO_ROOT, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
