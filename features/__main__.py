"""`python -m features`: the same as `headstart extract` (stage 2), one-line errors included.

    python -m features --images out/images --out out/features --backbones vgg16 --weights none
"""
from __future__ import annotations

import sys

import headstart

if __name__ == "__main__":
  sys.exit(headstart.main(["extract", *sys.argv[1:]]))
