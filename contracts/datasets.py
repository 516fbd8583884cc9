"""Dataset directories of stages 1 and 2: shards, `manifest.json` (written last), `index.json`.

    manifest = datasets.read_manifest(data_dir)            # DatasetError when incomplete
    files = datasets.shard_paths(data_dir, manifest, "train")

A dataset directory holds TFDS-named shards `{name}-{split}.tfrecord-{SSSSS}-of-{NNNNN}`,
`dataset_info.json` + `features.json` (via `tfds.folder_dataset.write_metadata`, so
`tfds.builder_from_directory(dir)` loads it) and `manifest.json`, written **last**: every shard
with its record count, byte size and sha256, plus the schema/code version and whatever the
stage adds (counts, cache key...). A directory without `manifest.json` is not a dataset:
readers go through `read_manifest()` / `shard_paths()`, never a glob. The folder a
`headstart extract --out` names lists its feature datasets in `index.json`
(`read_index`/`write_index`).

All I/O goes through `tf.io.gfile`, so every path may be local or `gs://`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from contracts import layout
from contracts.layout import DatasetError

_HASH_CHUNK_BYTES = 8 << 20


# ---------------------------------------------------------------------------------------------
# Writing


def file_sha256(path: str) -> str:
  """Hex sha256 of a file: a local one through one reused buffer (`hashlib.file_digest`),
  others in chunks through `tf.io.gfile`. (An 8 MB bytes object per chunk was fresh memory
  each time: hashing a 10,000-image HTTP ingest's shards cost ~32,000 page faults.)"""
  if "://" not in path:
    with open(path, "rb") as f:
      return hashlib.file_digest(f, "sha256").hexdigest()
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


def group_shards(shards: Iterable[Mapping[str, Any]], out_dir: str) -> dict[str, list[dict]]:
  """Groups shard descriptions by split in shard order, deleting splits with no records."""
  by_split: dict[str, list[dict]] = {}
  for shard in shards:
    by_split.setdefault(shard["split"], []).append(dict(shard))
  result = {}
  for split in layout.SPLITS:
    entries = sorted(by_split.get(split, []), key=lambda s: layout.shard_index(s["file"]))
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
      data_dir=out_dir, template=layout.TFDS_FILENAME_TEMPLATE, dataset_name=name,
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
      "schema_version": layout.SCHEMA_VERSION,
      "code_version": layout.CODE_VERSION,
      "name": name,
      "splits": {
          split: {"num_examples": sum(s["num_examples"] for s in entries),
                  "shards": [{k: v for k, v in s.items() if k != "split"} for s in entries]}
          for split, entries in shards_by_split.items()
      },
      **extra,
  }
  write_json(f"{out_dir}/{layout.MANIFEST_NAME}", manifest)
  return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def has_manifest(data_dir: str) -> bool:
  """True when `data_dir` holds a complete dataset (its manifest was written)."""
  return tf.io.gfile.exists(f"{data_dir.rstrip('/')}/{layout.MANIFEST_NAME}")


def read_manifest(data_dir: str) -> dict[str, Any]:
  """Loads `manifest.json` of a dataset directory.

  Raises:
    DatasetError: the manifest is missing or unreadable (an interrupted job or not a dataset).
  """
  path = f"{data_dir.rstrip('/')}/{layout.MANIFEST_NAME}"
  if not tf.io.gfile.exists(path):
    raise DatasetError(
        f"{data_dir!r} has no {layout.MANIFEST_NAME}: it is not a complete headstart dataset "
        "(the job that wrote it did not finish, or the path is wrong)")
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DatasetError(f"{path!r} is not valid JSON: {error}") from error
  if manifest.get("schema_version") != layout.SCHEMA_VERSION:
    raise DatasetError(f"{path!r} has schema version {manifest.get('schema_version')!r}; "
                       f"this headstart reads version {layout.SCHEMA_VERSION}")
  return manifest


def shard_paths(data_dir: str, manifest: Mapping[str, Any], split: str) -> list[str]:
  """Full paths of one split's shards, in order, as listed in the manifest.

  Raises:
    DatasetError: the split is not in the dataset.
  """
  split = layout.canonical_split(split)
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
  entries = manifest["splits"][layout.canonical_split(split)]["shards"]
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


def read_json(path: str) -> Any:
  """A JSON file through `tf.io.gfile`.

  Raises:
    DatasetError: missing or not valid JSON, naming the file.
  """
  if not tf.io.gfile.exists(path):
    raise DatasetError(f"{path!r} does not exist")
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DatasetError(f"{path!r} is not valid JSON: {error}") from error


# ---------------------------------------------------------------------------------------------
# index.json: the feature datasets under one `headstart extract --out` folder


@dataclasses.dataclass(frozen=True)
class IndexEntry:
  """One feature dataset listed in `index.json`; `dir_name` is relative to the index's folder."""
  dir_name: str
  path: str
  backbone: str
  weights_kind: str
  cache_key: str
  manifest: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)


def read_index(features_dir: str) -> list[IndexEntry]:
  """The complete feature datasets listed in `features_dir/index.json`, in index order.

  Raises:
    DatasetError: no index (not an extract --out folder) or a listed dataset is incomplete.
  """
  features_dir = features_dir.rstrip("/")
  path = f"{features_dir}/{layout.INDEX_NAME}"
  if not tf.io.gfile.exists(path):
    raise DatasetError(f"--features {features_dir!r} has no {layout.INDEX_NAME}; point it at "
                       "the --out folder of headstart extract")
  entries = []
  for item in read_json(path).get("datasets", []):
    data_dir = f"{features_dir}/{item['dir']}"
    manifest = read_manifest(data_dir)
    entries.append(IndexEntry(item["dir"], data_dir, item.get("backbone") or manifest["backbone"],
                              item.get("weights_kind") or manifest.get("weights_kind", ""),
                              item.get("cache_key") or manifest.get("cache_key", ""), manifest))
  return entries


def write_index(out: str, new_entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Updates `out/index.json` with `new_entries` (`dir`, `backbone`, `weights_kind`,
  `cache_key`), listed first; entries of earlier calls stay while their manifest exists."""
  out = out.rstrip("/")
  path = f"{out}/{layout.INDEX_NAME}"
  entries = {entry["dir"]: dict(entry) for entry in new_entries
             if has_manifest(f"{out}/{entry['dir']}")}
  try:
    previous = read_json(path).get("datasets", []) if tf.io.gfile.exists(path) else []
  except DatasetError:
    previous = []   # a damaged index is rebuilt from the datasets that are there
  for entry in previous:
    if entry.get("dir") not in entries and has_manifest(f"{out}/{entry.get('dir')}"):
      entries[entry["dir"]] = entry
  index = {"datasets": list(entries.values())}
  tf.io.gfile.makedirs(out)
  write_json(path, index)
  return index
