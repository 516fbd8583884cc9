"""Entry point: `python -m benchmarks [--quick] [--json OUT]` (see benchmarks/suite.py)."""
from __future__ import annotations

import sys

from benchmarks import suite

if __name__ == "__main__":
  sys.exit(suite.main(sys.argv[1:]))
