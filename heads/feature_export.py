"""Features out of headstart: pooled vectors (and maps on request) with ids, labels and splits
as NumPy `.npy` files or Parquet, for scikit-learn or any tool without TensorFlow.

    headstart features export DATA/features/vgg16-imagenet-3fa2c1d0 --out vgg16_npy
    headstart features export DIR --out vgg16.parquet_dir --format parquet --maps

npy: `OUT/<split>/ids.npy` (64-byte ids), `labels.npy` (int64) or `targets.npy` ((N, K, 2)
float32), `pooled.npy` ((N, C) float32), `maps.npy` ((N, H, W, C) float16, with `--maps`), and
`OUT/export.json` (class names, shapes, counts, the dataset's cache key). Each array is opened
as a memory map of its final shape (counts come from the manifest) and filled batch by batch.
Parquet: `OUT/<split>.parquet`, one row per example (`id`, `split`, `label` or `targets`,
`pooled`, optionally `feature_map` as float16 bytes), written one row group per batch. Memory
stays bounded by one batch either way. Augmented views (view > 0) are left out unless `views`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from contracts import datasets
from heads import reader

FORMATS = ("npy", "parquet")
_BATCH = 1024


def _batches(spec: reader.DatasetSpec, split: str, keys: Sequence[str],
             views: bool) -> Iterator[dict[str, np.ndarray]]:
  filter_views = "view" in spec.schema.names and not views
  parse = spec.schema.batch_parser([*keys, *(("view",) if filter_views else ())],
                                   maps_as=tf.float16)
  files = datasets.shard_paths(spec.data_dir, spec.manifest, split)
  for batch in tf.data.TFRecordDataset(files).batch(_BATCH).map(parse).as_numpy_iterator():
    if filter_views:
      keep = batch.pop("view") == 0
      batch = {key: value[keep] for key, value in batch.items()}
    yield batch


def _keys(spec: reader.DatasetSpec, maps: bool) -> list[str]:
  keys = ["id", spec.target_key]
  if "pooled" in spec.schema.names:
    keys.append("pooled")
  if maps:
    if "feature_map" not in spec.schema.names:
      raise ValueError(f"{spec.data_dir!r} stores no feature maps (store="
                       f"{spec.manifest.get('store')!r}); export without --maps")
    keys.append("feature_map")
  return keys


_NPY_NAMES = {"id": "ids", "label": "labels", "targets": "targets", "pooled": "pooled",
              "feature_map": "maps"}


def _write_npy(spec: reader.DatasetSpec, split: str, out: str, keys: Sequence[str],
               views: bool) -> int:
  count = spec.num_examples(split, views=views)
  folder = f"{out}/{split}"
  tf.io.gfile.makedirs(folder)
  shapes = {"id": ((), "S64"), "label": ((), np.int64),
            "targets": ((spec.num_keypoints, 2), np.float32),
            "pooled": ((spec.pooled_dim or 0,), np.float32),
            "feature_map": (tuple(spec.feature_map_shape or ()), np.float16)}
  arrays = {key: np.lib.format.open_memmap(f"{folder}/{_NPY_NAMES[key]}.npy", mode="w+",
                                           dtype=shapes[key][1], shape=(count, *shapes[key][0]))
            for key in keys}
  written = 0
  for batch in _batches(spec, split, keys, views):
    size = len(batch["id"])
    if written + size > count:
      raise datasets.DatasetError(f"split {split!r} of {spec.data_dir!r} holds more records "
                                  f"than its manifest's {count}")
    for key in keys:
      value = batch[key].reshape(size, *shapes[key][0]) if key == "targets" else batch[key]
      arrays[key][written:written + size] = value
    written += size
  for array in arrays.values():
    array.flush()
  if written != count:
    raise datasets.DatasetError(f"split {split!r} of {spec.data_dir!r} holds {written} records; "
                                f"its manifest says {count}")
  return written


def _write_parquet(spec: reader.DatasetSpec, split: str, out: str, keys: Sequence[str],
                   views: bool) -> int:
  import pyarrow as pa
  import pyarrow.parquet as pq

  tf.io.gfile.makedirs(out)
  writer, written = None, 0
  try:
    for batch in _batches(spec, split, keys, views):
      size = len(batch["id"])
      columns = {"id": pa.array([value.decode() for value in batch["id"]]),
                 "split": pa.array([split] * size)}
      if "label" in batch:
        columns["label"] = pa.array(batch["label"])
      if "targets" in batch:
        columns["targets"] = pa.FixedSizeListArray.from_arrays(
            pa.array(batch["targets"].reshape(-1)), 2 * spec.num_keypoints)
      if "pooled" in batch:
        columns["pooled"] = pa.FixedSizeListArray.from_arrays(
            pa.array(batch["pooled"].reshape(-1)), int(spec.pooled_dim))
      if "feature_map" in batch:
        columns["feature_map"] = pa.array([row.tobytes() for row in batch["feature_map"]],
                                          pa.binary())
      table = pa.table(columns)
      if writer is None:
        writer = pq.ParquetWriter(f"{out}/{split}.parquet", table.schema)
      writer.write_table(table)
      written += size
  finally:
    if writer is not None:
      writer.close()
  return written


def export_features(data_dir: str, out: str, *, fmt: str = "npy", maps: bool = False,
                    views: bool = False) -> dict[str, Any]:
  """Writes every split of a feature dataset to `out`; returns what `export.json` holds.

  Raises:
    ValueError: unknown format, not a feature dataset, or no maps stored when `maps`.
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
  if "://" in out:
    # Memory-mapped .npy and the Parquet writer need a local folder; copy the result after.
    raise ValueError(f"--out {out!r} must be a local folder")
  spec = reader.load_spec(data_dir)
  if spec.kind != "features":
    raise ValueError(f"{data_dir!r} is an image dataset; export reads feature datasets")
  keys = _keys(spec, maps)
  write = _write_npy if fmt == "npy" else _write_parquet
  out = out.rstrip("/")
  counts = {split: write(spec, split, out, keys, views) for split in spec.splits}
  summary = {"dataset": spec.data_dir, "cache_key": spec.cache_key, "format": fmt,
             "backbone": spec.backbone, "weights_kind": spec.weights_kind, "task": spec.task,
             "class_names": list(spec.class_names), "num_keypoints": spec.num_keypoints,
             "pooled_dim": spec.pooled_dim, "feature_map_shape": spec.feature_map_shape,
             "keys": keys, "views": views, "counts": counts}
  datasets.write_json(f"{out}/export.json", summary)
  return summary
