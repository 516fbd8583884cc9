"""The ingest launcher at scale: its peak RSS and the size of the job it submits must not grow
with the number of rows (issue 16.2).

    python -m benchmarks          # the "DRIVER" lines

Method: for a folder tree of `tree_sizes` files and a CSV manifest of `csv_sizes` rows, a fresh
process (`benchmarks.subjob plan`) does everything `headstart ingest` does before the runner
takes over (parse the flags, inspect the source, build the Beam pipeline) and serialises the
pipeline to its runner-API proto, which is what a remote runner such as Dataflow is sent. The
pipeline is not run: what happens on the workers does not touch the launcher. Peak RSS is the
process's own high-water mark (VmHWM). The files are
1-byte stand-ins (nothing decodes them); the CSV's rows name files that need not exist. Flat
means the larger source grows the launcher's peak RSS and the proto by at most
`FLAT_TOLERANCE`. Before issue 16 the launcher listed a tree itself into a `beam.Create`,
which embedded every row in the proto (see benchmarks/README.md for the figures).
"""
from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from benchmarks import measure

FLAT_TOLERANCE = 0.10
_CLASSES = 10


def write_tree(root: pathlib.Path, count: int) -> pathlib.Path:
  """`count` 1-byte files in `_CLASSES` class folders under `root`."""
  for i in range(count):
    folder = root / f"class{i % _CLASSES}"
    if i < _CLASSES:
      folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i:07d}.jpg").write_bytes(b"\xff")
  return root


def write_csv(path: pathlib.Path, count: int) -> pathlib.Path:
  """A manifest of `count` rows (relative image paths, two labels)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    f.write("image_url,label\n")
    f.writelines(f"img/{i:07d}.jpg,{'ab'[i % 2]}\n" for i in range(count))
  return path


def plan_child(source: pathlib.Path, out: pathlib.Path) -> dict[str, float]:
  """Launcher peak RSS (MB) and pipeline proto size (bytes) for one source, in a fresh process."""
  child = measure.run_child("plan", ["--source", str(source), "--out", str(out),
                                     "--image-size", "32"], timeout=600)
  # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of the (large)
  # benchmark process would report the parent's pages as its own peak.
  rss = child.usage.get("hwm_mb") or child.max_rss_mb
  return {"max_rss_mb": rss, "proto_bytes": float(child.usage["proto_bytes"]),
          "wall_seconds": child.wall_seconds}


def _entry(kind: str, by_size: dict[int, dict[str, float]]) -> dict[str, Any]:
  (small, low), (large, high) = sorted(by_size.items())
  rss_growth = high["max_rss_mb"] / low["max_rss_mb"] - 1
  proto_growth = high["proto_bytes"] / low["proto_bytes"] - 1
  return {"source": kind, "sizes": [small, large],
          "max_rss_mb": {str(small): low["max_rss_mb"], str(large): high["max_rss_mb"]},
          "proto_bytes": {str(small): low["proto_bytes"], str(large): high["proto_bytes"]},
          "rss_growth": rss_growth, "proto_growth": proto_growth,
          "flat": rss_growth <= FLAT_TOLERANCE and proto_growth <= FLAT_TOLERANCE}


def measure_launcher(work: pathlib.Path, tree_sizes: Sequence[int],
                     csv_sizes: Sequence[int]) -> list[dict[str, Any]]:
  """The launcher's figures for a tree and a CSV at two sizes each."""
  trees = {n: plan_child(write_tree(work / f"tree_{n}", n), work / f"tree_out_{n}")
           for n in tree_sizes}
  csvs = {n: plan_child(write_csv(work / f"csv_{n}" / "m.csv", n), work / f"csv_out_{n}")
          for n in csv_sizes}
  return [_entry("folder tree", trees), _entry("CSV manifest", csvs)]


def line(entry: dict[str, Any]) -> str:
  """One printable line per source kind."""
  small, large = (str(n) for n in entry["sizes"])
  verdict = "flat" if entry["flat"] else "NOT flat"
  return (f"DRIVER ingest launcher, {entry['source']}: {small} rows "
          f"{entry['max_rss_mb'][small]:.0f} MB / proto {entry['proto_bytes'][small] / 1024:.1f} "
          f"KiB, {large} rows {entry['max_rss_mb'][large]:.0f} MB / proto "
          f"{entry['proto_bytes'][large] / 1024:.1f} KiB (RSS {entry['rss_growth']:+.1%}, proto "
          f"{entry['proto_growth']:+.1%}) {verdict} (tolerance +{FLAT_TOLERANCE:.0%})")
