"""How records are laid out in TFRecord shards, without Beam: the shard-count rule, cutting a
split's parts into balanced shards (the plan `sinks.WriteSplits` executes), and reading one
record range of a shard (how stage 2 spreads a shard over several workers).

    count = sharding.shard_count(records=40, total_bytes=2_000_000, num_shards=4)   # 4
    for record in sharding.read_range(path, start=64, stop=128, expected=200): ...

Shard count per split: `--num-shards N` when given (fewer when the split has fewer records), else
ceil(bytes / 200 MiB), so every shard of a split holds between 100 and 200 MiB (TFDS aims for
shards of that order: big enough for sequential reads, small enough to spread over workers).

Framing of one record: uint64 length, uint32 masked CRC32C of the length, data, uint32 masked
CRC32C of the data (little endian). Records are self-delimiting, so byte ranges of whole records
concatenate into a valid file, and a reader can skip a record by its header alone.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow as tf

from contracts import layout

MAX_SHARD_BYTES = 200 << 20
HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of it
FOOTER_BYTES = 4   # uint32 masked CRC of the data
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
      plans.append({"split": split, "file": layout.shard_file_name(name, split, index, count),
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
      header = f.read(HEADER_BYTES)
      if len(header) < HEADER_BYTES:
        raise ShardError(f"shard {path!r} holds {index} records but its manifest says "
                         f"{expected}; the dataset changed or is damaged (headstart verify)")
      length = int.from_bytes(header[:8], "little")
      if _masked_crc(header[:8]) != int.from_bytes(header[8:], "little"):
        raise ShardError(f"shard {path!r} is corrupt after {index} records (bad length "
                         f"CRC at byte {offset}); run `headstart verify` on the dataset")
      if index < start:
        f.seek(length + FOOTER_BYTES, 1)
      else:
        data, footer = f.read(length), f.read(FOOTER_BYTES)
        if len(footer) < FOOTER_BYTES or _masked_crc(data) != int.from_bytes(footer, "little"):
          raise ShardError(f"shard {path!r} is corrupt after {index} records (bad data "
                           f"CRC at byte {offset}); run `headstart verify` on the dataset")
        yield data
      offset += HEADER_BYTES + length + FOOTER_BYTES
    if stop == expected and f.read(1):
      raise ShardError(f"shard {path!r} holds more than the {expected} records its "
                       "manifest says; the dataset changed or is damaged (headstart verify)")
