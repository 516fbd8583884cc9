"""Stage 3 at scale (issue 14): head training's peak memory under a cache budget, and R8 (a
compare grid reads its data once).

    peak RSS of `headstart train` on feature datasets of 1x and 5x a cache budget (flat: the
    run at 5x caches on local disk instead of memory)
    R8 = wall(compare of 12 pooled-head runs on one dataset: 2 heads x 6 seeds)
         / (the same 12 runs, each run alone: 6 x (linear alone + mlp alone))

Feature datasets are synthetic (VGG16@300 geometry: 9x9x512 float16 maps, 512 pooled floats),
written with the real record schema and manifest code, with a class signal in the maps so the
heads learn something; their statistics are written into the manifest as stage 2 does.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import measure

VGG16_300_MAP = (9, 9, 512)
_BLOCK = 256   # random maps generated per block, reused with a per-record shift
FLAT_TOLERANCE = 0.10


def write_feature_dataset(out: pathlib.Path, count: int, map_shape: Sequence[int] = VGG16_300_MAP,
                          *, shards: int = 4, seed: int = 0) -> pathlib.Path:
  """A stage-2 feature dataset of `count` records (80/10/10 split) plus its `index.json`."""
  import tensorflow as tf

  from contracts import datasets
  from contracts import schema as schema_lib
  from contracts import statistics as stats_lib

  data = out / "synthetic"
  data.mkdir(parents=True, exist_ok=True)
  schema = schema_lib.feature_schema(class_names=("a", "b"), num_keypoints=0, map_shape=map_shape,
                                     pooled_dim=map_shape[-1])
  rng = np.random.default_rng(seed)
  block = rng.normal(0, 1, (_BLOCK, *map_shape)).astype(np.float32)
  splits = {"train": int(count * 0.8), "validation": count // 10}
  splits["test"] = count - sum(splits.values())
  described, accumulators, index = [], {}, 0
  for split, size in splits.items():
    acc = stats_lib.Accumulator.empty()
    per_shard = -(-size // shards)
    for shard in range(shards):
      path = str(data / f"features-{split}.tfrecord-{shard:05d}-of-{shards:05d}")
      with tf.io.TFRecordWriter(path) as writer:
        for _ in range(min(per_shard, size - shard * per_shard)):
          label = index % 2
          fmap = block[index % _BLOCK] + 0.01 * (index // _BLOCK)
          fmap[..., label] += 2.0
          pooled = fmap.mean(axis=(0, 1))
          writer.write(schema.encode({"id": f"{index:064x}", "view": 0, "label": label,
                                      "feature_map": fmap, "pooled": pooled}))
          acc = acc.add(pooled=pooled[None], labels=np.array([label]))
          fmap[..., label] -= 2.0
          index += 1
      described.append(datasets.describe_shard(path, split))
    accumulators[split] = acc
  grouped = datasets.group_shards(described, str(data))
  fingerprint = datasets.fingerprint(grouped)
  datasets.finalize_dataset(str(data), "features", schema.tfds_features(), grouped, {
      "kind": "features", "task": "binary", "class_names": ["a", "b"], "num_keypoints": None,
      "backbone": "synthetic", "weights_kind": "none",
      "cache_key": hashlib.sha256(fingerprint.encode()).hexdigest(),
      "feature_map_shape": list(map_shape), "pooled_dim": map_shape[-1], "store": "both",
      "image_size": 300, "input_size": 300, "fingerprint": fingerprint, "views": 0,
      "statistics": {**stats_lib.finish(accumulators), "fingerprint": fingerprint}})
  (out / "index.json").write_text(json.dumps({"datasets": [
      {"dir": data.name, "backbone": "synthetic", "weights_kind": "none",
       "cache_key": hashlib.sha256(fingerprint.encode()).hexdigest()}]}))
  return data


def records_for_bytes(size: int, map_shape: Sequence[int] = VGG16_300_MAP) -> int:
  """How many records make about `size` bytes of stored features."""
  return max(20, size // (2 * int(np.prod(map_shape)) + 4 * map_shape[-1] + 150))


def train_rss(work: pathlib.Path, budget: int, factors: Sequence[int] = (1, 5), *,
              epochs: int = 2) -> dict[str, Any]:
  """Peak RSS of `headstart train` (gap_dense, in a child process) at `factors` x `budget`."""
  runs = []
  for factor in factors:
    data = write_feature_dataset(work / f"rss_{factor}x", records_for_bytes(factor * budget))
    stored = sum(p.stat().st_size for p in data.glob("*.tfrecord-*"))
    child = measure.run_child("train", [
        "--features", str(data), "--head", "gap_dense", "--epochs", str(epochs), "--quiet",
        "--out", str(work / f"run_{factor}x"), "--cache-budget", str(budget)])
    metrics = json.loads((work / f"run_{factor}x" / "metrics.json").read_text())
    runs.append({"factor": factor, "stored_mb": round(stored / 2**20, 1),
                 # The child's own high-water mark: ru_maxrss would carry this process's.
                 "peak_rss_mb": round(child.usage.get("hwm_mb") or child.max_rss_mb, 1),
                 "seconds": round(child.wall_seconds, 1),
                 "cache": metrics["input_cache"]["where"]})
  low, high = runs[0]["peak_rss_mb"], runs[-1]["peak_rss_mb"]
  growth = high / low - 1 if low else None
  return {"budget_mb": round(budget / 2**20, 1), "runs": runs,
          "growth": None if growth is None else round(growth, 3),
          "flat": growth is not None and growth <= FLAT_TOLERANCE}


def memory_line(entry: dict[str, Any]) -> str:
  """One printable line of `train_rss`."""
  sizes = ", ".join(f"{r['factor']}x ({r['stored_mb']:.0f} MB stored, cache {r['cache']}): "
                    f"{r['peak_rss_mb']:.0f} MB" for r in entry["runs"])
  return (f"MEM train (gap_dense, --cache-budget {entry['budget_mb']:.0f} MB) peak RSS: {sizes} "
          f"({entry['growth']:+.1%}) {'flat' if entry['flat'] else 'NOT flat'} "
          f"(tolerance +{FLAT_TOLERANCE:.0%})")


def r8(work: pathlib.Path, records: int, *, heads: Sequence[str] = ("linear", "mlp"),
       seeds: int = 6, epochs: int = 3,
       repeats: int = 2) -> tuple[measure.Ratio, dict[str, Any]]:
  """Compare wall time of len(heads) x seeds pooled-head runs / the same runs each run alone.

  Each run alone is timed as a new process's run of that cell would be (nothing cached, nothing
  traced; after an untimed warm-up run, so that one-time costs of the process fall on neither
  side): every head is timed alone once (seed 0) and counted once per seed. Both sides are
  measured `repeats` times, interleaved (the heads alone, then the grid, then again), and the
  least time of each counts: this machine's speed swings by up to 2x within minutes, and one
  slow minute on one side alone moved the ratio by 0.2. The details give every sample, and the
  ratio against `runs` x the first head alone (the definition before 2026-11-30: it priced
  every run at the cheapest head's cost).

  The grid runs as `headstart compare` does by default, up to `compare.default_parallel_runs()`
  runs at once; each repeat also times it one run at a time (`parallel_runs=1`), whose ratio
  the details give as `ratio_one_run_at_a_time` (input reuse and shared compiled heads alone).
  """
  from heads import caching, compare, reader, training
  from heads import config as config_lib

  data = write_feature_dataset(work / "r8", records)
  config = config_lib.override(config_lib.Config(), {"train": {"epochs": epochs}})
  with measure.quiet():   # untimed: the process's one-time costs of a first training
    training.train(str(data), heads[0], str(work / "r8_warm_up"),
                   config_lib.override(config, {"train": {"epochs": 1}}), verbose=0,
                   export_model=False)
  spec = reader.load_spec(str(data))
  single: dict[str, list[float]] = {head: [] for head in heads}
  grids: list[float] = []
  one_at_a_time: list[float] = []
  parallel = compare.default_parallel_runs()
  reads: dict[str, float] = {}
  for repeat in range(repeats):
    for head in heads:
      caching.release_shared()   # as in a new process: no parsed input, no compiled head
      started = time.perf_counter()
      with measure.quiet():
        training.train(str(data), head, str(work / f"r8_single_{head}_{repeat}"), config,
                       verbose=0, export_model=False)
      single[head].append(time.perf_counter() - started)
    for parallel_runs, times in ((1, one_at_a_time), (parallel, grids)):
      caching.release_shared()
      out = work / f"r8_grid_{repeat}_{parallel_runs}"
      # A grid finds finished cells of an earlier run in its folder and skips them.
      shutil.rmtree(out, ignore_errors=True)
      before = {split: reader.records_read(str(data), split) for split in spec.splits}
      started = time.perf_counter()
      with measure.quiet():
        compare.compare(str(data.parent), list(heads), str(out), seeds=seeds, config=config,
                        report=False, log=lambda _: None, parallel_runs=parallel_runs)
      times.append(time.perf_counter() - started)
      reads = {split: (reader.records_read(str(data), split) - before[split])
                   / spec.num_examples(split) for split in spec.splits}
  caching.release_shared()
  runs = len(heads) * seeds
  grid = min(grids)
  alone = seeds * sum(min(times) for times in single.values())
  ratio = measure.Ratio(
      "R8", "compare grid / (its runs, each run alone)", measure.ratio_or_none(grid, alone),
      measure.Figure("compare wall", grid, "s"),
      measure.Figure(f"{runs} runs each alone", alone, "s"), target=0.5,
      comparison="<=", details={"runs": runs, "records": records, "heads": list(heads),
                                       "seeds": seeds, "epochs": epochs, "repeats": repeats,
                                       "parallel_runs": parallel,
                                       "grid_seconds": [round(value, 2) for value in grids],
                                       "grid_seconds_one_run_at_a_time": [
                                           round(value, 2) for value in one_at_a_time],
                                       "ratio_one_run_at_a_time": round(
                                           min(one_at_a_time) / alone, 3),
                                       "single_run_seconds": {
                                           head: [round(value, 2) for value in times]
                                           for head, times in single.items()},
                                       "ratio_vs_first_head_alone": round(
                                           grid / (runs * min(single[heads[0]])), 3),
                                       "full_reads_per_split": reads})
  return ratio, reads
