"""R7 (storage efficiency): bytes on disk per feature record over the raw tensor bytes.

    python -m benchmarks --quick        # R7 line

The denominator counts every stored tensor at its stored dtype: the float16 feature map and the
float32 pooled vector. The numerator is what the shards take on disk (TFRecord framing, the
Example protobuf, the 64-character id, label and view included), from the manifest.
Judged on VGG16@300's geometry (9x9x512 map + 512 pooled), written by the real record encoder
(`features.records.encode_feature_record`) with TFRecord framing; every feature dataset the run
extracted is reported too (small maps carry the same ~150 fixed bytes over fewer tensor bytes).
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import measure

VGG16_300_MAP = (9, 9, 512)


def raw_tensor_bytes(map_shape: Sequence[int], pooled_dim: int, store: str = "both") -> int:
  """Bytes of the stored tensors of one record: float16 map and/or float32 pooled vector.

  Raises:
    ValueError: unknown `store`.
  """
  if store not in ("both", "maps", "pooled"):
    raise ValueError(f"store {store!r} is not one of both, maps, pooled")
  total = 0
  if store in ("both", "maps"):
    total += int(np.prod(map_shape)) * 2
  if store in ("both", "pooled"):
    total += int(pooled_dim) * 4
  return total


def dataset_storage(feature_dir: str) -> dict[str, Any]:
  """Bytes per record on disk (all shards, from the manifest) vs raw tensor bytes."""
  manifest = json.loads((pathlib.Path(feature_dir) / "manifest.json").read_text())
  records = sum(split["num_examples"] for split in manifest["splits"].values())
  on_disk = sum(shard["num_bytes"] for split in manifest["splits"].values()
                for shard in split["shards"])
  raw = raw_tensor_bytes(manifest["feature_map_shape"], manifest["pooled_dim"],
                         manifest.get("store", "both"))
  per_record = on_disk / records
  return {"records": records, "bytes_per_record": per_record, "raw_tensor_bytes": raw,
          "ratio": per_record / raw, "overhead_bytes": per_record - raw,
          "feature_map_shape": manifest["feature_map_shape"], "pooled_dim": manifest["pooled_dim"],
          "backbone": manifest.get("backbone"), "input_size": manifest.get("input_size")}


def write_reference_records(path: pathlib.Path, count: int,
                            map_shape: Sequence[int] = VGG16_300_MAP) -> int:
  """Writes `count` feature records of `map_shape` with the real encoder; returns file bytes.

  TFRecord framing is the same 16 bytes per record whether Beam's WriteToTFRecord or
  `tf.io.TFRecordWriter` writes it.
  """
  import tensorflow as tf

  from contracts import schema as schema_lib
  from features import records
  if count <= 0:
    raise ValueError(f"count must be positive, got {count!r}")
  rng = np.random.default_rng(0)
  path.parent.mkdir(parents=True, exist_ok=True)
  schema = schema_lib.feature_schema(class_names=("a", "b"), num_keypoints=0,
                                     map_shape=map_shape, pooled_dim=map_shape[-1])
  with tf.io.TFRecordWriter(str(path)) as writer:
    for index in range(count):
      feature_map = rng.standard_normal(map_shape).astype(np.float16)
      record = records.ImageRecord(id=f"{index:064x}", split="train", view=0,
                                   image=np.zeros((1, 1, 3), np.uint8), label=index % 2)
      writer.write(records.encode_feature_record(
          schema, record, feature_map, feature_map.astype(np.float32).mean(axis=(0, 1))))
  return path.stat().st_size


def r7(work_dir: pathlib.Path, feature_dirs: Sequence[str] = (), count: int = 64,
       map_shape: Sequence[int] = VGG16_300_MAP) -> measure.Ratio:
  """R7 on reference records of `map_shape`, plus every extracted dataset given."""
  total = write_reference_records(work_dir / "reference_features.tfrecord", count, map_shape)
  raw = raw_tensor_bytes(map_shape, map_shape[-1])
  per_record = total / count
  datasets = {}
  for directory in feature_dirs:
    datasets[pathlib.Path(directory).name] = dataset_storage(directory)
  shape = "x".join(str(d) for d in map_shape)
  return measure.Ratio(
      "R7", f"storage per feature record ({shape} f16 + {map_shape[-1]} f32)",
      per_record / raw,
      measure.Figure("bytes on disk per record", per_record, "B"),
      measure.Figure("raw tensor bytes", raw, "B"),
      1.01, "<=", details={"extracted_datasets": datasets, "overhead_bytes": per_record - raw},
      notes="real record encoder + TFRecord framing; extracted datasets of this run in details")
