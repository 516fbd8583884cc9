"""`python -m features`: the same as `headstart extract` (stage 2), one-line errors included.

    python -m features --images out/images --out out/features --backbones vgg16 --weights none
"""
from __future__ import annotations

import sys

# A package's __main__ is an entry point, part of the app layer (docs/ARCHITECTURE.md).
from headstart import cli

if __name__ == "__main__":
  sys.exit(cli.main(["extract", *sys.argv[1:]]))
