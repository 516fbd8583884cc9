"""The README's "Run on Dataflow" recipe, read as a user's shell would: every command's flags exist
(headstart's own or Beam 2.77's options), the recipe is consistent end to end (worker images that
exist, no --setup_file, weights staged for every backbone extracted, GPU workers that share one
model copy), and the extract command parses with the real parser.

    .venv/bin/python -m pytest tests/test_dataflow_recipe.py -q
"""
from __future__ import annotations

import contextlib
import io
import re
import subprocess

import pytest

import headstart
from features import run as extract
from tests.conftest import REPO_ROOT

# Shell stand-ins: `headstart` prints its argv (NUL-separated, one call per line); the cloud and
# Docker tools do nothing. Variables and word splitting are then exactly bash's.
_STUBS = """
headstart() { printf '%s\\0' "$@"; printf '\\n'; }
gcloud() { :; }
docker() { :; }
pip() { :; }
"""


def _recipe() -> str:
  text = (REPO_ROOT / "README.md").read_text()
  section = text.split("## Run on Dataflow", 1)[1].split("\n## ", 1)[0]
  return section


def _calls() -> list[list[str]]:
  blocks = re.findall(r"```bash\n(.*?)```", _recipe(), flags=re.S)
  script = _STUBS + "\n".join(blocks)
  out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                       check=True).stdout
  return [line.split("\0")[:-1] for line in out.splitlines() if line]


def _beam_flags() -> set[str]:
  from apache_beam.options import pipeline_options
  parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)  # what get_all_options uses
  pending = list(pipeline_options.PipelineOptions.__subclasses__())
  while pending:
    cls = pending.pop()
    pending += cls.__subclasses__()
    cls._add_argparse_args(parser)
  return {flag for action in parser._actions for flag in action.option_strings}


def _help(command: list[str]) -> str:
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
    headstart.main([*command, "--help"])
  return buffer.getvalue()


def test_every_flag_of_the_recipe_exists_in_headstart_or_beam():
  calls = _calls()
  assert [c[0] for c in calls] == ["ingest", "weights", "extract", "extract", "compare", "compare",
                                   "reproduce"]
  beam = _beam_flags()
  for call in calls:
    command = call[:2] if call[0] in ("weights", "features") else call[:1]
    own = set(re.findall(r"--[a-z][\w-]*", _help(command)))
    flags = {token.split("=", 1)[0] for token in call if token.startswith("--")}
    unknown = flags - own - beam
    assert not unknown, f"headstart {' '.join(command)}: {sorted(unknown)} exist nowhere"


def test_recipe_is_consistent_end_to_end():
  recipe, calls = _recipe(), _calls()
  assert not any("--setup_file" in call for call in calls)  # the worker images carry the package
  for path in re.findall(r"docker build -f (\S+)", recipe):
    assert (REPO_ROOT / path).is_file(), path
  dataflow = [c for c in calls if "DataflowRunner" in c]
  assert dataflow and all("--sdk_container_image" in c for c in dataflow)
  staged = set(calls[1][calls[1].index("--backbones") + 1].split(","))
  for call in (c for c in calls if c[0] == "extract"):
    assert set(call[call.index("--backbones") + 1].split(",")) <= staged
    assert call[call.index("--weights-dir") + 1] == calls[1][calls[1].index("--to") + 1]
  (gpu,) = [c for c in dataflow if c[0] == "extract"]
  options = gpu[gpu.index("--dataflow_service_options") + 1]
  assert options == "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
  assert gpu[gpu.index("--sdk_container_image") + 1].endswith("worker-gpu:0.1.0")
  config, beam_args = extract.parse_args(gpu[1:])
  assert config.share_models == "machine" and config.precision == "mixed_float16"
  assert "--runner" in beam_args and not config.estimate
  estimate_config, _ = extract.parse_args(next(c for c in calls if "--estimate" in c)[1:])
  assert estimate_config.estimate and estimate_config.price_per_hour > 0
