"""`python -m heads COMMAND ...`: the same commands as `headstart train|predict|finetune`.

    python -m heads train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head linear --out runs/x
"""
from __future__ import annotations

import sys

from heads import run

_COMMANDS = {"train": run.train_main, "predict": run.predict_main,
             "finetune": run.finetune_main}

if __name__ == "__main__":
  if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
    print(f"usage: python -m heads {{{','.join(_COMMANDS)}}} [options]", file=sys.stderr)
    sys.exit(2)
  try:
    sys.exit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
  except ValueError as error:
    print(f"heads {sys.argv[1]}: error: {error}", file=sys.stderr)
    sys.exit(2)
