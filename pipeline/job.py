"""The ingest job's Beam graph: read -> (select rows to retry) -> dedupe -> fetch/decode ->
split -> write shards, dead letters, summary and manifest.

    root = beam.Pipeline(options=...)
    job.build_pipeline(root, out_dir=staging, cfg=cfg, spec=spec, tree=None,
                       max_error_fraction=0.5, settings=settings)

`pipeline.run` parses the flags, checks the source and calls this; the DoFns and composite
transforms live in `transforms` (and `retry` for `--retry-failed`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import apache_beam as beam

from contracts import layout
from pipeline import folder_tree, image_dataset, retry, sinks, sources, transforms


def _read_source(root, spec: sources.CsvSpec | None, tree: folder_tree.TreeSpec | None):
  """(rows, dead letters, input row count, keypoints per row, labelled?) of the source."""
  if spec is not None:
    rows, dead, count = root | "ReadManifest" >> transforms.ReadCsvSource(spec)
    return rows, dead, count, len(spec.target_indices) // 2, spec.label_index is not None
  rows, dead, count = root | "ReadFolders" >> transforms.ReadFolderSource(tree)
  return rows, dead, count, 0, True


def _class_names(root, rows, names: list[str] | None, labelled: bool):
  """A one-element PCollection: the sorted distinct labels of `rows`, or `names` when fixed."""
  if not labelled:
    return root | "NoClasses" >> beam.Create([None])
  if names is not None:
    return root | "GivenClasses" >> beam.Create([list(names)])
  return (rows
          | "LabelOf" >> beam.Map(lambda row: row["label"])
          | "DistinctLabels" >> beam.Distinct()
          | "CollectLabels" >> beam.combiners.ToList()
          | "SortLabels" >> beam.Map(sorted))


def build_pipeline(root: beam.Pipeline, *, out_dir: str, cfg: transforms.IngestConfig,
                   spec: sources.CsvSpec | None, tree: folder_tree.TreeSpec | None,
                   max_error_fraction: float, settings: Mapping[str, Any],
                   previous: tuple[str, Mapping[str, Any]] | None = None,
                   num_shards: int = 0) -> beam.PCollection:
  """Adds the ingest job to `root`, writing the dataset into `out_dir`.

  With `previous` = (dataset dir, its manifest), only rows that dataset dead-lettered for
  transient reasons are fetched; its records and other dead letters are carried over.
  `num_shards` is shards per split (0: by size, see `pipeline.sharding`).

  Returns:
    A one-element PCollection: the job's summary (also written to `summary.json`).
  """
  rows, parse_dead, input_rows, num_keypoints, labelled = _read_source(root, spec, tree)
  names = list(cfg.classes) if cfg.classes is not None else None
  old = None
  if previous is not None:
    old = root | "ReadPrevious" >> retry.ReadPrevious(*previous)
    class_names = _class_names(root, rows, previous[1].get("class_names"), labelled)
    rows = (rows, old[retry.RETRY]) | "SelectRetryRows" >> retry.SelectRows()
    parse_dead = old[retry.KEPT]  # the previous run's dead letters stand for this read's
  else:
    class_names = _class_names(root, rows, names, labelled)
  images, fetch_dead = rows | "FetchAndDecode" >> transforms.FetchAndDecode(cfg)
  examples = images | "ToExample" >> beam.ParDo(
      transforms.ToExampleFn(cfg), beam.pvalue.AsSingleton(class_names)).with_outputs(
          transforms.DEAD, transforms.STATS, main="examples")
  records, stats = examples.examples, examples[transforms.STATS]
  if old is not None:
    records = (records, old["examples"]) | "MergeRecords" >> beam.Flatten()
    stats = (stats, old[retry.STATS]) | "MergeStats" >> beam.Flatten()
  shards = records | "WriteImages" >> sinks.WriteSplits(out_dir, layout.IMAGES_NAME,
                                                        num_shards=num_shards)

  dead = (parse_dead, fetch_dead, examples[transforms.DEAD]) | "MergeDead" >> beam.Flatten()
  _ = dead | "WriteErrors" >> beam.io.WriteToText(
      f"{out_dir}/errors", file_name_suffix=".jsonl", num_shards=1, shard_name_template="")
  dead_reasons = (dead
                  | "ReasonOf" >> beam.Map(lambda line: json.loads(line)["reason"])
                  | "CountReasons" >> beam.combiners.Count.PerElement())
  split_labels = stats | "CountSplitLabels" >> beam.CombinePerKey(sum)
  return (shards
          | "CollectShards" >> beam.combiners.ToList()
          | "Finalize" >> beam.Map(
              lambda shard_list, count, reasons, stats, names: image_dataset.finalize(
                  shard_list, out_dir=out_dir, input_rows=count, dead_reasons=reasons,
                  split_labels=stats, class_names=names, num_keypoints=num_keypoints,
                  settings=settings, max_error_fraction=max_error_fraction),
              beam.pvalue.AsSingleton(input_rows), beam.pvalue.AsList(dead_reasons),
              beam.pvalue.AsList(split_labels), beam.pvalue.AsSingleton(class_names)))
