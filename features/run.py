"""Stage 2 entry point: run frozen backbones once over an image dataset, one feature dataset each.

    headstart extract --images out/images --out out/features --backbones vgg16,mobilenet_v2 \
        --weights none --input-size 96     # 40 images: ~12 s of CPU (30 s wall on a busy 2-core VM)

A second identical call prints `cache hit: <dir>` per backbone and does no work. Beam flags
pass through (`--runner`, `--direct_running_mode=multi_processing`, Dataflow options); local
runs default to `--runner=FnApiRunner`.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from contracts import cli, datasets, progress
from features import backbones as backbones_lib
from features import model_host, records

_WEIGHTS_HELP = "imagenet (default), none (seeded random init) or the path of a weights file"


def parse_args(argv: list[str] | None) -> tuple[Any, list[str]]:
  """Splits argv into an `ExtractConfig` and the Beam flags (unknown flags pass through).

  Raises:
    ValueError: a flag is missing or has a bad value (the message names value and choices).
  """
  from features import jobs as jobs_lib
  parser = cli.Parser(prog="headstart extract", description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", required=True, help="image dataset dir (headstart ingest --out)")
  parser.add_argument("--out", required=True, help="folder for the feature datasets + index.json")
  parser.add_argument("--backbones", default="mobilenet_v2",
                      help=f"comma list of {', '.join(backbones_lib.BACKBONES)} or model paths")
  parser.add_argument("--layer", default=None, help="output layer name (default: last conv block)")
  parser.add_argument("--input-size", type=cli.positive_int, default=None,
                      help="square input side (default: the image dataset's image size)")
  parser.add_argument("--weights", default="imagenet", help=_WEIGHTS_HELP)
  parser.add_argument("--weights-dir", default=None,
                      help="folder/bucket of staged weight files (or $HEADSTART_WEIGHTS_DIR)")
  parser.add_argument("--batch-size", type=cli.positive_int, default=64)
  parser.add_argument("--store", choices=records.STORE_CHOICES, default="both")
  parser.add_argument("--views", type=cli.non_negative_int, default=0,
                      help="augmented views per train image (flip, crops)")
  parser.add_argument("--force", action="store_true", help="recompute even on a cache hit")
  parser.add_argument("--seed", type=int, default=0, help="seed of --weights none and of views")
  parser.add_argument("--precision", choices=backbones_lib.PRECISIONS, default="float32",
                      help="compute precision of the backbones (mixed_* for GPUs)")
  parser.add_argument("--jit-compile", action="store_true", help="compile the forward with XLA")
  parser.add_argument("--max-error-fraction", type=cli.fraction, default=0.5,
                      help="fail when more image records than this are unusable (dead-lettered)")
  parser.add_argument("--estimate", action="store_true",
                      help="run each backbone on a sample here and print images/s, worker-hours "
                      "and cost of the full extraction instead of running it")
  parser.add_argument("--estimate-images", type=cli.positive_int, default=128,
                      help="sample size of --estimate")
  parser.add_argument("--price-per-hour", type=cli.non_negative_float, default=None,
                      help="price of one worker-hour (any currency), for --estimate's cost")
  parser.add_argument("--share-models", choices=model_host.SHARING_CHOICES, default="process",
                      help="one copy of each backbone per SDK process (default) or per machine, "
                      "shared by all its processes (GPU workers: one copy per GPU)")
  known, beam_args = parser.parse_known_args(argv)
  config = jobs_lib.ExtractConfig(
      images=known.images.rstrip("/"), out=known.out.rstrip("/"),
      backbones=tuple(backbones_lib.parse_backbones(known.backbones)), layer=known.layer,
      input_size=known.input_size, weights=known.weights, weights_dir=known.weights_dir,
      batch_size=known.batch_size, store=known.store, views=known.views, force=known.force,
      seed=known.seed, precision=known.precision, jit_compile=known.jit_compile,
      max_error_fraction=known.max_error_fraction, share_models=known.share_models,
      estimate=known.estimate, estimate_images=known.estimate_images,
      price_per_hour=known.price_per_hour)
  return config, cli.with_default_runner(beam_args)


# Runners whose workers share this machine's disk and Keras cache (Beam's names, lower case).
_LOCAL_RUNNERS = ("directrunner", "fnapirunner", "bundlebaseddirectrunner",
                  "switchingdirectrunner", "prismrunner", "interactiverunner")


def _runs_remotely(beam_args: list[str]) -> bool:
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  runner = (PipelineOptions(beam_args).view_as(StandardOptions).runner or "direct").lower()
  runner = runner.rsplit(".", 1)[-1]  # Beam also takes a module path
  # Beam accepts `dataflow` for `DataflowRunner`.
  return (runner if runner.endswith("runner") else f"{runner}runner") not in _LOCAL_RUNNERS


def build_pipeline(root: Any, plan: Any, run_tag: str | None = None) -> list[Any]:
  """Adds the extraction of every job in `plan` to `root`; returns the per-dataset outputs.

  Images are read and decoded once per input size; all backbones of that size see the same
  batches in one worker pass. `run_tag` names this run's shared model copies (`--share-models
  machine`); a fresh one is made when None.
  """
  from features import transforms
  run_tag = run_tag or model_host.new_run_tag()
  config = plan.config
  image_records = root | "ReadImages" >> transforms.ReadImageRecords(
      plan.shards, plan.records_per_range)
  by_size: dict[int, list[Any]] = {}
  for job in plan.jobs:
    by_size.setdefault(job.input_size, []).append(job)
  outputs = []
  for size, jobs in by_size.items():
    outputs += image_records | f"Extract[{size}px]" >> transforms.ExtractFeatures(
        jobs, batch_size=config.batch_size, views=config.views, seed=config.seed,
        jit_compile=config.jit_compile, share_models=config.share_models,
        tag=f"{run_tag}-{size}")
  return outputs


def _estimate(plan: Any) -> None:
  """Prints and writes the estimate of the jobs that would run (cache hits cost nothing)."""
  from features import estimate as estimate_lib
  if not plan.jobs:
    print("nothing to estimate: every backbone is a cache hit")
    return
  result = estimate_lib.estimate(plan, sample=plan.config.estimate_images,
                                 price_per_hour=plan.config.price_per_hour)
  for line in estimate_lib.estimate_lines(result):
    print(line)
  print(f"estimate: {estimate_lib.write(plan.config.out, result)} (a real run of the same call "
        "keeps it beside the measured figures)")


def run(argv: list[str] | None = None) -> Any:
  """Plans, reuses cached datasets, extracts the missing ones and updates `index.json`.

  Returns:
    The Beam `PipelineResult` (finished), or None when every backbone was a cache hit.

  Raises:
    ValueError: bad flags, missing image dataset or weights (one sentence each).
  """
  import dataclasses

  from features import estimate as estimate_lib
  from features import jobs as jobs_lib
  from features import weights as weights_lib
  config, beam_args = parse_args(argv)
  plan = jobs_lib.plan(config)
  if _runs_remotely(beam_args):
    weights_lib.check_for_remote_workers(
        [(job.backbone, job.weights) for job in plan.jobs if not job.hit], config.weights_dir)
  for job in plan.jobs:
    if job.hit:
      print(f"cache hit: {job.out_dir}")
  hits = [job for job in plan.jobs if job.hit]
  missing = [job for job in plan.jobs if not job.hit]
  if config.estimate:
    _estimate(dataclasses.replace(plan, jobs=tuple(missing)))
    return None
  missing = [dataclasses.replace(job, estimate=estimate_lib.for_job(config.out, job.cache_key))
             for job in missing]
  result = _extract(plan, missing, beam_args) if missing else None
  jobs_lib.write_index(config.out, [*missing, *hits])
  failed = [job for job in missing if not datasets.has_manifest(job.out_dir)]
  if failed:
    raise ValueError(f"more than {config.max_error_fraction:g} of the image records were "
                     f"unusable, so {failed[0].out_dir!r} was not published; see its "
                     "errors.jsonl")
  return result


def _extract(plan: Any, missing: Sequence[Any], beam_args: list[str]) -> Any:
  """Runs the Beam job for the jobs the cache misses; prints each finished dataset's summary."""
  import dataclasses

  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  from features import jobs as jobs_lib
  start = time.time()
  prepared = [dataclasses.replace(jobs_lib.prepare(job), start_time=start) for job in missing]
  for job in prepared:
    print(f"extracting {job.backbone} -> {job.out_dir} (weights {job.weights.kind} from "
          f"{job.weights.source}: {job.weights.path}, sha256 {job.weights.sha256})")
  pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
  run_tag = model_host.new_run_tag()
  build_pipeline(pipeline, dataclasses.replace(plan, jobs=tuple(prepared)), run_tag)
  progress.report("extract", total=sum(count for _, count in plan.shards), unit="img")
  try:
    result = pipeline.run()
    result.wait_until_finish()
  finally:
    model_host.remove_rendezvous_files(run_tag)
  progress.report("extract", done=True)
  for job in prepared:
    if datasets.has_manifest(job.out_dir):
      for line in jobs_lib.summary_lines(job, datasets.read_manifest(job.out_dir)):
        print(line, file=sys.stderr if line.startswith("WARNING") else sys.stdout)
  return result


def main(argv: list[str] | None = None) -> int:
  """`headstart extract`: returns 0 on success (bad flags raise ValueError, printed in one line)."""
  logging.getLogger().setLevel(logging.WARNING)
  run(argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
