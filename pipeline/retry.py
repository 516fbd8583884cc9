"""`headstart ingest --retry-failed`: fetch again only the rows an earlier run dead-lettered for
transient reasons, and merge them into its dataset.

    previous = retry.previous_dataset("out/images", settings)     # the launcher: checks only
    old = root | "ReadPrevious" >> retry.ReadPrevious("out/images", previous)
    rows = (rows, old.retry_ids) | "SelectRetryRows" >> retry.SelectRows()

Transient reasons are `fetch.TRANSIENT_REASONS` (timeouts, 429/5xx, connection errors, a host
that asked for a pause). The source is read again in full (its rows carry the locations, which
`errors.jsonl` holds only redacted), and joined by id with the ids to retry, inside the
pipeline. Every record of the previous dataset is carried over byte for byte with its split;
its dead letters are kept except those of retried ids (they are produced again, fetched or
not, duplicates of a retried row included), so with sources that have recovered the result
equals a clean run: the same records, splits, class names, counts and dead letters. The
previous dataset stays in place until the merged one is complete (see `publish`).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam
import tensorflow as tf
from apache_beam import pvalue

from contracts import datasets, layout
from contracts import schema as schema_lib
from pipeline import fetch

RETRY = "retry_ids"
KEPT = "kept_dead"
STATS = "stats"
# Settings a retry must share with the dataset it completes (they shape every record).
_SHAPING = ("image_size", "resize", "format", "background", "label_column", "group_column",
            "split_weights", "split_column", "target_columns")


def previous_dataset(out_dir: str, settings: Mapping[str, Any]) -> dict[str, Any]:
  """The manifest of the dataset a retry completes, checked against this run's settings.

  Raises:
    ValueError: no complete dataset in `out_dir`, or a setting that differs from its own.
  """
  try:
    manifest = datasets.read_manifest(out_dir)
  except layout.DatasetError as error:
    raise ValueError(f"--retry-failed completes an existing dataset: {error}") from None
  if not tf.io.gfile.exists(f"{out_dir}/{layout.ERRORS_NAME}"):
    raise ValueError(f"--retry-failed: {out_dir!r} has no {layout.ERRORS_NAME} to retry from")
  differ = [f"--{key.replace('_', '-')} {settings.get(key)!r} (the dataset has "
            f"{manifest[key]!r})" for key in _SHAPING
            if key in manifest and key in settings and settings[key] != manifest[key]]
  if differ:
    raise ValueError(f"--retry-failed must use the settings {out_dir!r} was written with: "
                     + "; ".join(differ))
  return manifest


def _row_id(line: str) -> str | None:
  row = json.loads(line).get("row")
  return row.get("id") if isinstance(row, dict) else None


class SortPreviousDeadFn(beam.DoFn):
  """(id, dead-letter lines) -> the id to retry (a transient reason among them), or the lines
  to keep as they are."""

  def process(self, element: tuple[str | None, Iterable[str]]):
    row_id, lines = element
    lines = list(lines)
    if row_id is not None and any(fetch.is_transient(json.loads(line)["reason"])
                                  for line in lines):
      yield pvalue.TaggedOutput(RETRY, row_id)
    else:
      yield from lines


class LabelStatsFn(beam.DoFn):
  """(split, serialized Example) of the previous dataset -> ((split, class name), 1) for the
  summary (the shape of `transforms.ToExampleFn`'s stats)."""

  def __init__(self, manifest: Mapping[str, Any]):
    super().__init__()
    self._names = manifest.get("class_names")
    self._schema = schema_lib.from_manifest(manifest) if self._names is not None else None

  def process(self, element: tuple[str, bytes]):
    split, serialized = element
    label = None
    if self._schema is not None:
      label = self._names[self._schema.decode(serialized, ["label"])["label"]]
    yield (split, label), 1


class ReadPrevious(beam.PTransform):
  """The previous dataset in `out_dir` -> tagged outputs: `examples` ((split, serialized) as
  stored), `stats` (((split, label), 1)), `kept_dead` (dead-letter lines kept) and
  `retry_ids`."""

  def __init__(self, out_dir: str, manifest: Mapping[str, Any]):
    super().__init__()
    self._out_dir = out_dir
    self._split_of = {s["file"]: split for split, entry in manifest["splits"].items()
                      for s in entry["shards"]}
    self._manifest = dict(manifest)

  def expand(self, root):
    split_of = self._split_of
    examples = (root
                | "ListShards" >> beam.Create(sorted(f"{self._out_dir}/{f}" for f in split_of))
                | "ReadShards" >> beam.io.ReadAllFromTFRecord(with_filename=True)
                | "SplitOf" >> beam.Map(lambda kv: (split_of[kv[0].rsplit("/", 1)[-1]], kv[1])))
    sorted_dead = (root
                   | "ReadDead" >> beam.io.ReadFromText(f"{self._out_dir}/{layout.ERRORS_NAME}")
                   | "KeepNonBlank" >> beam.Filter(str.strip)
                   | "KeyDeadById" >> beam.Map(lambda line: (_row_id(line), line))
                   | "GroupDeadById" >> beam.GroupByKey()
                   | "SortDead" >> beam.ParDo(SortPreviousDeadFn()).with_outputs(RETRY, main=KEPT))
    stats = examples | "LabelStats" >> beam.ParDo(LabelStatsFn(self._manifest))
    return {"examples": examples, STATS: stats, KEPT: sorted_dead[KEPT],
            RETRY: sorted_dead[RETRY]}


class SelectRows(beam.PTransform):
  """(source rows, ids to retry) -> the rows whose id is to be retried (all copies of it)."""

  def expand(self, inputs):
    rows, ids = inputs
    keyed = rows | "KeyRowsById" >> beam.Map(lambda row: (row["id"], row))
    marks = ids | "MarkRetryIds" >> beam.Map(lambda row_id: (row_id, True))
    return ({"rows": keyed, "retry": marks}
            | "JoinRetryIds" >> beam.CoGroupByKey()
            | "KeepRetried" >> beam.FlatMap(
                lambda kv: kv[1]["rows"] if kv[1]["retry"] else []))
