"""Runs one stage job in this process, then prints its peak RSS (for the memory benchmark).

    python -m benchmarks.subjob ingest --source m.csv --out out/images --image-size 300
    python -m benchmarks.subjob extract --images out/images --out out/features --weights none
    python -m benchmarks.subjob plan --source m.csv --out out/images --image-size 300
    python -m benchmarks.subjob train --features out/features/X --head gap_dense --out runs/x

The last stdout line is `BENCH_RUSAGE {"max_rss_mb": ...}`: the larger of this process's and
its reaped children's (Beam multi_processing workers) peak resident set size. `plan` does the
ingest launcher's work only (flags, source inspection, pipeline construction) and adds
`proto_bytes`, the size of the serialised pipeline a runner is sent, and `hwm_mb`, its own
peak RSS from /proc (see `_high_water_mb`).
"""
from __future__ import annotations

import json
import logging
import resource
import sys

STAGES = ("ingest", "extract", "plan", "train")


def _high_water_mb() -> float | None:
  """This process's own peak RSS (VmHWM), or None off Linux.

  Unlike ru_maxrss, which Linux carries across exec, it does not count the pages of the
  process that forked this one (a benchmark run holding GBs would inflate every child).
  """
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
  except (OSError, StopIteration):
    return None


def _cpu_seconds() -> float:
  """CPU seconds of this process and of its children waited for so far (an ingest's decoder
  processes are, once its pipeline has finished)."""
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                       resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str]) -> int:
  """Runs `ingest`, `extract`, `plan` or `train` with the remaining arguments; returns 0.

  Raises:
    ValueError: an unknown stage name.
  """
  if not argv or argv[0] not in STAGES:
    raise ValueError(f"first argument must be one of {STAGES}, got {argv[:1]!r}")
  logging.getLogger().setLevel(logging.WARNING)
  report = {}
  if argv[0] == "plan":
    from pipeline import run as ingest
    job = ingest.plan(argv[1:])
    report["proto_bytes"] = len(job.pipeline.to_runner_api().SerializeToString())
    report["hwm_mb"] = _high_water_mb()
  elif argv[0] == "ingest":
    from pipeline import run as ingest
    job = ingest.plan(argv[1:])
    planned = _cpu_seconds()
    summary = ingest.run_job(job)
    report.update(written=summary["written"], cpu_ms_per_image=summary.get("cpu_ms_per_image"),
                  fetch_decode_seconds=summary.get("fetch_decode_seconds"),
                  run_cpu_seconds=_cpu_seconds() - planned)
  elif argv[0] == "extract":
    from features import run as extract
    extract.run(argv[1:])
  else:
    from heads import run as heads_run
    heads_run.train_main(argv[1:])
    report["hwm_mb"] = _high_water_mb()
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  from benchmarks import measure
  print(measure.RUSAGE_MARKER + json.dumps({"max_rss_mb": max(own, children) / 1024,
                                            "self_mb": own / 1024, "children_mb": children / 1024,
                                            **report}))
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
