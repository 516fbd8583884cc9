"""`python -m heads COMMAND ...`: the stage-3 commands of `headstart` (train, compare, report,
finetune, predict), one-line errors included.

    python -m heads train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head linear --out runs/x
"""
from __future__ import annotations

import sys

# A package's __main__ is an entry point, part of the app layer (docs/ARCHITECTURE.md).
from headstart import cli

_COMMANDS = ("train", "compare", "report", "finetune", "predict")

if __name__ == "__main__":
  if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
    print(f"python -m heads: error: give one of {', '.join(_COMMANDS)}", file=sys.stderr)
    sys.exit(2)
  sys.exit(cli.main(sys.argv[1:]))
