"""The Beam sink of stages 1 and 2: (split, serialized Example) -> TFDS-named shards per split,
as many as the shard rule says (`pipeline/sharding.py`: `--num-shards N`, else 100-200 MiB each).

    files = examples | sinks.WriteSplits(out_dir, layout.IMAGES_NAME, num_shards=4)

The sink learns a split's exact record count and bytes without reading the data twice and
without holding records in memory (a GroupByKey into fixed shards, as Beam's own writer does,
would hold every record on the local runner): each bundle streams its records into a part file
and notes every record's end offset; once all parts exist, each shard is cut from the
concatenated parts at record boundaries and copied, hashed on the way, one shard per worker (a
shard that is one whole part is renamed, then hashed). Parts are deleted at the end; a failed
bundle's orphan part is never listed, so never copied.

The shard descriptions it yields (count, size, sha256) go to `contracts.datasets.group_shards`
and `finalize_dataset`, which write the TFDS metadata and the manifest (see contracts/).
"""
from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from contracts import datasets
from pipeline import sharding

PARTS_DIR_SUFFIX = ".parts"
_COPY_CHUNK_BYTES = 8 << 20
# Beam counters of CPU microseconds by phase: this sink's `write`, ingest's fetch, handoff,
# decode, encode, hash and record (`pipeline.run` reports them per image).
CPU_NAMESPACE = "headstart_cpu_us"



class WritePartsFn(beam.DoFn):
  """(split, serialized record, or a list of them in order) -> one part description per split
  seen in the bundle.

  Each part is a TFRecord file plus `<part>.ends`, the end offset of every record (int64 little
  endian), so a shard can start at any record without scanning the part.
  """

  def __init__(self, parts_dir: str):
    super().__init__()
    self._parts_dir = parts_dir

  def setup(self):
    tf.io.gfile.makedirs(self._parts_dir)
    self._cpu = Metrics.counter(CPU_NAMESPACE, "write")

  def start_bundle(self):
    self._open: dict[str, dict[str, Any]] = {}

  def process(self, element: tuple[str, bytes | list[bytes]]) -> None:
    started = time.thread_time()
    split, records = element
    if isinstance(records, bytes):
      records = [records]
    part = self._open.get(split)
    if part is None and records:
      path = f"{self._parts_dir}/{split}-{uuid.uuid4().hex}.tfrecord"
      part = self._open[split] = {"path": path, "writer": tf.io.TFRecordWriter(path),
                                  "ends": [], "order": hashlib.sha256(records[0]).hexdigest()}
    ends = part["ends"] if records else []
    for record in records:
      part["writer"].write(record)
      ends.append((ends[-1] if ends else 0) + sharding.HEADER_BYTES + len(record)
                  + sharding.FOOTER_BYTES)
    self._cpu.inc(int((time.thread_time() - started) * 1e6))

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


def _records_in_part(part_path: str) -> int:
  """How many records a part holds (its `.ends` file: 8 bytes per record)."""
  return tf.io.gfile.stat(f"{part_path}.ends").length // 8


def _copy_hashed(path: str, begin: int, end: int, out, digest) -> None:
  """Copies bytes [begin, end) of part `path` to `out`, feeding them to `digest` on the way."""
  with tf.io.gfile.GFile(path, "rb") as source:
    source.seek(begin)
    left = end - begin
    while left > 0:
      chunk = source.read(min(left, _COPY_CHUNK_BYTES))
      if not chunk:
        raise sharding.ShardError(f"part {path!r} ended {left} bytes early")
      out.write(chunk)
      digest.update(chunk)
      left -= len(chunk)


class AssembleShardFn(beam.DoFn):
  """Shard plan -> the shard file, and its description (`split`, `file`, `num_examples`,
  `num_bytes`, `sha256`).

  A shard that is one whole part (as a local run's split often is: one bundle wrote it, under
  200 MiB) is that part renamed, then hashed; any other is copied from its part ranges, hashed
  on the way. Copying a whole part cost ~0.066 ms of CPU per 30 KB image (a second write of
  every byte), the rename and the hashing read ~0.025 (issue 17).
  """

  def __init__(self, out_dir: str):
    super().__init__()
    self._out_dir = out_dir.rstrip("/")

  def process(self, plan: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    target, segments = f"{self._out_dir}/{plan['file']}", plan["segments"]
    if len(segments) == 1 and segments[0][1] == 0 and (
        segments[0][2] == _records_in_part(segments[0][0])):
      # A retried bundle finds the part already moved (its `.ends` stays until the end).
      if tf.io.gfile.exists(segments[0][0]):
        tf.io.gfile.rename(segments[0][0], target, overwrite=True)
      size, sha256 = tf.io.gfile.stat(target).length, datasets.file_sha256(target)
    else:
      digest, size = hashlib.sha256(), 0
      with tf.io.gfile.GFile(target, "wb") as out:
        for part_path, start, stop in segments:
          begin, end = _offset(part_path, start), _offset(part_path, stop)
          _copy_hashed(part_path, begin, end, out, digest)
          size += end - begin
      sha256 = digest.hexdigest()
    yield {"split": plan["split"], "file": plan["file"], "num_examples": plan["records"],
           "num_bytes": size, "sha256": sha256}


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
            | "PlanShards" >> beam.FlatMap(sharding.plan_shards, name=self._name,
                                           num_shards=self._num_shards)
            # One shard per element spread over workers: shards are copied in parallel.
            | "SpreadShards" >> beam.Reshuffle()
            | "AssembleShards" >> beam.ParDo(AssembleShardFn(self._out_dir))
            | "CollectShards" >> beam.combiners.ToList()
            | "RemoveParts" >> beam.FlatMap(_remove_parts, parts_dir=parts_dir))
