"""How records are laid out in TFRecord shards: the shard-count rule, the Beam sink that writes
each split as that many balanced shards, and reading one record range of a shard.

    shards = examples | "WriteImages" >> sharding.WriteSplits(out_dir, "images", num_shards=4)
    for record in sharding.read_range(path, start=64, stop=128, expected=200): ...

Shard count per split: `--num-shards N` when given (fewer when the split has fewer records), else
ceil(bytes / 200 MiB), so every shard of a split holds between 100 and 200 MiB (TFDS aims for
shards of that order: big enough for sequential reads, small enough to spread over workers).

The sink knows a split's exact record count and bytes without reading the data twice and without
holding records in memory (a GroupByKey into fixed shards would, on the local runner): each
bundle streams its records into a part file and notes every record's end offset; once all parts
exist, each shard is cut from the concatenated parts at record boundaries (TFRecord framing is
per record, so byte ranges of whole records concatenate into a valid file) and copied, hashed
on the way, in parallel. Parts are deleted at the end.

Framing of one record: uint64 length, uint32 masked CRC32C of the length, data, uint32 masked
CRC32C of the data (little endian).
"""
from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

MAX_SHARD_BYTES = 200 << 20
PARTS_DIR_SUFFIX = ".parts"
_COPY_CHUNK_BYTES = 8 << 20
_HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of it
_FOOTER_BYTES = 4   # uint32 masked CRC of the data
_CRC_MASK_DELTA = 0xA282EAD8


class ShardError(ValueError):
  """A shard is damaged: a CRC does not match, or it holds other records than it should."""


def shard_count(records: int, total_bytes: int, num_shards: int = 0) -> int:
  """Shards one split gets: `num_shards` (0: the size rule), never more than its records.

  The size rule, ceil(bytes / MAX_SHARD_BYTES), keeps every shard in (100, 200] MiB once a
  split passes 200 MiB (one shard below that).
  """
  if num_shards < 0:
    raise ValueError(f"num_shards must be >= 0, got {num_shards!r}")
  if records <= 0:
    return 0
  wanted = num_shards or max(1, math.ceil(total_bytes / MAX_SHARD_BYTES))
  return min(wanted, records)


def shard_file_name(name: str, split: str, index: int, count: int) -> str:
  """TFDS shard naming: `{name}-{split}.tfrecord-{index:05d}-of-{count:05d}`."""
  return f"{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def _masked_crc(data: bytes) -> int:
  import google_crc32c  # the C implementation Beam's tfrecord extra installs
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Planning (pure)


def plan_shards(parts: Sequence[Mapping[str, Any]], *, name: str,
                num_shards: int = 0) -> list[dict[str, Any]]:
  """Cuts each split's parts into balanced shards at record boundaries.

  Args:
    parts: part descriptions (`split`, `path`, `records`, `bytes`, `order`), any order.
    name: dataset name of the shard files.
    num_shards: shards per split (0: the size rule).

  Returns:
    One plan per shard: `split`, `file`, `records` and `segments`, a list of
    (part path, first record, end record) in the parts' local record numbering.
  """
  by_split: dict[str, list[Mapping[str, Any]]] = {}
  for part in parts:
    if part["records"]:
      by_split.setdefault(part["split"], []).append(part)
  plans = []
  for split, split_parts in sorted(by_split.items()):
    # A stable order (the first record's hash), so one input gives the same shards every run.
    split_parts = sorted(split_parts, key=lambda p: (p["order"], p["path"]))
    total = sum(p["records"] for p in split_parts)
    count = shard_count(total, sum(p["bytes"] for p in split_parts), num_shards)
    cuts = [index * total // count for index in range(count + 1)]
    for index in range(count):
      plans.append({"split": split, "file": shard_file_name(name, split, index, count),
                    "records": cuts[index + 1] - cuts[index],
                    "segments": _segments(split_parts, cuts[index], cuts[index + 1])})
  return plans


def _segments(parts: Sequence[Mapping[str, Any]], start: int,
              stop: int) -> list[tuple[str, int, int]]:
  """Records [start, stop) of the concatenated parts as (part path, local start, local stop)."""
  segments, first = [], 0
  for part in parts:
    last = first + part["records"]
    low, high = max(start, first), min(stop, last)
    if low < high:
      segments.append((part["path"], low - first, high - first))
    first = last
  return segments


# ---------------------------------------------------------------------------------------------
# Writing


class WritePartsFn(beam.DoFn):
  """(split, serialized record) -> one part description per split seen in the bundle.

  Each part is a TFRecord file plus `<part>.ends`, the end offset of every record (int64 little
  endian), so a shard can start at any record without scanning the part.
  """

  def __init__(self, parts_dir: str):
    super().__init__()
    self._parts_dir = parts_dir

  def setup(self):
    tf.io.gfile.makedirs(self._parts_dir)

  def start_bundle(self):
    self._open: dict[str, dict[str, Any]] = {}

  def process(self, element: tuple[str, bytes]) -> None:
    split, record = element
    part = self._open.get(split)
    if part is None:
      path = f"{self._parts_dir}/{split}-{uuid.uuid4().hex}.tfrecord"
      part = self._open[split] = {"path": path, "writer": tf.io.TFRecordWriter(path),
                                  "ends": [], "order": hashlib.sha256(record).hexdigest()}
    part["writer"].write(record)
    end = part["ends"][-1] if part["ends"] else 0
    part["ends"].append(end + _HEADER_BYTES + len(record) + _FOOTER_BYTES)

  def finish_bundle(self) -> Iterator[WindowedValue]:
    for split, part in self._open.items():
      part["writer"].close()
      with tf.io.gfile.GFile(f"{part['path']}.ends", "wb") as f:
        f.write(np.asarray(part["ends"], "<i8").tobytes())
      description = {"split": split, "path": part["path"], "records": len(part["ends"]),
                     "bytes": part["ends"][-1], "order": part["order"]}
      yield WindowedValue(description, MIN_TIMESTAMP, [GlobalWindow()])
    self._open = {}


def _offset(part_path: str, record: int) -> int:
  """Byte offset where local record `record` of a part starts (its `.ends` file, one read)."""
  if record == 0:
    return 0
  with tf.io.gfile.GFile(f"{part_path}.ends", "rb") as f:
    f.seek(8 * (record - 1))
    return int.from_bytes(f.read(8), "little")


class AssembleShardFn(beam.DoFn):
  """Shard plan -> the shard file copied from its part ranges, and its description
  (`split`, `file`, `num_examples`, `num_bytes`, `sha256`), hashed while copying."""

  def __init__(self, out_dir: str):
    super().__init__()
    self._out_dir = out_dir.rstrip("/")

  def process(self, plan: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    digest, size = hashlib.sha256(), 0
    with tf.io.gfile.GFile(f"{self._out_dir}/{plan['file']}", "wb") as out:
      for part_path, start, stop in plan["segments"]:
        begin, end = _offset(part_path, start), _offset(part_path, stop)
        with tf.io.gfile.GFile(part_path, "rb") as part:
          part.seek(begin)
          left = end - begin
          while left > 0:
            chunk = part.read(min(left, _COPY_CHUNK_BYTES))
            if not chunk:
              raise ShardError(f"part {part_path!r} ended {left} bytes early")
            out.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
        size += end - begin
    yield {"split": plan["split"], "file": plan["file"], "num_examples": plan["records"],
           "num_bytes": size, "sha256": digest.hexdigest()}


def _remove_parts(descriptions: list[dict[str, Any]], parts_dir: str) -> list[dict[str, Any]]:
  if tf.io.gfile.exists(parts_dir):
    tf.io.gfile.rmtree(parts_dir)
  return descriptions


class WriteSplits(beam.PTransform):
  """(split, serialized record) -> one description per shard written (`split`, `file`,
  `num_examples`, `num_bytes`, `sha256`), once every shard is complete.

  Splits without records get no shard. `num_shards` = shards per split (0: the size rule).
  """

  def __init__(self, out_dir: str, name: str, *, num_shards: int = 0):
    super().__init__()
    if num_shards < 0:
      raise ValueError(f"num_shards must be >= 0, got {num_shards!r}")
    self._out_dir = out_dir.rstrip("/")
    self._name = name
    self._num_shards = num_shards

  def expand(self, records):
    parts_dir = f"{self._out_dir}/{self._name}{PARTS_DIR_SUFFIX}"
    return (records
            | "WriteParts" >> beam.ParDo(WritePartsFn(parts_dir))
            | "CollectParts" >> beam.combiners.ToList()
            | "PlanShards" >> beam.FlatMap(plan_shards, name=self._name,
                                           num_shards=self._num_shards)
            # One shard per element spread over workers: shards are copied in parallel.
            | "SpreadShards" >> beam.Reshuffle()
            | "AssembleShards" >> beam.ParDo(AssembleShardFn(self._out_dir))
            | "CollectShards" >> beam.combiners.ToList()
            | "RemoveParts" >> beam.FlatMap(_remove_parts, parts_dir=parts_dir))


# ---------------------------------------------------------------------------------------------
# Reading


def record_ranges(shards: Sequence[tuple[str, int]],
                  records_per_range: int) -> list[tuple[str, int, int, int]]:
  """(path, record count) per shard -> (path, start, stop, count) ranges of at most
  `records_per_range` records, so more workers than shards have work."""
  if records_per_range <= 0:
    raise ValueError(f"records_per_range must be positive, got {records_per_range!r}")
  ranges = []
  for path, count in shards:
    pieces = max(1, math.ceil(count / records_per_range))
    cuts = [index * count // pieces for index in range(pieces + 1)]
    ranges += [(path, cuts[i], cuts[i + 1], count) for i in range(pieces)]
  return ranges


def read_range(path: str, start: int, stop: int, expected: int) -> Iterator[bytes]:
  """Records [start, stop) of a TFRecord file whose manifest says it holds `expected`.

  Records before `start` are skipped by their headers (length CRC checked, data not read); the
  range's own records are CRC-checked. The range ending the file also checks nothing follows.

  Raises:
    ShardError: a CRC mismatch, a file that ends early or holds more than `expected` records;
      the message names the file, the record and its byte offset.
  """
  with tf.io.gfile.GFile(path, "rb") as f:
    offset = 0
    for index in range(stop):
      header = f.read(_HEADER_BYTES)
      if len(header) < _HEADER_BYTES:
        raise ShardError(f"shard {path!r} holds {index} records but its manifest says "
                         f"{expected}; the dataset changed or is damaged (headstart verify)")
      length = int.from_bytes(header[:8], "little")
      if _masked_crc(header[:8]) != int.from_bytes(header[8:], "little"):
        raise ShardError(f"shard {path!r} is corrupt after {index} records (bad length "
                         f"CRC at byte {offset}); run `headstart verify` on the dataset")
      if index < start:
        f.seek(length + _FOOTER_BYTES, 1)
      else:
        data, footer = f.read(length), f.read(_FOOTER_BYTES)
        if len(footer) < _FOOTER_BYTES or _masked_crc(data) != int.from_bytes(footer, "little"):
          raise ShardError(f"shard {path!r} is corrupt after {index} records (bad data "
                           f"CRC at byte {offset}); run `headstart verify` on the dataset")
        yield data
      offset += _HEADER_BYTES + length + _FOOTER_BYTES
    if stop == expected and f.read(1):
      raise ShardError(f"shard {path!r} holds more than the {expected} records its "
                       "manifest says; the dataset changed or is damaged (headstart verify)")
