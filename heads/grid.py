"""The compare grid's plan: which feature datasets, which heads, which (dataset, head) cells.

    entries = grid.read_index("out/features", backbones=["mobilenet"])
    cells, notes = grid.plan_cells(entries, grid.parse_heads("linear,mlp,scratch"))

`FEATURES/index.json` (written by `headstart extract`) lists the feature datasets; every head
that fits a dataset makes one cell, and the `scratch` head makes one cell of its own (it reads
the images the features came from). Nothing is trained here: `heads.compare` runs the cells.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from contracts import datasets, layout
from heads import zoo

SCRATCH_DIR = "from-scratch"
SCRATCH_BACKBONE = "none (from scratch)"

FeatureEntry = datasets.IndexEntry


def read_index(features_dir: str, backbones: Sequence[str] | None = None) -> list[FeatureEntry]:
  """The feature datasets of `features_dir/index.json`, optionally only some backbones.

  Args:
    features_dir: the `--out` folder of `headstart extract`.
    backbones: keep only datasets of these backbone names (None: all).

  Raises:
    ValueError: no index, an unknown backbone filter, or no dataset left.
  """
  entries = datasets.read_index(features_dir)
  path = f"{features_dir.rstrip('/')}/{layout.INDEX_NAME}"
  if backbones:
    known = sorted({entry.backbone for entry in entries})
    unknown = [name for name in backbones if name not in known]
    if unknown:
      raise ValueError(f"--backbones {','.join(backbones)!r}: {unknown[0]!r} is not in "
                       f"{path!r}; it lists {', '.join(known) or 'nothing'}")
    entries = [entry for entry in entries if entry.backbone in backbones]
  if not entries:
    raise ValueError(f"{path!r} lists no feature dataset; run headstart extract first")
  # Stable order: the leaderboard and cell directories do not depend on the index's order.
  return sorted(entries, key=lambda entry: entry.dir_name)


def parse_heads(text: str) -> list[str]:
  """Splits `--heads` and checks every name against the head zoo.

  Raises:
    ValueError: an unknown or repeated head, or none at all.
  """
  heads = [part.strip() for part in text.split(",") if part.strip()]
  if not heads:
    raise ValueError(f"--heads {text!r} names no head; allowed: {', '.join(zoo.HEADS)}")
  for head in heads:
    zoo.input_kind(head)
  if len(set(heads)) != len(heads):
    raise ValueError(f"--heads {text!r} repeats a head")
  return heads


def _head_fits(head: str, entry: FeatureEntry) -> str | None:
  """Why `head` cannot train on `entry` (None when it can)."""
  task = entry.manifest.get("task")
  store = entry.manifest.get("store", "both")
  kind = zoo.input_kind(head)
  if head == "keypoints" and task != "keypoints":
    return f"head 'keypoints' needs a keypoints dataset ({entry.dir_name} is {task})"
  if kind == "map" and store == "pooled":
    return f"{entry.dir_name} stores no feature map"
  if kind == "pooled" and store == "maps":
    return f"{entry.dir_name} stores no pooled vector"
  return None


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (dataset, head) pair of the grid; `data_dir` is what `training.train` is given."""
  dataset: str
  head: str
  data_dir: str
  backbone: str
  weights_kind: str


def plan_cells(entries: Sequence[FeatureEntry], heads: Sequence[str], *,
               pairs: Iterable[tuple[str, str]] | None = None) -> tuple[list[Cell], list[str]]:
  """The grid: every fitting head on every dataset (scratch once), plus notes on skipped cells.

  Args:
    entries: feature datasets from `read_index`.
    heads: head names.
    pairs: if given, only these `(backbone, head)` pairs (reproduce configs name their cells);
      `("scratch", "scratch")` or `(any, "scratch")` keeps the scratch baseline.

  Raises:
    ValueError: no cell fits.
  """
  wanted = None if pairs is None else {tuple(pair) for pair in pairs}
  cells, notes = [], []
  for head in heads:
    if head == "scratch":
      continue
    for entry in entries:
      if wanted is not None and (entry.backbone, head) not in wanted:
        continue
      reason = _head_fits(head, entry)
      if reason:
        notes.append(f"skipped {entry.dir_name}/{head}: {reason}")
        continue
      cells.append(Cell(entry.dir_name, head, entry.path, entry.backbone, entry.weights_kind))
  if "scratch" in heads and (wanted is None or any(head == "scratch" for _, head in wanted)):
    # The from-scratch CNN reads pixels: train it once on the images the features came from.
    cells.append(Cell(SCRATCH_DIR, "scratch", entries[0].path, SCRATCH_BACKBONE, "scratch"))
  if not cells:
    raise ValueError(f"no head of {','.join(heads)!r} fits the feature datasets "
                     f"({'; '.join(notes)})")
  return cells, notes
