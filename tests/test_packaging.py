"""setup.py is also Dataflow's `--setup_file`: it must build an sdist with the three packages.

    .venv/bin/python -m pytest tests/test_packaging.py -q
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile

from tests.conftest import REPO_ROOT


def test_sdist_contains_every_layer_and_shipped_weights(tmp_path):
  source = tmp_path / "src"
  # Build from a copy: setuptools writes build/ and *.egg-info next to setup.py.
  shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
      ".venv", "out", "runs", ".git", "*.egg-info", "build", "__pycache__", "data"))
  subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
                 cwd=source, check=True, capture_output=True)
  (archive,) = (tmp_path / "dist").glob("headstart-*.tar.gz")
  names = {name.split("/", 1)[1] for name in tarfile.open(archive).getnames() if "/" in name}
  for required in ("headstart/cli.py", "setup.py", "contracts/schema.py", "pipeline/run.py",
                   "pipeline/transforms.py", "features/run.py", "heads/run.py",
                   "features/weights/mobilenet_1_0_224_imagenet_notop.weights.h5"):
    assert required in names, required
