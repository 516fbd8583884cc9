"""The `headstart` console script: one subcommand per job, dispatched to its entry module.

    headstart ingest --source data/sample/gender.csv --out out/images --image-size 96
    headstart --verbose extract ...      # also show TensorFlow/absl/Beam logging

Each subcommand is `module:function(argv) -> int`, imported only when its command runs, so
`headstart --help` does not pay for TensorFlow. Logging is set up first (`headstart.logs`), before
any framework is imported. A `ValueError` (bad flag value, missing dataset, cache-key
mismatch...) is printed as one line naming the value and what is allowed, exit status 2;
`HEADSTART_DEBUG=1` shows the traceback instead.
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "ingest": ("pipeline.run", "main", "stage 1: manifest/folder -> image TFRecords (Beam)"),
    "verify": ("pipeline.verify", "main", "check a dataset against its manifest"),
    "extract": ("features.run", "main", "stage 2: run frozen backbones once -> feature TFRecords (Beam)"),
    "weights": ("features.weights_cli", "main", "list or stage backbone weight files"),
    "train": ("heads.run", "train_main", "stage 3: train one head on cached features"),
    "finetune": ("heads.run", "finetune_main", "unfreeze the last backbone layers and continue"),
    "compare": ("heads.run", "compare_main", "every head x every backbone -> leaderboard"),
    "report": ("heads.run", "report_main", "plots and report.html for a run"),
    "features": ("heads.run", "features_main", "export a feature dataset to .npy or Parquet"),
    "predict": ("headstart.predict", "main", "predict raw images (files or URLs) with a run"),
    "reproduce": ("headstart.reproduce", "main", "run a published experiment's config"),
}
VERBOSE_FLAG = "--verbose"


def _usage() -> str:
  lines = ["usage: headstart [--verbose] COMMAND [options]   (headstart COMMAND --help)", ""]
  lines += [f"  {name:<10} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """Runs one subcommand; returns its exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = VERBOSE_FLAG in argv
  argv = [arg for arg in argv if arg != VERBOSE_FLAG]
  if argv and argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  if not argv:
    print(f"headstart: error: give a command, one of {', '.join(COMMANDS)} (headstart --help)",
          file=sys.stderr)
    return 2
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"headstart: error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2
  from headstart import logs
  logs.setup(verbose=verbose)
  module_name, function_name, _ = COMMANDS[command]
  try:
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)
  except ValueError as error:
    if os.environ.get("HEADSTART_DEBUG"):
      raise
    message = " ".join(str(error).split())   # one line, whatever the message held
    print(f"headstart {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
