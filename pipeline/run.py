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
import dataclasses
import importlib
import ipaddress
import json
import os
import time

# This process does no linear algebra: NumPy's and OpenCV's OpenBLAS would each start a thread
# per core at import, and those threads spun on the cores the decoders need (perf, HTTP
# benchmark: ~0.01 ms of CPU per image). Set before they load; a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import apache_beam as beam  # noqa: E402 (after the setting above)
import tensorflow as tf
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from contracts import cli, layout, progress
from pipeline import (fetch, fetch_decode, folder_tree, image_decode, job, publish, redact,
                      retry, sinks, sources, splits, transforms)


# Runners that run in this process or on this machine: the download cache is on by default.
_LOCAL_RUNNERS = frozenset({"DirectRunner", "FnApiRunner", "BundleBasedDirectRunner",
                            "SwitchingDirectRunner", "PrismRunner", "InteractiveRunner"})


def _rgb(text: str) -> tuple[int, int, int]:
  parts = text.split(",")
  if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
    raise argparse.ArgumentTypeError(f"{text!r} is not R,G,B with values 0-255")
  return tuple(int(p) for p in parts)


def _cidr(text: str) -> str:
  try:
    ipaddress.ip_network(text, strict=False)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an IP network such as 127.0.0.1/32 or "
                                     "fd00::/8") from None
  return text


def _add_fetch_flags(parser: argparse.ArgumentParser) -> None:
  """How sources are downloaded: limits, manners, the address guard and the download cache."""
  parser.add_argument("--max-bytes", type=cli.positive_int, default=fetch.FetchConfig.max_bytes)
  parser.add_argument("--timeout", type=float, default=fetch.FetchConfig.deadline,
                      help="total seconds allowed per download")
  parser.add_argument("--retries", type=int, default=fetch.FetchConfig.retries)
  parser.add_argument("--max-in-flight", type=cli.positive_int,
                      default=transforms.IngestConfig.max_in_flight,
                      help="rows being downloaded at once per worker (bundle thread), "
                      "besides those being decoded; each host still gets at most "
                      "--max-per-host of them")
  parser.add_argument("--fetch-threads", type=cli.positive_int,
                      default=transforms.IngestConfig.fetch_threads,
                      help="threads per worker process reading local and gs:// files and a "
                      "gs:// download cache (http(s) downloads run on one event loop)")
  parser.add_argument("--max-in-flight-mb", type=cli.positive_int,
                      default=transforms.IngestConfig.max_in_flight_mb,
                      help="memory cap (MiB) on what one worker process holds for rows in "
                      "flight (downloaded bytes not yet decoded, results waiting for a slower "
                      "row ahead of them); past it no new download starts")
  parser.add_argument("--max-per-host", type=cli.positive_int,
                      default=fetch.FetchConfig.max_per_host,
                      help="requests in flight to one host from one worker process (all its "
                      "download threads together)")
  parser.add_argument("--user-agent", default=fetch.USER_AGENT,
                      help="the User-Agent header of every download")
  parser.add_argument("--respect-opt-out", action=argparse.BooleanOptionalAction, default=True,
                      help="dead-letter responses marked X-Robots-Tag noai/noimageai/noindex/none "
                      "as opted_out (--no-respect-opt-out ingests them)")
  parser.add_argument("--download-cache", default=None,
                      help="content-addressed cache of fetched remote bytes, so re-runs fetch "
                      "only new sources (default: OUT/download_cache on local runners, none on "
                      "remote runners such as Dataflow; 'none' disables it)")
  parser.add_argument("--allow-network", action="append", default=[], type=_cidr,
                      help="CIDR allowed despite the address guard (e.g. 127.0.0.1/32 in tests)")


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
  _add_fetch_flags(parser)
  parser.add_argument("--decode-timeout", type=float, default=30.0,
                      help="seconds one image may take to decode in its isolated subprocess "
                      "(a crash or hang costs that image only); 0 decodes in-process")
  parser.add_argument("--decode-processes", type=cli.positive_int, default=2)
  parser.add_argument("--decode-memory-mb", type=cli.non_negative_int,
                      default=transforms.IngestConfig.decode_memory_mb,
                      help="address-space limit of each decoder process in MiB (an image that "
                      "needs more is dead-lettered as decode_out_of_memory); 0: no limit")
  parser.add_argument("--decoder", default="pipeline.image_decode:prepare_record",
                      help="module:function(row, bytes, DecodeSettings) -> record; a custom "
                      "decoder (it must be importable by the workers)")
  parser.add_argument("--retry-failed", action="store_true",
                      help="on an existing dataset in OUT: fetch again only the rows it "
                      "dead-lettered for transient reasons (timeouts, 429/5xx, connection "
                      "errors) and merge them in; every other record stays as it is")
  parser.add_argument("--allow-root", action="append", default=[],
                      help="another folder local paths may point into")
  parser.add_argument("--allow-bucket", action="append", default=[],
                      help="another gs:// bucket sources may be read from (besides the "
                      "manifest's own)")
  return parser


def _import_function(spec: str):
  module_name, _, name = spec.partition(":")
  try:
    return getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError):
    raise ValueError(f"--decoder {spec!r} is not an importable module:function") from None


def _download_cache(args: argparse.Namespace, options: PipelineOptions) -> str | None:
  """The cache folder: given, or OUT/download_cache on local runners only. On a remote runner
  at millions of images it would double the storage and add object-store operations per image."""
  if args.download_cache:
    return None if args.download_cache == "none" else args.download_cache
  runner = str(options.view_as(StandardOptions).runner or "FnApiRunner").rsplit(".", 1)[-1]
  return f"{args.out.rstrip('/')}/download_cache" if runner in _LOCAL_RUNNERS else None


def _config(args: argparse.Namespace, options: PipelineOptions) -> transforms.IngestConfig:
  return transforms.IngestConfig(
      image_size=args.image_size, resize=args.resize, image_format=args.format,
      splits=splits.parse_splits(args.splits), background=args.background,
      max_pixels=args.max_pixels, min_side=args.min_side,
      fetch=fetch.FetchConfig(deadline=args.timeout, max_bytes=args.max_bytes,
                              retries=args.retries, allowed_networks=tuple(args.allow_network),
                              max_per_host=args.max_per_host,
                              user_agent=args.user_agent,
                              respect_opt_out=args.respect_opt_out),
      fetch_threads=args.fetch_threads, max_in_flight=args.max_in_flight,
      max_in_flight_mb=args.max_in_flight_mb,
      decode_timeout=args.decode_timeout, decode_processes=args.decode_processes,
      decode_memory_mb=args.decode_memory_mb,
      decoder=_import_function(args.decoder),
      download_cache=_download_cache(args, options),
      classes=tuple(c.strip() for c in args.classes.split(",")) if args.classes else None)


def _is_csv(source: str) -> bool:
  return source.lower().endswith((".csv", ".txt")) or (
      tf.io.gfile.exists(source) and not tf.io.gfile.isdir(source))


def _print_summary(summary: dict, out_dir: str, errors_dir: str, seconds: float) -> None:
  rate = summary["written"] / seconds if seconds else 0.0
  print(f"ingest: {summary['written']} written + {summary['dead_lettered']} dead-lettered = "
        f"{summary['written'] + summary['dead_lettered']} of {summary['input_rows']} input rows "
        f"({'balanced' if summary['balanced'] else 'NOT BALANCED'}) in {seconds:.1f}s, "
        f"{rate:.1f} images/s")
  for title in ("by_split", "by_class", "by_reason"):
    if summary[title]:
      items = ", ".join(f"{k}={v}" for k, v in summary[title].items())
      print(f"  {title.replace('_', ' ')}: {items}")
  if summary.get("fetch_decode_seconds"):
    stage = summary["fetch_decode_seconds"]
    print(f"  fetch and decode: {stage:.1f}s from the first row to the last image, "
          f"{summary['written'] / stage:.1f} images/s")
  cache = summary.get("download_cache") or {}
  if cache.get("hits") or cache.get("not_written"):
    print(f"  download cache: {cache['hits']} sources read from it, {cache['not_written']} not "
          "written to it (fetched again next time)")
  if summary.get("cpu_ms_per_image"):
    items = ", ".join(f"{k} {v:.3f}" for k, v in summary["cpu_ms_per_image"].items())
    print(f"  CPU ms per image by phase: {items}")
  if summary["status"] == "ok":
    print(f"  dataset: {out_dir} (errors: {errors_dir}/{layout.ERRORS_NAME})")


@dataclasses.dataclass
class Job:
  """An ingest job whose pipeline is built but not run; it writes into `staging`."""
  pipeline: beam.Pipeline
  out_dir: str
  staging: str


def plan(argv: list[str] | None = None) -> Job:
  """Parses the flags, checks the source and builds the pipeline (the launcher's whole work
  before submission; `benchmarks.driver_bench` measures it). Nothing is written but the empty
  staging folder.

  Only the top of a source is read here (a manifest's header, a tree's class folders): rows
  are read and files matched inside the pipeline, so the launcher's memory and the submitted
  job's size do not grow with the number of rows.

  Raises:
    ValueError: a bad flag value or an unusable source.
  """
  args, pipeline_args = build_parser().parse_known_args(argv)
  options = PipelineOptions(cli.with_default_runner(pipeline_args))
  cfg = _config(args, options)
  out_dir = args.out.rstrip("/")
  spec, tree = None, None
  if _is_csv(args.source):
    spec = sources.inspect_csv(
        args.source, url_column=args.url_column, label_column=args.label_column,
        group_column=args.group_column, split_column=args.split_column,
        target_columns=args.target_columns, allow_roots=args.allow_root,
        allow_buckets=args.allow_bucket)
  else:
    tree = folder_tree.inspect_tree(args.source, args.allow_root)
  settings = {"image_size": args.image_size, "resize": args.resize, "format": args.format,
              "background": list(args.background), "source_manifest": redact.redact(args.source),
              "label_column": args.label_column if spec is None or spec.label_index is not None
              else None, "group_column": args.group_column, "split_weights": args.splits,
              "split_column": args.split_column, "target_columns": args.target_columns}
  staging = publish.prepare(out_dir)  # first: it may finish publishing an earlier job
  previous = (out_dir, retry.previous_dataset(out_dir, settings)) if args.retry_failed else None
  root = beam.Pipeline(options=options)
  job.build_pipeline(root, out_dir=staging, cfg=cfg, spec=spec, tree=tree,
                     max_error_fraction=args.max_error_fraction, settings=settings,
                     previous=previous, num_shards=args.num_shards)
  return Job(root, out_dir, staging)


def _query(result: beam.runners.runner.PipelineResult,
           metrics_filter: MetricsFilter) -> dict[str, list]:
  """The job's metrics matching `metrics_filter` (empty lists when the runner reports none)."""
  try:
    return result.metrics().query(metrics_filter)
  except (NotImplementedError, AttributeError, ValueError):
    return {"counters": [], "distributions": [], "gauges": []}


def _counter_totals(result: beam.runners.runner.PipelineResult,
                    namespace: str) -> dict[str, int]:
  """The job's counters of `namespace`, summed over steps by name (empty when the runner
  reports none)."""
  totals: dict[str, int] = {}
  for counter in _query(result, MetricsFilter().with_namespace(namespace))["counters"]:
    name = counter.key.metric.name
    totals[name] = totals.get(name, 0) + (counter.committed or counter.attempted or 0)
  return totals


def _cpu_ms_per_image(result: beam.runners.runner.PipelineResult,
                      images: int) -> dict[str, float]:
  """CPU milliseconds per written image by phase, from the job's counters (empty when the
  runner reports none)."""
  totals = _counter_totals(result, sinks.CPU_NAMESPACE)
  return {phase: us / 1e3 / images for phase, us in sorted(totals.items())} if images else {}


def _download_cache_counts(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
  """Sources read from the download cache and sources it could not store (zeros when the
  runner reports no counters)."""
  totals = _counter_totals(result, "ingest")
  return {"hits": totals.get(fetch_decode.CACHE_HITS_METRIC, 0),
          "not_written": totals.get(fetch_decode.CACHE_ERRORS_METRIC, 0)}


def _fetch_decode_seconds(result: beam.runners.runner.PipelineResult) -> float | None:
  """Wall seconds from the first row fetched to the last image decoded (None when the runner
  reports no distributions or nothing was decoded)."""
  found = _query(result, MetricsFilter().with_name(fetch_decode.CLOCK_METRIC))
  values = [d.committed or d.attempted for d in found["distributions"]]
  values = [v for v in values if v is not None and v.count]
  if not values:
    return None
  return (max(v.max for v in values) - min(v.min for v in values)) / 1e3


def run(argv: list[str] | None = None) -> dict:
  """Runs the ingest job; returns its summary (also written to `summary.json`).

  The job writes into a staging folder; the dataset already in `--out`, if any, is replaced
  only once the new one is complete (see `publish`).

  Raises:
    ValueError: a bad flag value or an unusable source (before any work), or a failed job
      (error fraction above the limit, nothing written, counts not balanced).
  """
  return run_job(plan(argv))


def run_job(job: Job) -> dict:
  """Runs a planned ingest job (see `run`); returns its summary."""
  started = time.monotonic()
  result = job.pipeline.run()
  result.wait_until_finish()
  progress.report("ingest", done=True)
  seconds = time.monotonic() - started
  with tf.io.gfile.GFile(f"{job.staging}/{layout.SUMMARY_NAME}") as f:
    summary = json.load(f)
  summary["seconds"] = seconds
  summary["cpu_ms_per_image"] = _cpu_ms_per_image(result, summary["written"])
  summary["fetch_decode_seconds"] = _fetch_decode_seconds(result)
  summary["download_cache"] = _download_cache_counts(result)
  if summary["status"] == "ok":
    publish.swap_in(job.staging, job.out_dir)
    errors_dir = job.out_dir
  else:
    errors_dir = publish.keep_failed(job.staging, job.out_dir)
  _print_summary(summary, job.out_dir, errors_dir, seconds)
  if summary["status"] != "ok":
    kept = (f"; the dataset already in {job.out_dir} is unchanged"
            if errors_dir != job.out_dir else "")
    raise ValueError("; ".join(summary["problems"]) + kept
                     + f"; see {errors_dir}/{layout.ERRORS_NAME}")
  return summary


def main(argv: list[str] | None = None) -> int:
  """Console entry: returns 0 on success (errors surface as ValueError to `headstart`)."""
  run(argv)
  return 0
