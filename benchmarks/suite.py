"""The benchmark run: every ratio (R1-R8, R3s, LATENCY), peak RSS and extract's 1- vs 2-worker
rate on one image shard, one line each, and a JSON record.

    python -m benchmarks --quick --json out/bench.json     # < 5 min on 2 cores
    python -m benchmarks --json out/bench_full.json        # full sizes (VGG16@300, 5000 images), ~9 min

Order matters only for reuse: the ingest memory runs produce the image datasets the extract
memory runs read, and those produce the feature datasets R6 and R7 use; the VGG16 extract runs
of R1 produce the datasets R5 uses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

# TensorFlow's C++ start-up notes would interleave with the ratio lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import (  # noqa: E402 (after the environment setting above)
    driver_bench, extract_bench, heads_bench, heads_scale_bench, images, ingest_bench,
    ingest_http_bench, measure, storage_bench)

RATIO_KEYS = ("R1", "R2", "R3", "R3s", "LATENCY", "R4", "R5", "R6", "R7", "R8")
# Peak RSS counts as flat when the larger dataset grows it by at most this fraction.
FLAT_RSS_TOLERANCE = 0.10


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """Sizes of one run; `quick()` fits 5 minutes on 2 cores, `full()` uses the reference sizes."""
  quick: bool
  source_sizes: tuple[tuple[int, int], ...]
  ingest_size: int
  memory_sizes: tuple[int, int]
  ingest_runs: tuple[ingest_bench.IngestRun, ...]
  mobilenet_size: int
  vgg_size: int
  vgg_source_size: tuple[int, int]
  vgg_counts: tuple[int, int]
  batch_size: int
  naive_count: int
  bare_seconds: float
  e2e_images: int
  cached_epochs: int
  r6_epochs: int
  r6_passes: int
  extract_repeats: int   # R1 extract runs per size (fastest counts)
  scaling: tuple[str, int, int]  # (backbone, input size, images) of the 1-shard worker runs
  # The ingest launcher at two source sizes (issue 16.2): the same in both modes, it is cheap.
  driver_tree_sizes: tuple[int, int] = (2_000, 20_000)
  driver_csv_sizes: tuple[int, int] = (20_000, 200_000)
  heads_budget_mb: int = 128   # head training's cache budget; datasets of 1x and 5x it
  # Records of the R8 grid's dataset (VGG16@300 maps): the issue's >= 20,000 in both modes (the
  # grid and its runs alone take ~100 s; at 4,000 per-run fixed costs dominate both sides).
  r8_records: int = 20_000
  # Ingest from loopback HTTP (issue 17): rows at the two sizes, seconds added per response,
  # runs per size (the least CPU counts). 10,000 in both modes: at 5,000 (~1.8 s of fetching)
  # the first and last round trips at 100 ms were a tenth of the job, and the marginal CPU over
  # 4,000 rows moved by up to 0.1 ms per image from run to run.
  http_sizes: tuple[int, int] = (1000, 10_000)
  http_latency: float = 0.1
  http_repeats: int = 2

  @classmethod
  def quick_config(cls) -> SuiteConfig:
    """Sizes that fit 5 minutes on 2 shared cores (each shrink is named in the output)."""
    memory = (200, 1000)
    return cls(
        quick=True, source_sizes=((1024, 768), (2048, 1536)), ingest_size=300,
        memory_sizes=memory,
        # multi_processing costs ~25 s of worker start-up per run here: full run only.
        ingest_runs=(ingest_bench.IngestRun("multi_threading", 2, memory, repeats=2),),
        mobilenet_size=96, vgg_size=96, vgg_source_size=(320, 240), vgg_counts=(64, 256),
        batch_size=64, naive_count=24, bare_seconds=2.0, e2e_images=64, cached_epochs=5,
        r6_epochs=10, r6_passes=5, extract_repeats=2, scaling=("mobilenet_v2", 96, 2048))

  @classmethod
  def full_config(cls) -> SuiteConfig:
    """The reference sizes of the anchors: VGG16@300, MobileNetV2@224, 500/5000 images."""
    memory = (500, 5000)
    other = (496, 2000)
    return cls(
        quick=False, source_sizes=((1024, 768), (2048, 1536)), ingest_size=300,
        memory_sizes=memory,
        ingest_runs=(ingest_bench.IngestRun("multi_threading", 2, memory),
                     ingest_bench.IngestRun("multi_threading", 2, other, ("--decode-timeout", "0")),
                     ingest_bench.IngestRun("multi_processing", 1, other),
                     ingest_bench.IngestRun("multi_processing", 2, other)),
        mobilenet_size=224, vgg_size=300, vgg_source_size=(640, 480), vgg_counts=(64, 192),
        batch_size=32, naive_count=40, bare_seconds=6.0, e2e_images=64, cached_epochs=5,
        r6_epochs=10, r6_passes=5, extract_repeats=1, scaling=("mobilenet_v2", 224, 2000),
        heads_budget_mb=512, http_sizes=(2000, 10_000), http_repeats=3)


def _progress(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _memory_entry(stage: str, by_size: dict[int, dict[str, Any]]) -> dict[str, Any]:
  """Peak RSS at two dataset sizes; flat is judged on the whole process tree's summed RSS."""
  (small, low), (large, high) = sorted(by_size.items())
  growth = high["tree_rss_mb"] - low["tree_rss_mb"]
  return {"stage": stage,
          "tree_rss_mb": {str(small): low["tree_rss_mb"], str(large): high["tree_rss_mb"]},
          "main_process_rss_mb": {str(small): low["max_rss_mb"], str(large): high["max_rss_mb"]},
          "processes": {str(small): low["processes"], str(large): high["processes"]},
          "growth_mb": growth, "growth_mb_per_1000_images": growth / (large - small) * 1000,
          "flat": growth <= FLAT_RSS_TOLERANCE * low["tree_rss_mb"]}


def _memory_line(entry: dict[str, Any]) -> str:
  sizes = ", ".join(f"{n} images {mb:.0f} MB" for n, mb in entry["tree_rss_mb"].items())
  main = ", ".join(f"{mb:.0f}" for mb in entry["main_process_rss_mb"].values())
  verdict = "flat" if entry["flat"] else "NOT flat"
  return (f"MEM {entry['stage']} peak RSS (process tree): {sizes} "
          f"({entry['growth_mb_per_1000_images']:+.1f} MB per 1000 images; main process {main} "
          f"MB) {verdict} (tolerance +{FLAT_RSS_TOLERANCE:.0%})")


def _ingest_small_dataset(source_dir: pathlib.Path, jpegs: list[bytes], count: int,
                          out: pathlib.Path, size: int, *flags: str) -> pathlib.Path:
  from pipeline import run as ingest
  manifest = images.write_corpus(source_dir, jpegs, count)
  with measure.quiet():
    ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", str(size), *flags])
  return out


def run(config: SuiteConfig, work: pathlib.Path) -> dict[str, Any]:
  """Measures everything under `work`; returns the JSON-ready result."""
  started = time.perf_counter()
  result: dict[str, Any] = {"mode": "quick" if config.quick else "full",
                            "machine": measure.machine()}
  _progress("generating photo-like JPEGs")
  jpegs = images.distinct_jpegs(config.source_sizes)
  sizes = sorted({s for run in config.ingest_runs for s in run.sizes})
  manifests = {n: images.write_corpus(work / "corpus", jpegs, n) for n in sizes}

  _progress("R3/R4: ingest child runs " + ", ".join(
      f"{r.mode}x{r.workers}@{r.sizes}" for r in config.ingest_runs))
  runs = ingest_bench.measure_runs(config.ingest_runs, manifests, work, config.ingest_size)
  r3, r4 = ingest_bench.ratios(runs, jpegs, config.ingest_size, config.source_sizes,
                               config.quick)
  memory_run = runs[0]
  memory = [_memory_entry(f"ingest ({memory_run['label']})",
                          memory_run["by_size"])]

  _progress(f"R2/memory: extract MobileNetV2@{config.mobilenet_size} child runs")
  image_dirs = {n: memory_run["by_size"][n]["out"] for n in config.memory_sizes}
  mobile = extract_bench.child_extract(image_dirs, work, "mobilenet_v2", config.mobilenet_size,
                                       config.batch_size)
  memory.append(_memory_entry("extract (MobileNetV2)",
                              mobile["by_size"]))
  model = extract_bench.build_model("mobilenet_v2", config.mobilenet_size)
  bare_wall, bare_cpu = extract_bench.bare_forward_rate(model, config.mobilenet_size,
                                                        config.batch_size, config.bare_seconds)
  mobile.update(
      input_size=config.mobilenet_size, batch_size=config.batch_size, bare_rate=bare_wall,
      bare_images_per_cpu_second=bare_cpu)
  mobile["naive_rate"], mobile["naive_images_per_cpu_second"] = extract_bench.naive_predict_rate(
      model, config.mobilenet_size, config.naive_count)
  del model

  _progress(f"R1: extract VGG16@{config.vgg_size} in process at {config.vgg_counts} images")
  vgg_jpegs = images.distinct_jpegs([config.vgg_source_size])
  vgg_images = {n: _ingest_small_dataset(work / "vgg_corpus", vgg_jpegs, n,
                                         work / f"vgg_images_{n}", config.vgg_size)
                for n in config.vgg_counts}
  vgg = extract_bench.extract_vs_bare_in_process(vgg_images, work, "vgg16", config.vgg_size,
                                                 config.batch_size, config.bare_seconds,
                                                 config.extract_repeats)
  r1 = extract_bench.r1(vgg, mobile, config.quick)
  r2 = extract_bench.r2(mobile, config.quick)

  backbone, size, count = config.scaling
  _progress(f"SCALE: extract {backbone}@{size}, {count} images in one shard, 1 and 2 workers")
  one_shard = _ingest_small_dataset(work / "vgg_corpus", vgg_jpegs, count,
                                    work / f"one_shard_images_{size}", size,
                                    "--splits", "train=100", "--num-shards", "1")
  scaling = extract_bench.worker_scaling(one_shard, work, backbone, size, config.batch_size)

  _progress(f"R3s/LATENCY: ingest from loopback HTTP, {config.http_sizes} URLs at 0 and "
            f"{config.http_latency * 1e3:g} ms per response")
  r3s, latency = ingest_http_bench.ratios(work / "http", sizes=config.http_sizes,
                                          latency=config.http_latency,
                                          repeats=config.http_repeats)

  _progress("R5: end-to-end vs cached head epochs")
  vgg_features = vgg["feature_dirs"][max(config.vgg_counts)]
  r5 = heads_bench.r5(vgg_features, batch_size=config.batch_size, e2e_images=config.e2e_images,
                      cached_epochs=config.cached_epochs, input_size=config.vgg_size,
                      quick=config.quick)

  _progress("R6: reader pipeline vs in-memory arrays")
  mobile_features = mobile["by_size"][max(config.memory_sizes)]["feature_dir"]
  r6 = heads_bench.r6(mobile_features, head="gap_dense", batch_size=config.batch_size,
                      epochs=config.r6_epochs, passes=config.r6_passes)

  _progress("R7: storage")
  r7 = storage_bench.r7(work, [vgg_features, mobile_features])

  _progress(f"DRIVER: ingest launcher for trees of {config.driver_tree_sizes} files and CSVs of "
            f"{config.driver_csv_sizes} rows")
  driver = driver_bench.measure_launcher(work / "driver", config.driver_tree_sizes,
                                         config.driver_csv_sizes)

  _progress(f"heads at scale: train peak RSS at 1x/5x a {config.heads_budget_mb} MB cache "
            f"budget; R8 grid of 12 runs on {config.r8_records} records")
  heads_rss = heads_scale_bench.train_rss(work / "heads_scale", config.heads_budget_mb << 20)
  r8, _ = heads_scale_bench.r8(work / "heads_scale", config.r8_records)
  result["heads_train_memory"] = heads_rss

  ratios = (r1, r2, r3, r3s, latency, r4, r5, r6, r7, r8)
  for ratio in ratios:
    result[ratio.key] = ratio.to_dict()
  result["memory"] = memory
  result["extract_workers"] = scaling
  result["driver"] = driver
  result["seconds"] = time.perf_counter() - started
  result["load_average_at_end"] = os.getloadavg()
  result["lines"] = [r.line() for r in ratios] + [ingest_http_bench.phase_line(r3s, latency)] + [
      _memory_line(m) for m in memory] + [extract_bench.scaling_line(scaling),
                                          heads_scale_bench.memory_line(heads_rss)] + [
          driver_bench.line(d) for d in driver]
  return result


def markdown_table(result: dict[str, Any]) -> str:
  """The ratio table of one run as Markdown (pasted into benchmarks/README.md)."""
  rows = ["| ratio | value | target | verdict | numerator | denominator |",
          "|---|---|---|---|---|---|"]
  for key in RATIO_KEYS:
    if key not in result:  # a record from before the ratio existed
      continue
    ratio = result[key]
    value = "n/a" if ratio["value"] is None else f"{ratio['value']:.4g}"
    verdict = "meets" if ratio["meets_target"] else "**misses**"
    figures = [f"{f['label']}: {f['value']:.4g} {f['unit']}"
               for f in (ratio["numerator"], ratio["denominator"])]
    rows.append(f"| {key} {ratio['name']} | {value} | {ratio['comparison']} {ratio['target']:g} "
                f"| {verdict} | {figures[0]} | {figures[1]} |")
  for entry in result["memory"]:
    sizes = " / ".join(f"{n}: {mb:.0f} MB" for n, mb in entry["tree_rss_mb"].items())
    rows.append(f"| peak RSS {entry['stage']} | {entry['growth_mb_per_1000_images']:+.1f} MB per "
                f"1000 images | flat (+{FLAT_RSS_TOLERANCE:.0%}) | "
                f"{'meets' if entry['flat'] else '**misses**'} | {sizes} | process tree |")
  for entry in result.get("driver", []):
    small, large = (str(n) for n in entry["sizes"])
    rows.append(f"| ingest launcher, {entry['source']} | RSS {entry['rss_growth']:+.1%}, proto "
                f"{entry['proto_growth']:+.1%} | flat (+{driver_bench.FLAT_TOLERANCE:.0%}) | "
                f"{'meets' if entry['flat'] else '**misses**'} | {small} rows: "
                f"{entry['max_rss_mb'][small]:.0f} MB, {entry['proto_bytes'][small] / 1024:.0f} "
                f"KiB | {large} rows: {entry['max_rss_mb'][large]:.0f} MB, "
                f"{entry['proto_bytes'][large] / 1024:.0f} KiB |")
  return "\n".join(rows) + "\n"


def build_parser() -> argparse.ArgumentParser:
  """The `python -m benchmarks` flags."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                   description="headstart ratio benchmarks (R1-R8, R3s, LATENCY) and peak RSS")
  parser.add_argument("--quick", action="store_true",
                      help="small sizes (~2.5 min on 2 cores); the full run takes ~9 min")
  parser.add_argument("--json", default=None, help="write the results here as JSON")
  parser.add_argument("--markdown", default=None, help="also write the ratio table here")
  parser.add_argument("--work-dir", default=None,
                      help="keep generated images and datasets here (default: a temp dir)")
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the suite, prints one line per ratio and memory check; returns 0 (misses included:
  they are results, not failures)."""
  args = build_parser().parse_args(argv)
  config = SuiteConfig.quick_config() if args.quick else SuiteConfig.full_config()
  if args.work_dir:
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    result = run(config, work)
  else:
    with tempfile.TemporaryDirectory(prefix="headstart-bench-") as tmp:
      result = run(config, pathlib.Path(tmp))
  info = result["machine"]
  print(f"headstart benchmarks ({result['mode']}) on {info['cpu_model']}, {info['cores']} cores, "
        f"1-min load average {info['load_average'][0]:.2f} at start, "
        f"{result['load_average_at_end'][0]:.2f} at end, {result['seconds']:.0f}s")
  for line in result["lines"]:
    print(line)
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    print(f"results: {path}")
  if args.markdown:
    path = pathlib.Path(args.markdown)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(result))
  return 0
