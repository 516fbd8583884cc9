"""Sharded TFRecord datasets in TFDS layout, shared by stage 1 (images) and stage 2 (features).

A dataset directory holds TFDS-named shards `{name}-{split}.tfrecord-{SSSSS}-of-{NNNNN}`,
`dataset_info.json` + `features.json` (via `tfds.folder_dataset.write_metadata`, so
`tfds.builder_from_directory(dir)` loads it) and `manifest.json`, written **last**: every shard
with its record count, byte size and sha256, plus the schema/code version and whatever the
stage adds (counts, cache key...). A directory without `manifest.json` is not a dataset:
readers go through `read_manifest()` / `shard_paths()`, never a glob.

All I/O goes through `tf.io.gfile`, so `out_dir` may be local or `gs://`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import tensorflow as tf

SCHEMA_VERSION = 1
CODE_VERSION = "0.1.0"
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation",
                 "train": "train", "validation": "validation", "test": "test"}
# Beam replaces the S/N runs with the shard index and count; the rest is literal.
_SHARD_NAME_TEMPLATE = ".tfrecord-SSSSS-of-NNNNN"
_TFDS_FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_HASH_CHUNK_BYTES = 8 << 20


class DatasetError(ValueError):
  """A dataset directory is missing, incomplete or does not match what the caller expects."""


def canonical_split(name: str) -> str:
  """Maps a split name or alias (`val`, `valid`, `dev`) to TFDS's `train`/`validation`/`test`.

  Raises:
    ValueError: the name is not a known split.
  """
  key = name.strip().lower()
  if key not in SPLIT_ALIASES:
    raise ValueError(f"unknown split {name!r}; allowed: train, validation (val, valid, dev), test")
  return SPLIT_ALIASES[key]


# ---------------------------------------------------------------------------------------------
# tf.train.Example encoding (the same wire format TFDS' feature connectors produce)


def to_example(values: Mapping[str, Any]) -> bytes:
  """Serializes a flat mapping to a `tf.train.Example`.

  `bytes`/`str` become a BytesList, `int`/`bool` an Int64List, `float` a FloatList and numpy
  arrays a list of their dtype kind (flattened); `np.ndarray` of bytes dtype is not supported.
  Big tensors must be passed as raw `bytes` (TFDS `Tensor(encoding='bytes')`), never floats.
  """
  feature = {}
  for key, value in values.items():
    if isinstance(value, str):
      value = value.encode("utf-8")
    if isinstance(value, bytes):
      feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    elif isinstance(value, (bool, int, np.integer)):
      feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    elif isinstance(value, (float, np.floating)):
      feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
    elif isinstance(value, np.ndarray) and value.dtype.kind in "iub":
      feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=value.ravel().tolist()))
    elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
      feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=value.ravel().tolist()))
    else:
      raise TypeError(f"cannot encode feature {key!r} of type {type(value).__name__}")
  # deterministic=True: the feature map's entries are otherwise written in an order that changes
  # from process to process, so re-ingesting the same images gave other shard bytes, another
  # dataset fingerprint, and a feature-cache miss downstream.
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
      deterministic=True)


# ---------------------------------------------------------------------------------------------
# Writing


def shard_prefix(out_dir: str, name: str, split: str) -> str:
  """Path prefix Beam appends `.tfrecord-SSSSS-of-NNNNN` to."""
  return f"{out_dir.rstrip('/')}/{name}-{split}"


def file_sha256(path: str) -> str:
  """Hex sha256 of a file, read in chunks through `tf.io.gfile`."""
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def count_records(path: str) -> int:
  """Counts the records of a TFRecord file; raises `tf.errors.DataLossError` if it is corrupt."""
  dataset = tf.data.TFRecordDataset(path)
  return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


def describe_shard(path: str, split: str, *, chunk_bytes: int = _HASH_CHUNK_BYTES
                   ) -> dict[str, Any]:
  """Record count, size and sha256 of one freshly written shard, in a single read.

  The count walks the TFRecord framing (8-byte little-endian length, 4-byte length CRC, data,
  4-byte data CRC) while the bytes are hashed; CRCs are checked later by readers and by
  `headstart verify`.

  Raises:
    DatasetError: the file ends inside a record.
  """
  digest, size, count, next_record, tail = hashlib.sha256(), 0, 0, 0, b""
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
      chunk_start, size = size, size + len(chunk)
      # `tail` holds the bytes from `next_record` up to this chunk when a header straddles.
      window, window_start = (tail + chunk, chunk_start - len(tail)) if tail else (chunk,
                                                                                  chunk_start)
      while next_record + 8 <= size:
        offset = next_record - window_start
        length = int.from_bytes(window[offset:offset + 8], "little")
        next_record += 8 + 4 + length + 4
        count += 1
      tail = window[next_record - window_start:] if next_record < size else b""
  if next_record != size:
    raise DatasetError(f"shard {path!r} ends inside a record ({size} bytes; the framing "
                       f"expects {next_record})")
  return {"split": split, "file": path.rstrip("/").rsplit("/", 1)[-1], "num_examples": count,
          "num_bytes": size, "sha256": digest.hexdigest()}


class WriteSplits(beam.PTransform):
  """(split, serialized Example) -> one shard description dict per shard written.

  Each split goes to its own TFDS-named shard set. Splits that get no records still produce one
  empty shard from Beam's sink; `finalize_dataset` deletes those so empty splits never appear.
  """

  def __init__(self, out_dir: str, name: str, *, splits: Sequence[str] = SPLITS,
               num_shards: int = 0):
    super().__init__()
    self._out_dir = out_dir
    self._name = name
    self._splits = tuple(splits)
    self._num_shards = num_shards

  def expand(self, pcoll):
    splits = self._splits
    parts = pcoll | "PartitionBySplit" >> beam.Partition(
        lambda kv, _: splits.index(kv[0]), len(splits))
    described = []
    for split, part in zip(splits, parts):
      files = (
          part
          | f"DropSplitKey[{split}]" >> beam.Values()
          | f"WriteShards[{split}]" >> beam.io.WriteToTFRecord(
              shard_prefix(self._out_dir, self._name, split),
              shard_name_template=_SHARD_NAME_TEMPLATE,
              num_shards=self._num_shards))
      described.append(files | f"DescribeShards[{split}]" >> beam.Map(describe_shard, split=split))
    return described | "MergeShardLists" >> beam.Flatten()


def _shard_index(file_name: str) -> int:
  # "...tfrecord-00003-of-00008" -> 3
  return int(file_name.rsplit("-", 3)[-3])


def group_shards(shards: Iterable[Mapping[str, Any]], out_dir: str) -> dict[str, list[dict]]:
  """Groups shard descriptions by split in shard order, deleting splits with no records."""
  by_split: dict[str, list[dict]] = {}
  for shard in shards:
    by_split.setdefault(shard["split"], []).append(dict(shard))
  result = {}
  for split in SPLITS:
    entries = sorted(by_split.get(split, []), key=lambda s: _shard_index(s["file"]))
    if sum(s["num_examples"] for s in entries) == 0:
      for entry in entries:
        tf.io.gfile.remove(f"{out_dir}/{entry['file']}")
      continue
    result[split] = entries
  return result


def fingerprint(shards_by_split: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
  """sha256 over every shard's sha256, in split and shard order: identifies a dataset's content."""
  digest = hashlib.sha256()
  for split in sorted(shards_by_split):
    for shard in shards_by_split[split]:
      digest.update(f"{split}:{shard['sha256']}\n".encode())
  return digest.hexdigest()


def write_json(path: str, payload: Any) -> None:
  """Writes JSON through a temporary name then renames, so readers never see half a file."""
  tmp = f"{path}.tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(payload, indent=2, sort_keys=True, default=str))
  tf.io.gfile.rename(tmp, path, overwrite=True)


def finalize_dataset(out_dir: str, name: str, features: Any,
                     shards_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
                     extra: Mapping[str, Any], *, description: str = "") -> dict[str, Any]:
  """Writes TFDS metadata, then `manifest.json` last; returns the manifest.

  Args:
    out_dir: dataset directory holding the shards.
    name: dataset name used in the shard file names.
    features: a `tfds.features.FeaturesDict` describing one record.
    shards_by_split: output of `group_shards`.
    extra: stage-specific manifest fields (counts, cache key, ...).
    description: free text for `dataset_info.json`.
  """
  # Imported here: TFDS is slow to import and only the finalising step needs it.
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import naming

  template = naming.ShardedFileTemplate(
      data_dir=out_dir, template=_TFDS_FILENAME_TEMPLATE, dataset_name=name,
      filetype_suffix="tfrecord")
  split_infos = [
      tfds.core.SplitInfo(name=split, shard_lengths=[s["num_examples"] for s in entries],
                          num_bytes=sum(s["num_bytes"] for s in entries),
                          filename_template=template.replace(split=split))
      for split, entries in shards_by_split.items()
  ]
  if not split_infos:
    raise DatasetError(f"no records were written to {out_dir!r}: every input was dead-lettered")
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=features, split_infos=split_infos, filename_template=template,
      check_data=False, description=description)
  manifest = {
      "schema_version": SCHEMA_VERSION,
      "code_version": CODE_VERSION,
      "name": name,
      "splits": {
          split: {"num_examples": sum(s["num_examples"] for s in entries),
                  "shards": [{k: v for k, v in s.items() if k != "split"} for s in entries]}
          for split, entries in shards_by_split.items()
      },
      **extra,
  }
  write_json(f"{out_dir}/{MANIFEST_NAME}", manifest)
  return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def has_manifest(data_dir: str) -> bool:
  """True when `data_dir` holds a complete dataset (its manifest was written)."""
  return tf.io.gfile.exists(f"{data_dir.rstrip('/')}/{MANIFEST_NAME}")


def read_manifest(data_dir: str) -> dict[str, Any]:
  """Loads `manifest.json` of a dataset directory.

  Raises:
    DatasetError: the manifest is missing or unreadable (an interrupted job or not a dataset).
  """
  path = f"{data_dir.rstrip('/')}/{MANIFEST_NAME}"
  if not tf.io.gfile.exists(path):
    raise DatasetError(
        f"{data_dir!r} has no {MANIFEST_NAME}: it is not a complete headstart dataset "
        "(the job that wrote it did not finish, or the path is wrong)")
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DatasetError(f"{path!r} is not valid JSON: {error}") from error
  if manifest.get("schema_version") != SCHEMA_VERSION:
    raise DatasetError(f"{path!r} has schema version {manifest.get('schema_version')!r}; "
                       f"this headstart reads version {SCHEMA_VERSION}")
  return manifest


def shard_paths(data_dir: str, manifest: Mapping[str, Any], split: str) -> list[str]:
  """Full paths of one split's shards, in order, as listed in the manifest.

  Raises:
    DatasetError: the split is not in the dataset.
  """
  split = canonical_split(split)
  if split not in manifest["splits"]:
    raise DatasetError(f"split {split!r} is not in {data_dir!r}; it has "
                       f"{', '.join(manifest['splits'])}")
  return [f"{data_dir.rstrip('/')}/{s['file']}" for s in manifest["splits"][split]["shards"]]


def check_shards(data_dir: str, manifest: Mapping[str, Any], split: str) -> None:
  """Checks one split's shards against the manifest: present, intact CRCs, same record counts.

  One sequential read, cheap next to training; without it a flipped byte surfaces as a
  DataLossError with no file name halfway through `fit`, and a shard cut at a record boundary
  silently trains on fewer examples.

  Raises:
    DatasetError: naming the shard and what is wrong with it.
  """
  entries = manifest["splits"][canonical_split(split)]["shards"]
  for path, entry in zip(shard_paths(data_dir, manifest, split), entries):
    if not tf.io.gfile.exists(path):
      raise DatasetError(f"shard {path!r} listed in the manifest is missing")
    try:
      count = count_records(path)
    except tf.errors.DataLossError as error:
      raise DatasetError(f"shard {path!r} is corrupt ({error.message.splitlines()[0][:80]}); "
                         "run `headstart verify` on the dataset") from None
    if count != entry["num_examples"]:
      raise DatasetError(f"shard {path!r} has {count} records; its manifest says "
                         f"{entry['num_examples']} (truncated or replaced)")
