"""Beam DoFns and composite PTransforms of the ingest job (stage 1).

    rows, dead = root | "ReadSources" >> ReadSources(cfg)
    images, dead2 = rows | "FetchAndDecode" >> FetchAndDecode(cfg)

Every DoFn sends bad elements to the `dead` output as one JSON dead-letter line (stage, reason,
row, message) and bumps a counter named after the reason; nothing is dropped silently.
"""
from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.io import fileio

from contracts import schema as schema_lib
from pipeline import folder_tree, image_decode, redact, sources, splits
# The config and the dead-letter form live below the DoFns (the fetch-and-decode DoFn has its own
# module); they are re-exported here, where the job and the tests know them.
from pipeline.fetch_decode import CpuCounters, FetchDecodeFn
from pipeline.ingest_config import (DEAD, STATS, IngestConfig, DeadLetteringDoFn,  # noqa: F401
                                    dead_letter)


class ParseCsvLineFn(DeadLetteringDoFn):
  """Manifest line (bytes) -> source row dict, or a dead letter."""

  def __init__(self, spec: sources.CsvSpec):
    super().__init__()
    self._spec = spec

  def process(self, raw: bytes):
    if not raw.strip():
      return
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
      yield self._dead("malformed_row", raw.decode("utf-8", "replace"), f"not UTF-8: {error}")
      return
    try:
      yield sources.parse_csv_line(line, self._spec)
    except sources.RowError as error:
      yield self._dead(error.reason, redact.redact(line), str(error))


class RouteFolderRowFn(DeadLetteringDoFn):
  """Listed file path -> source row, or a dead letter (outside class folders, not an image
  name, a link leaving the root)."""

  def __init__(self, tree: folder_tree.TreeSpec):
    super().__init__()
    self._tree = tree

  def process(self, path: str):
    row = folder_tree.row_of(path, self._tree)
    if "error" in row:
      reason, message = row["error"]
      yield self._dead(reason, row, message)
    else:
      yield row


class KeepOnePerIdFn(DeadLetteringDoFn):
  """(id, rows) -> the one row to ingest; other copies become `duplicate` dead letters.

  Copies that disagree on the label are all `conflicting_label`: which one is right is unknown.
  """

  def process(self, element: tuple[str, Iterable[dict]]):
    _, rows = element
    rows = list(rows)
    if len(rows) > 1:  # which copy is kept must not depend on arrival order; one needs no sort
      rows.sort(key=lambda r: json.dumps(r, sort_keys=True, default=str))
    if len({r["label"] for r in rows}) > 1:
      labels = sorted({str(r["label"]) for r in rows})
      for row in rows:
        yield self._dead("conflicting_label", row, f"the same source is listed with labels "
                         f"{labels}")
      return
    yield rows[0]
    for row in rows[1:]:
      yield self._dead("duplicate", row, "the same source is listed more than once; kept one")


def prepare_image(row: dict, data: bytes, cfg: IngestConfig) -> dict:
  """Decodes, validates and resizes fetched bytes in this process (see `image_decode`).

  Raises:
    image_decode.ImageError: the bytes are not a usable image.
  """
  return image_decode.prepare_record(row, data, cfg.decode_settings)


class _UnknownLabel(Exception):
  """A row's label is not one of the class names."""


class ToExampleFn(DeadLetteringDoFn):
  """List of image dicts -> (split, [serialized tf.train.Example, ...]) per split, in order;
  also ((split, label), count) stats."""

  def __init__(self, cfg: IngestConfig):
    super().__init__()
    self._cfg = cfg
    self._schemas: dict[tuple, schema_lib.Schema] = {}

  def setup(self):
    self._cpu = CpuCounters()

  def _schema(self, class_names: Sequence[str], num_keypoints: int) -> schema_lib.Schema:
    key = (tuple(class_names or ()), num_keypoints)
    if key not in self._schemas:
      self._schemas[key] = schema_lib.image_schema(
          image_size=self._cfg.image_size, image_format=self._cfg.image_format,
          class_names=class_names, num_keypoints=num_keypoints)
    return self._schemas[key]

  def _one(self, item: dict, class_names: Sequence[str]) -> tuple[str, object, bytes]:
    """(split, label, serialized record).

    Raises:
      _UnknownLabel: the label is not one of `class_names`.
    """
    values = {
        "id": item["id"], "image": item["image"], "source": item["source"],
        "group": item.get("group") or "", "content_sha256": item["content_sha256"],
        "height": item["height"], "width": item["width"],
    }
    if item.get("label") is not None:
      if item["label"] not in class_names:
        raise _UnknownLabel(item["label"])
      values["label"] = class_names.index(item["label"])
    if item.get("targets") is not None:
      values["targets"] = np.asarray(item["targets"], np.float32)
    split = item.get("split") or splits.assign_split(item.get("group") or item["id"],
                                                     self._cfg.splits)
    keypoints = len(values["targets"]) if "targets" in values else 0
    return split, item.get("label"), self._schema(class_names, keypoints).encode(values)

  def process(self, items: Sequence[dict], class_names: Sequence[str]):
    started = time.thread_time()
    by_split: dict[str, list[bytes]] = {}
    stats: collections.Counter = collections.Counter()
    dead = []
    for item in items:
      try:
        split, label, record = self._one(item, class_names)
      except _UnknownLabel:
        dead.append(self._dead("unknown_label", item, f"label {item['label']!r} is not one of "
                               f"{list(class_names)}"))
        continue
      by_split.setdefault(split, []).append(record)
      stats[split, label] += 1
    # Timed before anything is yielded: a fused runner runs the next steps (the shard writer)
    # inside each yield, and their CPU is theirs, not this step's.
    self._cpu.add({"record": time.thread_time() - started})
    yield from dead
    for key, count in stats.items():
      yield pvalue.TaggedOutput(STATS, (key, count))
    yield from by_split.items()


class ReadCsvSource(beam.PTransform):
  """CSV manifest path -> (source rows, dead letters, input row count)."""

  def __init__(self, spec: sources.CsvSpec):
    super().__init__()
    self._spec = spec

  def expand(self, root):
    # Bytes, not str: a line that is not UTF-8 must become a dead letter, not crash the read.
    lines = root | "ReadLines" >> beam.io.ReadFromText(
        self._spec.path, skip_header_lines=1, strip_trailing_newlines=True,
        coder=beam.coders.BytesCoder())
    parsed = lines | "ParseRows" >> beam.ParDo(ParseCsvLineFn(self._spec)).with_outputs(
        DEAD, main="rows")
    count = (lines | "KeepNonBlank" >> beam.Filter(lambda line: bool(line.strip()))
             | "CountRows" >> beam.combiners.Count.Globally())
    return parsed.rows, parsed[DEAD], count


class ReadFolderSource(beam.PTransform):
  """Folder tree -> (source rows, dead letters, input row count).

  The files are matched on the workers (one pattern per class folder), not listed by the
  launcher: the job's size and the launcher's memory do not grow with the number of images.
  """

  def __init__(self, tree: folder_tree.TreeSpec):
    super().__init__()
    self._tree = tree

  def expand(self, root):
    tree = self._tree
    matched = (root
               | "ClassFolders" >> beam.Create(folder_tree.class_patterns(tree))
               | "MatchFiles" >> fileio.MatchAll()
               | "PathOf" >> beam.Map(lambda metadata: metadata.path))
    stray = root | "StrayFiles" >> beam.Create([f"{tree.root}/{name}" for name in tree.stray_files])
    entries = ((matched, stray) | "MergePaths" >> beam.Flatten()
               | "SpreadPaths" >> beam.Reshuffle())
    routed = entries | "RouteRows" >> beam.ParDo(RouteFolderRowFn(tree)).with_outputs(
        DEAD, main="rows")
    count = entries | "CountRows" >> beam.combiners.Count.Globally()
    return routed.rows, routed[DEAD], count


class FetchAndDecode(beam.PTransform):
  """Source rows -> lists of image dicts (decoded, validated, resized, re-encoded) + dead
  letters; duplicate sources are dead-lettered first."""

  def __init__(self, cfg: IngestConfig):
    super().__init__()
    self._cfg = cfg

  def expand(self, rows):
    unique = (rows
              | "KeyById" >> beam.Map(lambda row: (row["id"], row))
              | "GroupById" >> beam.GroupByKey()
              | "KeepOnePerId" >> beam.ParDo(KeepOnePerIdFn()).with_outputs(DEAD, main="rows"))
    images = (unique.rows
              | "FetchDecodeResize" >> beam.ParDo(FetchDecodeFn(self._cfg)).with_outputs(
                  DEAD, main="images"))
    return images.images, (unique[DEAD], images[DEAD]) | "MergeDeadLetters" >> beam.Flatten()
