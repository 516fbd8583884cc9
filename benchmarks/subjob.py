"""Runs one stage job in this process, then prints its peak RSS (for the memory benchmark).

    python -m benchmarks.subjob ingest --source m.csv --out out/images --image-size 300
    python -m benchmarks.subjob extract --images out/images --out out/features --weights none

The last stdout line is `BENCH_RUSAGE {"max_rss_mb": ...}`: the larger of this process's and
its reaped children's (Beam multi_processing workers) peak resident set size.
"""
from __future__ import annotations

import json
import logging
import resource
import sys

STAGES = ("ingest", "extract")


def main(argv: list[str]) -> int:
  """Runs `ingest` or `extract` with the remaining arguments; returns 0.

  Raises:
    ValueError: an unknown stage name.
  """
  if not argv or argv[0] not in STAGES:
    raise ValueError(f"first argument must be one of {STAGES}, got {argv[:1]!r}")
  logging.getLogger().setLevel(logging.WARNING)
  if argv[0] == "ingest":
    from pipeline import run as stage
  else:
    from features import run as stage
  stage.run(argv[1:])
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  from benchmarks import measure
  print(measure.RUSAGE_MARKER + json.dumps({"max_rss_mb": max(own, children) / 1024,
                                            "self_mb": own / 1024, "children_mb": children / 1024}))
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
