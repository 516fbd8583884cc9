"""Beam DoFns and composite PTransforms of the ingest job (stage 1).

    rows, dead = root | "ReadSources" >> ReadSources(cfg)
    images, dead2 = rows | "FetchAndDecode" >> FetchAndDecode(cfg)

Every DoFn sends bad elements to the `dead` output as one JSON dead-letter line (stage, reason,
row, message) and bumps a counter named after the reason; nothing is dropped silently.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils import shared
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from contracts import progress
from contracts import schema as schema_lib
from pipeline import (decoder_pool, download_cache, fetch, folder_tree, image_decode, inflight,
                      redact, sinks, sources, splits)

DEAD = "dead"
STATS = "stats"


@dataclasses.dataclass(frozen=True)
class IngestConfig:
  """Everything the ingest transforms need (picklable, shipped to workers)."""
  image_size: int = 300
  resize: str = "stretch"
  image_format: str = "jpeg"
  splits: tuple[tuple[str, float], ...] = (("train", 0.8), ("validation", 0.9), ("test", 1.0))
  background: tuple[int, int, int] = (255, 255, 255)
  max_pixels: int = image_decode.DEFAULT_MAX_PIXELS
  min_side: int = image_decode.DEFAULT_MIN_SIDE
  fetch: fetch.FetchConfig = fetch.FetchConfig()
  fetch_threads: int = 16      # threads reading files (local, gs://) and the download cache
  max_in_flight: int = 256     # rows being fetched or decoded at once per bundle
  max_in_flight_mb: int = 256  # bytes a worker process holds for rows in flight
  classes: tuple[str, ...] | None = None
  download_cache: str | None = None
  decode_timeout: float = 30.0  # 0 decodes in-process (no crash/hang isolation)
  decode_processes: int = 2
  decode_memory_mb: int = 4096  # address-space limit of each decoder process; 0: none
  decoder: Callable[[dict, bytes, image_decode.DecodeSettings], dict] = image_decode.prepare_record

  @property
  def decode_settings(self) -> image_decode.DecodeSettings:
    return image_decode.DecodeSettings(self.image_size, self.resize, self.image_format,
                                       self.max_pixels, self.min_side, self.background)


def dead_letter(reason: str, row, message: str, stage: str = "ingest") -> str:
  """One `errors.jsonl` line; credentials and signed-URL secrets are redacted from the row and
  message (the fetched location and any encoded image bytes are left out)."""
  if isinstance(row, dict):
    row = {k: v for k, v in row.items() if k not in ("location", "error", "image")}
  text = json.dumps({"stage": stage, "reason": reason, "row": row, "message": message},
                    sort_keys=True, default=str)
  return redact.redact(text)


class _DeadLetteringDoFn(beam.DoFn):
  """Base: counters per reason, created lazily in the worker (never module globals)."""

  def __init__(self):
    super().__init__()
    self._counters = {}

  def _dead(self, reason: str, row, message: str):
    if reason not in self._counters:
      self._counters[reason] = Metrics.counter("ingest_dead_letters", reason)
    self._counters[reason].inc()
    return pvalue.TaggedOutput(DEAD, dead_letter(reason, row, message))


class ParseCsvLineFn(_DeadLetteringDoFn):
  """Manifest line (bytes) -> source row dict, or a dead letter."""

  def __init__(self, spec: sources.CsvSpec):
    super().__init__()
    self._spec = spec

  def process(self, raw: bytes):
    if not raw.strip():
      return
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
      yield self._dead("malformed_row", raw.decode("utf-8", "replace"), f"not UTF-8: {error}")
      return
    try:
      yield sources.parse_csv_line(line, self._spec)
    except sources.RowError as error:
      yield self._dead(error.reason, redact.redact(line), str(error))


class RouteFolderRowFn(_DeadLetteringDoFn):
  """Listed file path -> source row, or a dead letter (outside class folders, not an image
  name, a link leaving the root)."""

  def __init__(self, tree: folder_tree.TreeSpec):
    super().__init__()
    self._tree = tree

  def process(self, path: str):
    row = folder_tree.row_of(path, self._tree)
    if "error" in row:
      reason, message = row["error"]
      yield self._dead(reason, row, message)
    else:
      yield row


class KeepOnePerIdFn(_DeadLetteringDoFn):
  """(id, rows) -> the one row to ingest; other copies become `duplicate` dead letters.

  Copies that disagree on the label are all `conflicting_label`: which one is right is unknown.
  """

  def process(self, element: tuple[str, Iterable[dict]]):
    _, rows = element
    rows = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))
    if len({r["label"] for r in rows}) > 1:
      labels = sorted({str(r["label"]) for r in rows})
      for row in rows:
        yield self._dead("conflicting_label", row, f"the same source is listed with labels "
                         f"{labels}")
      return
    yield rows[0]
    for row in rows[1:]:
      yield self._dead("duplicate", row, "the same source is listed more than once; kept one")


def prepare_image(row: dict, data: bytes, cfg: IngestConfig) -> dict:
  """Decodes, validates and resizes fetched bytes in this process (see `image_decode`).

  Raises:
    image_decode.ImageError: the bytes are not a usable image.
  """
  return image_decode.prepare_record(row, data, cfg.decode_settings)


def _in_global_window(output):
  """A finish_bundle output (main or tagged) in the global window, as Beam requires there."""
  if isinstance(output, pvalue.TaggedOutput):
    return pvalue.TaggedOutput(output.tag, WindowedValue(output.value, MIN_TIMESTAMP,
                                                         [GlobalWindow()]))
  return WindowedValue(output, MIN_TIMESTAMP, [GlobalWindow()])


class _CpuCounters:
  """CPU microseconds by phase as Beam counters (`sinks.CPU_NAMESPACE`), created in the worker."""

  def __init__(self):
    self._counters = {}

  def add(self, seconds: Mapping[str, float]) -> None:
    for phase, value in seconds.items():
      if phase not in self._counters:
        self._counters[phase] = Metrics.counter(sinks.CPU_NAMESPACE, phase)
      self._counters[phase].inc(int(value * 1e6))


class FetchDecodeFn(_DeadLetteringDoFn):
  """Source row -> lists of image dicts (in input order) + dead letters, with hundreds of rows
  in flight per worker: downloads on the fetcher's event loop, decoding in batches (see
  `inflight`).

  Outputs of earlier rows may leave with a later row or at the end of the bundle: a download
  must not wait for the bundle's next element to start.
  """

  def __init__(self, cfg: IngestConfig):
    super().__init__()
    self._cfg = cfg
    self._shared_engine = shared.Shared()

  def setup(self):
    # One fetcher (event loop, per-host limits, pools) and one byte budget per worker process,
    # whatever the number of DoFn instances Beam runs in it: --max-per-host, --max-in-flight-mb
    # and the pools are the process's, not one bundle thread's.
    cfg = self._cfg
    self._engine = self._shared_engine.acquire(
        lambda: inflight.Engine(fetch.Fetcher(cfg.fetch), max_in_flight=cfg.max_in_flight,
                                max_bytes=cfg.max_in_flight_mb << 20,
                                file_threads=cfg.fetch_threads),
        tag=repr((cfg.fetch, cfg.max_in_flight, cfg.max_in_flight_mb, cfg.fetch_threads)))
    self._fetcher = self._engine.fetcher
    self._cache = download_cache.DownloadCache(cfg.download_cache) if cfg.download_cache else None
    self._cache_hits = Metrics.counter("ingest", "download_cache_hits")
    self._cache_errors = Metrics.counter("ingest", "download_cache_errors")
    self._decode = cfg.decoder
    if cfg.decode_timeout > 0:
      self._decode = decoder_pool.IsolatedDecoder(
          cfg.decoder, processes=cfg.decode_processes, timeout=cfg.decode_timeout,
          max_memory_bytes=cfg.decode_memory_mb << 20)
    self._decoding = inflight.DecodeStage(self._decode_many, workers=cfg.decode_processes)
    self._done = Metrics.counter("ingest", "images_written")
    self._cpu = _CpuCounters()

  def teardown(self):
    self._decoding.close()
    if isinstance(self._decode, decoder_pool.IsolatedDecoder):
      self._decode.close()

  def start_bundle(self):
    self._window = inflight.Window(self._engine, self._decoding, self._bytes_of)

  async def _bytes_of(self, slot: inflight.Slot) -> bytes:
    """The row's bytes (on the fetcher's loop): a file read on a file thread, or a download,
    through the download cache when there is one."""
    row, engine = slot.row, self._engine
    if not fetch.is_remote(row["location"]):
      return await engine.in_thread(slot, self._fetcher.read_file, row["location"])
    if self._cache is None:
      return await self._fetcher.fetch_http(row["location"])
    data = await self._cache_call(slot, self._cached, row["id"])
    if data is not None:
      return data
    data = await self._fetcher.fetch_http(row["location"])
    await self._cache_call(slot, self._cache_put, row["id"], data)
    return data

  async def _cache_call(self, slot: inflight.Slot, function: Callable, *args):
    """`function(*args)` in-line on the loop for a local cache (0.13 ms per image, measured:
    cheaper than the two thread hand-offs it saves, ~0.35 ms), on a file thread otherwise."""
    if self._cache.is_local:
      return function(*args)
    return await self._engine.in_thread(slot, function, *args)

  def _cached(self, row_id: str) -> bytes | None:
    try:
      data = self._cache.get(row_id)
    except Exception:  # noqa: BLE001 (an unreadable cache entry is a miss, not a failed row)
      return None
    if data is not None:
      self._cache_hits.inc()
    return data

  def _cache_put(self, row_id: str, data: bytes) -> None:
    try:
      self._cache.put(row_id, data)
    except Exception as error:  # noqa: BLE001 (the cache is an optimisation; the row is fine)
      # A cache that cannot be written (full disk, permissions, an object-store hiccup) costs a
      # re-fetch on the next run, never this row or the job.
      self._cache_errors.inc()
      logging.getLogger("headstart").warning("ingest: download cache not written for %s: %s",
                                             row_id[:12], error)

  def _decode_many(self, slots: Sequence[inflight.Slot]) -> list:
    """One result or ImageError per fetched slot (a batch: one message to a decoder process)."""
    settings = self._cfg.decode_settings
    if isinstance(self._decode, decoder_pool.IsolatedDecoder):
      return self._decode.map([(slot.row, slot.data, settings) for slot in slots])
    results = []
    for slot in slots:
      try:
        results.append(self._decode(slot.row, slot.data, settings))
      except image_decode.ImageError as error:
        results.append(error)
    return results

  def _outputs(self, slots: Sequence[inflight.Slot]) -> Iterator:
    """Dead letters, then one list of the images, of finished slots."""
    if not slots:
      return
    images, cpu = [], collections.Counter({"fetch": self._engine.take_loop_cpu()})
    for slot in slots:
      cpu.update(slot.cpu)
      result = slot.result
      if isinstance(result, (fetch.FetchError, image_decode.ImageError)):
        yield self._dead(result.reason, slot.row, str(result))
      elif isinstance(result, BaseException):
        raise result  # a bug, not a bad input: the bundle fails as it would in-line
      else:
        cpu.update(result.pop(image_decode.PHASES_KEY, None) or {})
        images.append(result)
    self._cpu.add(cpu)
    if images:
      self._done.inc(len(images))
      yield images
    progress.report("ingest", advance=len(slots), unit="img")

  def process(self, row: dict):
    yield from self._outputs(self._window.push(row))

  def finish_bundle(self):
    for output in self._outputs(self._window.drain()):
      yield _in_global_window(output)


class _UnknownLabel(Exception):
  """A row's label is not one of the class names."""


class ToExampleFn(_DeadLetteringDoFn):
  """List of image dicts -> (split, [serialized tf.train.Example, ...]) per split, in order;
  also ((split, label), count) stats."""

  def __init__(self, cfg: IngestConfig):
    super().__init__()
    self._cfg = cfg
    self._schemas: dict[tuple, schema_lib.Schema] = {}

  def setup(self):
    self._cpu = _CpuCounters()

  def _schema(self, class_names: Sequence[str], num_keypoints: int) -> schema_lib.Schema:
    key = (tuple(class_names or ()), num_keypoints)
    if key not in self._schemas:
      self._schemas[key] = schema_lib.image_schema(
          image_size=self._cfg.image_size, image_format=self._cfg.image_format,
          class_names=class_names, num_keypoints=num_keypoints)
    return self._schemas[key]

  def _one(self, item: dict, class_names: Sequence[str]) -> tuple[str, object, bytes]:
    """(split, label, serialized record).

    Raises:
      _UnknownLabel: the label is not one of `class_names`.
    """
    values = {
        "id": item["id"], "image": item["image"], "source": item["source"],
        "group": item.get("group") or "", "content_sha256": item["content_sha256"],
        "height": item["height"], "width": item["width"],
    }
    if item.get("label") is not None:
      if item["label"] not in class_names:
        raise _UnknownLabel(item["label"])
      values["label"] = class_names.index(item["label"])
    if item.get("targets") is not None:
      values["targets"] = np.asarray(item["targets"], np.float32)
    split = item.get("split") or splits.assign_split(item.get("group") or item["id"],
                                                     self._cfg.splits)
    keypoints = len(values["targets"]) if "targets" in values else 0
    return split, item.get("label"), self._schema(class_names, keypoints).encode(values)

  def process(self, items: Sequence[dict], class_names: Sequence[str]):
    started = time.thread_time()
    by_split: dict[str, list[bytes]] = {}
    stats: collections.Counter = collections.Counter()
    for item in items:
      try:
        split, label, record = self._one(item, class_names)
      except _UnknownLabel:
        yield self._dead("unknown_label", item, f"label {item['label']!r} is not one of "
                         f"{list(class_names)}")
        continue
      by_split.setdefault(split, []).append(record)
      stats[split, label] += 1
    for key, count in stats.items():
      yield pvalue.TaggedOutput(STATS, (key, count))
    yield from by_split.items()
    self._cpu.add({"record": time.thread_time() - started})


class ReadCsvSource(beam.PTransform):
  """CSV manifest path -> (source rows, dead letters, input row count)."""

  def __init__(self, spec: sources.CsvSpec):
    super().__init__()
    self._spec = spec

  def expand(self, root):
    # Bytes, not str: a line that is not UTF-8 must become a dead letter, not crash the read.
    lines = root | "ReadLines" >> beam.io.ReadFromText(
        self._spec.path, skip_header_lines=1, strip_trailing_newlines=True,
        coder=beam.coders.BytesCoder())
    parsed = lines | "ParseRows" >> beam.ParDo(ParseCsvLineFn(self._spec)).with_outputs(
        DEAD, main="rows")
    count = (lines | "KeepNonBlank" >> beam.Filter(lambda line: bool(line.strip()))
             | "CountRows" >> beam.combiners.Count.Globally())
    return parsed.rows, parsed[DEAD], count


class ReadFolderSource(beam.PTransform):
  """Folder tree -> (source rows, dead letters, input row count).

  The files are matched on the workers (one pattern per class folder), not listed by the
  launcher: the job's size and the launcher's memory do not grow with the number of images.
  """

  def __init__(self, tree: folder_tree.TreeSpec):
    super().__init__()
    self._tree = tree

  def expand(self, root):
    tree = self._tree
    matched = (root
               | "ClassFolders" >> beam.Create(folder_tree.class_patterns(tree))
               | "MatchFiles" >> fileio.MatchAll()
               | "PathOf" >> beam.Map(lambda metadata: metadata.path))
    stray = root | "StrayFiles" >> beam.Create([f"{tree.root}/{name}" for name in tree.stray_files])
    entries = ((matched, stray) | "MergePaths" >> beam.Flatten()
               | "SpreadPaths" >> beam.Reshuffle())
    routed = entries | "RouteRows" >> beam.ParDo(RouteFolderRowFn(tree)).with_outputs(
        DEAD, main="rows")
    count = entries | "CountRows" >> beam.combiners.Count.Globally()
    return routed.rows, routed[DEAD], count


class FetchAndDecode(beam.PTransform):
  """Source rows -> lists of image dicts (decoded, validated, resized, re-encoded) + dead
  letters; duplicate sources are dead-lettered first."""

  def __init__(self, cfg: IngestConfig):
    super().__init__()
    self._cfg = cfg

  def expand(self, rows):
    unique = (rows
              | "KeyById" >> beam.Map(lambda row: (row["id"], row))
              | "GroupById" >> beam.GroupByKey()
              | "KeepOnePerId" >> beam.ParDo(KeepOnePerIdFn()).with_outputs(DEAD, main="rows"))
    images = (unique.rows
              | "FetchDecodeResize" >> beam.ParDo(FetchDecodeFn(self._cfg)).with_outputs(
                  DEAD, main="images"))
    return images.images, (unique[DEAD], images[DEAD]) | "MergeDeadLetters" >> beam.Flatten()
