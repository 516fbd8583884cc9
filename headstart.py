"""The `headstart` console script: one subcommand per job, dispatched to the stage packages.

    headstart ingest --source data/sample/gender.csv --out out/images --image-size 96

Each subcommand is `module:function(argv) -> int`. Modules are imported only when their command
runs, so `headstart --help` does not pay for TensorFlow. A `ValueError` (bad flag value, missing
dataset, cache-key mismatch...) is printed as one line, without a traceback; set
`HEADSTART_DEBUG=1` to see the traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

# TensorFlow C++ start-up chatter (CUDA probing, oneDNN notes) hides our own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

COMMANDS = {
    "ingest": ("pipeline.run", "main", "stage 1: manifest/folder -> image TFRecords (Beam)"),
    "verify": ("pipeline.verify", "main", "check a dataset against its manifest"),
    "extract": ("features.run", "main", "stage 2: run frozen backbones once -> feature TFRecords (Beam)"),
    "weights": ("features.weights_cli", "main", "list or stage backbone weight files"),
    "train": ("heads.run", "train_main", "stage 3: train one head on cached features"),
    "predict": ("heads.run", "predict_main", "predict raw images with an exported run"),
    "finetune": ("heads.run", "finetune_main", "unfreeze the last backbone layers and continue"),
    "compare": ("heads.run", "compare_main", "every head x every backbone -> leaderboard"),
    "report": ("heads.run", "report_main", "plots and report.html for a run"),
    "reproduce": ("heads.run", "reproduce_main", "run a published experiment's config"),
}


def _usage() -> str:
  lines = ["usage: headstart COMMAND [options]   (headstart COMMAND --help for its options)", ""]
  lines += [f"  {name:<10} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """Runs one subcommand; returns its exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"headstart: error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2
  module_name, function_name, _ = COMMANDS[command]
  function = getattr(importlib.import_module(module_name), function_name)
  try:
    return int(function(rest) or 0)
  except ValueError as error:
    if os.environ.get("HEADSTART_DEBUG"):
      raise
    print(f"headstart {command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
