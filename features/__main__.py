"""`python -m features`: the same as `headstart extract` (stage 2).

    python -m features --images out/images --out out/features --backbones vgg16 --weights none
"""
from __future__ import annotations

import sys

from features import run

if __name__ == "__main__":
  sys.exit(run.main(sys.argv[1:]))
