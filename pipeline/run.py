"""Stage 1 entry point: `headstart ingest` (also `python -m pipeline`).

    headstart ingest --source data/sample/gender.csv --out out/images --image-size 96 \
        --label-column gender --group-column group

Reads a CSV manifest or a folder tree, fetches, validates, decodes and resizes every image,
assigns deterministic splits and writes a TFDS-loadable image dataset plus `errors.jsonl`,
`summary.json` and, last, `manifest.json`. Unknown flags are Beam pipeline options
(e.g. `--direct_running_mode=multi_processing --direct_num_workers=2`, or the Dataflow flags in
the README); local runs default to `--runner=FnApiRunner`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time

import apache_beam as beam
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from contracts import cli, layout, progress
from pipeline import fetch, image_dataset, image_decode, sinks, sources, splits, transforms


def _rgb(text: str) -> tuple[int, int, int]:
  parts = text.split(",")
  if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
    raise argparse.ArgumentTypeError(f"{text!r} is not R,G,B with values 0-255")
  return tuple(int(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
  """The ingest flags (Beam flags are passed through separately)."""
  parser = cli.Parser(prog="headstart ingest", description=__doc__.split("\n\n")[1])
  parser.add_argument("--source", required=True,
                      help="CSV manifest, class-per-folder tree, or root/<split>/<class>/ tree")
  parser.add_argument("--out", required=True, help="output dataset directory (local or gs://)")
  parser.add_argument("--image-size", type=cli.positive_int, default=300)
  parser.add_argument("--url-column", default="image_url")
  parser.add_argument("--label-column", default="label")
  parser.add_argument("--group-column", default=None,
                      help="rows sharing a group always land in the same split")
  parser.add_argument("--split-column", default=None, help="take splits from this column")
  parser.add_argument("--target-columns", default=None,
                      help="keypoint columns: 'all', a name prefix, or a comma list (x0,y0,...)")
  parser.add_argument("--classes", default=None,
                      help="comma list fixing the class names; other labels are dead-lettered")
  parser.add_argument("--splits", default="train=80,val=10,test=10")
  parser.add_argument("--num-shards", type=cli.non_negative_int, default=0,
                      help="shards per split (fewer when a split has fewer records); default 0: "
                      "one shard per 200 MiB of a split's records, so shards hold 100-200 MiB")
  parser.add_argument("--resize", choices=image_decode.RESIZE_MODES, default="stretch")
  parser.add_argument("--format", choices=image_decode.FORMATS, default="jpeg")
  parser.add_argument("--background", type=_rgb, default=(255, 255, 255),
                      help="R,G,B that transparent pixels and padding are composited on")
  parser.add_argument("--max-error-fraction", type=cli.fraction, default=0.5)
  parser.add_argument("--min-side", type=cli.positive_int, default=image_decode.DEFAULT_MIN_SIDE)
  parser.add_argument("--max-pixels", type=cli.positive_int, default=image_decode.DEFAULT_MAX_PIXELS)
  parser.add_argument("--max-bytes", type=cli.positive_int, default=fetch.FetchConfig.max_bytes)
  parser.add_argument("--timeout", type=float, default=fetch.FetchConfig.deadline,
                      help="total seconds allowed per download")
  parser.add_argument("--retries", type=int, default=fetch.FetchConfig.retries)
  parser.add_argument("--fetch-threads", type=cli.positive_int, default=16)
  parser.add_argument("--download-cache", default=None,
                      help="content-addressed cache of fetched remote bytes, so re-runs fetch "
                      "only new sources (default: OUT/download_cache; 'none' disables it)")
  parser.add_argument("--decode-timeout", type=float, default=30.0,
                      help="seconds one image may take to decode in its isolated subprocess "
                      "(a crash or hang costs that image only); 0 decodes in-process")
  parser.add_argument("--decode-processes", type=cli.positive_int, default=2)
  parser.add_argument("--decoder", default="pipeline.image_decode:prepare_record",
                      help="module:function(row, bytes, DecodeSettings) -> record; a custom "
                      "decoder (it must be importable by the workers)")
  parser.add_argument("--allow-root", action="append", default=[],
                      help="another folder local paths may point into")
  parser.add_argument("--allow-bucket", action="append", default=[],
                      help="another gs:// bucket sources may be read from (besides the "
                      "manifest's own)")
  parser.add_argument("--allow-network", action="append", default=[],
                      help="CIDR allowed despite the address guard (e.g. 127.0.0.1/32 in tests)")
  return parser


def _import_function(spec: str):
  module_name, _, name = spec.partition(":")
  try:
    return getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError):
    raise ValueError(f"--decoder {spec!r} is not an importable module:function") from None


def _config(args: argparse.Namespace) -> transforms.IngestConfig:
  return transforms.IngestConfig(
      image_size=args.image_size, resize=args.resize, image_format=args.format,
      splits=splits.parse_splits(args.splits), background=args.background,
      max_pixels=args.max_pixels, min_side=args.min_side,
      fetch=fetch.FetchConfig(deadline=args.timeout, max_bytes=args.max_bytes,
                              retries=args.retries, allowed_networks=tuple(args.allow_network)),
      fetch_threads=args.fetch_threads,
      decode_timeout=args.decode_timeout, decode_processes=args.decode_processes,
      decoder=_import_function(args.decoder),
      download_cache=None if args.download_cache == "none" else (
          args.download_cache or f"{args.out.rstrip('/')}/download_cache"),
      classes=tuple(c.strip() for c in args.classes.split(",")) if args.classes else None)


def _is_csv(source: str) -> bool:
  return source.lower().endswith((".csv", ".txt")) or (
      tf.io.gfile.exists(source) and not tf.io.gfile.isdir(source))


def _clear_previous_output(out_dir: str) -> None:
  """Removes an earlier run's manifest and shards first, so a crash never leaves a mix."""
  tf.io.gfile.makedirs(out_dir)
  for name in (layout.MANIFEST_NAME, layout.SUMMARY_NAME, layout.ERRORS_NAME):
    if tf.io.gfile.exists(f"{out_dir}/{name}"):
      tf.io.gfile.remove(f"{out_dir}/{name}")
  for path in tf.io.gfile.glob(f"{out_dir}/{layout.IMAGES_NAME}-*.tfrecord-*"):
    tf.io.gfile.remove(path)
  parts = f"{out_dir}/{layout.IMAGES_NAME}{sinks.PARTS_DIR_SUFFIX}"
  if tf.io.gfile.exists(parts):  # left by a job that died while writing
    tf.io.gfile.rmtree(parts)


def build_pipeline(root: beam.Pipeline, *, out_dir: str,
                   cfg: transforms.IngestConfig, spec: sources.CsvSpec | None,
                   folder_rows: list[dict] | None, max_error_fraction: float,
                   settings: dict, num_shards: int = 0) -> beam.PCollection:
  """Adds the ingest job to `root`: read -> dedupe -> fetch/decode -> split -> write.

  Returns:
    A one-element PCollection: the job's summary (also written to `summary.json`).
  """
  if spec is not None:
    rows, parse_dead, input_rows = root | "ReadManifest" >> transforms.ReadCsvSource(spec)
    num_keypoints = len(spec.target_indices) // 2
    labelled = spec.label_index is not None
  else:
    rows, parse_dead, input_rows = root | "ReadFolders" >> transforms.ReadFolderSource(folder_rows)
    num_keypoints, labelled = 0, True
  images, fetch_dead = rows | "FetchAndDecode" >> transforms.FetchAndDecode(cfg)

  if not labelled:
    class_names = root | "NoClasses" >> beam.Create([None])
  elif cfg.classes is not None:
    class_names = root | "GivenClasses" >> beam.Create([list(cfg.classes)])
  else:
    class_names = (rows
                   | "LabelOf" >> beam.Map(lambda row: row["label"])
                   | "DistinctLabels" >> beam.Distinct()
                   | "CollectLabels" >> beam.combiners.ToList()
                   | "SortLabels" >> beam.Map(sorted))
  examples = images | "ToExample" >> beam.ParDo(
      transforms.ToExampleFn(cfg), beam.pvalue.AsSingleton(class_names)).with_outputs(
          transforms.DEAD, transforms.STATS, main="examples")
  shards = examples.examples | "WriteImages" >> sinks.WriteSplits(
      out_dir, layout.IMAGES_NAME, num_shards=num_shards)

  dead = (parse_dead, fetch_dead, examples[transforms.DEAD]) | "MergeDead" >> beam.Flatten()
  _ = dead | "WriteErrors" >> beam.io.WriteToText(
      f"{out_dir}/errors", file_name_suffix=".jsonl", num_shards=1, shard_name_template="")
  dead_reasons = (dead
                  | "ReasonOf" >> beam.Map(lambda line: json.loads(line)["reason"])
                  | "CountReasons" >> beam.combiners.Count.PerElement())
  split_labels = examples[transforms.STATS] | "CountSplitLabels" >> beam.combiners.Count.PerElement()
  return (shards
          | "CollectShards" >> beam.combiners.ToList()
          | "Finalize" >> beam.Map(
              lambda shard_list, count, reasons, stats, names: image_dataset.finalize(
                  shard_list, out_dir=out_dir, input_rows=count, dead_reasons=reasons,
                  split_labels=stats, class_names=names, num_keypoints=num_keypoints,
                  settings=settings, max_error_fraction=max_error_fraction),
              beam.pvalue.AsSingleton(input_rows), beam.pvalue.AsList(dead_reasons),
              beam.pvalue.AsList(split_labels), beam.pvalue.AsSingleton(class_names)))


def _print_summary(summary: dict, out_dir: str, seconds: float) -> None:
  rate = summary["written"] / seconds if seconds else 0.0
  print(f"ingest: {summary['written']} written + {summary['dead_lettered']} dead-lettered = "
        f"{summary['written'] + summary['dead_lettered']} of {summary['input_rows']} input rows "
        f"({'balanced' if summary['balanced'] else 'NOT BALANCED'}) in {seconds:.1f}s, "
        f"{rate:.1f} images/s")
  for title in ("by_split", "by_class", "by_reason"):
    if summary[title]:
      items = ", ".join(f"{k}={v}" for k, v in summary[title].items())
      print(f"  {title.replace('_', ' ')}: {items}")
  if summary["status"] == "ok":
    print(f"  dataset: {out_dir} (errors: {out_dir}/{layout.ERRORS_NAME})")


def run(argv: list[str] | None = None) -> dict:
  """Runs the ingest job; returns its summary (also written to `summary.json`).

  Raises:
    ValueError: a bad flag value or an unusable source (before any work), or a failed job
      (error fraction above the limit, nothing written, counts not balanced).
  """
  args, pipeline_args = build_parser().parse_known_args(argv)
  cfg = _config(args)
  out_dir = args.out.rstrip("/")
  spec, folder_rows = None, None
  if _is_csv(args.source):
    spec = sources.inspect_csv(
        args.source, url_column=args.url_column, label_column=args.label_column,
        group_column=args.group_column, split_column=args.split_column,
        target_columns=args.target_columns, allow_roots=args.allow_root,
        allow_buckets=args.allow_bucket)
  else:
    folder_rows = list(sources.list_folder_tree(args.source))
  settings = {"image_size": args.image_size, "resize": args.resize, "format": args.format,
              "background": list(args.background), "source_manifest": sources.redact(args.source),
              "label_column": args.label_column if spec is None or spec.label_index is not None
              else None, "group_column": args.group_column, "split_weights": args.splits}
  _clear_previous_output(out_dir)
  started = time.monotonic()
  root = beam.Pipeline(options=PipelineOptions(cli.with_default_runner(pipeline_args)))
  build_pipeline(root, out_dir=out_dir, cfg=cfg, spec=spec,
                 folder_rows=folder_rows, max_error_fraction=args.max_error_fraction,
                 settings=settings, num_shards=args.num_shards)
  root.run().wait_until_finish()
  progress.report("ingest", done=True)
  seconds = time.monotonic() - started
  with tf.io.gfile.GFile(f"{out_dir}/{layout.SUMMARY_NAME}") as f:
    summary = json.load(f)
  summary["seconds"] = seconds
  _print_summary(summary, out_dir, seconds)
  if summary["status"] != "ok":
    raise ValueError("; ".join(summary["problems"])
                     + f"; see {out_dir}/{layout.ERRORS_NAME}")
  return summary


def main(argv: list[str] | None = None) -> int:
  """Console entry: returns 0 on success (errors surface as ValueError to `headstart`)."""
  run(argv)
  return 0
