"""The command-line contract of every `headstart` command: a bad or missing argument is one line
on stderr naming the value and what is allowed, exit status 2, no traceback, no usage dump."""
from __future__ import annotations

import subprocess
import sys

import pytest

import headstart
from tests.conftest import REPO_ROOT

# One bad argument per command (and the commands that need a positional argument, given none).
BAD_FLAGS = {
    "ingest": (["--source", "x.csv", "--out", "o", "--image-size", "-3"], "'-3'"),
    "verify": ([], "data_dir"),
    "extract": (["--images", "i", "--out", "f", "--batch-size", "0"], "'0'"),
    "weights": (["list", "--input-size", "abc"], "'abc'"),
    "train": (["--features", "f", "--head", "nosuchhead", "--out", "r"], "'nosuchhead'"),
    "finetune": (["--model", "r", "--images", "i", "--unfreeze", "-1"], "'-1'"),
    "compare": (["--features", "f", "--heads", "linear", "--seeds", "0", "--out", "c"], "'0'"),
    "report": (["--run"], "--run"),
    "features": (["export", "d", "--out", "o", "--format", "csv"], "'csv'"),
    "predict": (["--model", "r", "--images", "i", "--batch-size", "-1"], "'-1'"),
    "reproduce": ([], "config"),
}


@pytest.mark.parametrize("command", sorted(BAD_FLAGS))
def test_every_command_gives_one_line_for_a_bad_flag(command, capsys):
  argv, named = BAD_FLAGS[command]
  assert headstart.main([command, *argv]) == 2
  captured = capsys.readouterr()
  lines = [line for line in captured.err.splitlines() if line.strip()]
  assert len(lines) == 1, captured.err
  assert lines[0].startswith(f"headstart {command}: error:") and named in lines[0]
  assert "Traceback" not in captured.err and "usage:" not in captured.err


def test_unknown_or_missing_command_is_one_line(capsys):
  assert headstart.main(["nosuch"]) == 2
  assert headstart.main([]) == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 2 and "'nosuch'" in lines[0] and "give a command" in lines[1]


def test_installed_script_bad_flag_is_one_line_without_noise():
  """Through a real process: TensorFlow/absl/Beam start-up output must not precede the line."""
  process = subprocess.run(
      [sys.executable, "-m", "headstart", "extract", "--images", "i", "--out", "f",
       "--batch-size", "0"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
  assert process.returncode == 2
  lines = [line for line in process.stderr.splitlines() if line.strip()]
  assert lines == [lines[0]] and "'0'" in lines[0], process.stderr
