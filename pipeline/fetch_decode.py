"""The fetch-and-decode DoFn of the ingest (stage 1): source rows in, image dicts and dead letters
out, with hundreds of rows in flight per worker (the machinery is `inflight`, no Beam there).

    images = rows | beam.ParDo(FetchDecodeFn(cfg)).with_outputs(DEAD, main="images")
"""
from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils import shared
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from contracts import progress
from pipeline import decoder_pool, download_cache, fetch, image_decode, inflight, sinks
from pipeline.ingest_config import DeadLetteringDoFn, IngestConfig


def _in_global_window(output):
  """A finish_bundle output (main or tagged) in the global window, as Beam requires there."""
  if isinstance(output, pvalue.TaggedOutput):
    return pvalue.TaggedOutput(output.tag, WindowedValue(output.value, MIN_TIMESTAMP,
                                                         [GlobalWindow()]))
  return WindowedValue(output, MIN_TIMESTAMP, [GlobalWindow()])


# The `ingest` distribution of wall-clock milliseconds (see FetchDecodeFn.setup).
CLOCK_METRIC = "fetch_decode_clock_ms"
# `ingest` counters of the download cache: sources read from it, and puts that failed.
CACHE_HITS_METRIC = "download_cache_hits"
CACHE_ERRORS_METRIC = "download_cache_errors"


class CpuCounters:
  """CPU microseconds by phase as Beam counters (`sinks.CPU_NAMESPACE`), created in the worker."""

  def __init__(self):
    self._counters = {}

  def add(self, seconds: Mapping[str, float]) -> None:
    for phase, value in seconds.items():
      if phase not in self._counters:
        self._counters[phase] = Metrics.counter(sinks.CPU_NAMESPACE, phase)
      self._counters[phase].inc(int(value * 1e6))


def _sum_into(totals: dict[str, float], seconds: Mapping[str, float]) -> None:
  """Adds CPU seconds by phase to `totals` (a plain dict: `Counter.update` cost 3x as much, twice
  per image)."""
  for phase, value in seconds.items():
    totals[phase] = totals.get(phase, 0.0) + value


class FetchDecodeFn(DeadLetteringDoFn):
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
    self._window: inflight.Window | None = None  # the bundle's rows in flight

  def setup(self):
    # The worker's long-lived objects (TensorFlow, Beam, every module: over a million) leave the
    # collector's reach: a full collection walked them all, 0.2-0.25 s with every thread of the
    # process stopped, twice per 5,000 rows of the HTTP benchmark; a stalled event loop starts
    # no download (at 100 ms per response 1,871 -> 2,108 images/s, and 0.4 s less CPU).
    gc.freeze()
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
    # A cache that was empty when this worker started holds none of this job's sources later
    # either (they are deduplicated before fetching; other workers store other sources): it is
    # written, not searched: a lookup that always missed cost 0.02-0.07 ms of CPU per image in
    # the HTTP benchmark's job (0.006 ms in a loop alone).
    self._lookups = self._cache is not None and not self._cache_was_empty()
    self._cache_hits = Metrics.counter("ingest", CACHE_HITS_METRIC)
    self._cache_errors = Metrics.counter("ingest", CACHE_ERRORS_METRIC)
    self._cache_failures = 0   # this instance's failed puts: the first is logged, all counted
    self._decode = cfg.decoder
    if cfg.decode_timeout > 0:
      self._decode = decoder_pool.IsolatedDecoder(
          cfg.decoder, processes=cfg.decode_processes, timeout=cfg.decode_timeout,
          max_memory_bytes=cfg.decode_memory_mb << 20)
      self._decode.start()
    self._decoding = inflight.DecodeStage(self._decode_many, workers=cfg.decode_processes)
    self._done = Metrics.counter("ingest", "images_written")
    self._cpu = CpuCounters()
    # Wall-clock ms when a bundle's first row arrives and whenever images leave: min and max
    # over the job give how long fetching and decoding took, without the job's start-up.
    self._clock = Metrics.distribution("ingest", CLOCK_METRIC)

  def teardown(self):
    self._abandon_window()
    if self._cache_failures > 1:
      logging.getLogger("headstart").warning(
          "ingest: the download cache was not written for %d sources of this worker (the first "
          "error is logged above); they are fetched again on the next run",
          self._cache_failures)
    self._decoding.close()
    if isinstance(self._decode, decoder_pool.IsolatedDecoder):
      self._decode.close()

  def _abandon_window(self) -> None:
    # A bundle that failed never reached finish_bundle: its rows' bytes go back to the budget.
    window, self._window = self._window, None
    if window is not None:
      window.abandon()

  def start_bundle(self):
    self._abandon_window()
    self._window = inflight.Window(self._engine, self._decoding, self._bytes_of)
    self._started = False

  async def _bytes_of(self, slot: inflight.Slot) -> bytes:
    """The row's bytes (on the fetcher's loop): a file read on a file thread, or a download,
    through the download cache when there is one."""
    row, engine = slot.row, self._engine
    if not fetch.is_remote(row["location"]):
      return await engine.in_thread(slot, self._fetcher.read_file, row["location"])
    if self._cache is None:
      return await self._fetcher.fetch_http(row["location"])
    if self._lookups:
      found = await self._cache_call(slot, self._cached, row["id"])
      if found is not None:
        data, digest = found
        slot.cache_hit, slot.digest = True, digest.hex()  # checked by the cache: not hashed again
        return data
    data = await self._fetcher.fetch_http(row["location"])
    # Hashed once for the cache entry and the record's content_sha256 (see `_decode_many`).
    started = time.thread_time()
    digest = hashlib.sha256(data).digest()
    slot.cpu["hash"] = time.thread_time() - started
    slot.digest = digest.hex()
    slot.unsaved = await self._cache_call(slot, self._cache_put, row["id"], data, digest)
    return data

  async def _cache_call(self, slot: inflight.Slot, function: Callable, *args):
    """`function(*args)` in-line on the loop for a local cache (a SQLite lookup and a batched
    insert, ~0.04 ms per image: cheaper than the two thread hand-offs it saves, ~0.35 ms), on
    a file thread otherwise."""
    if self._cache.is_local:
      return function(*args)
    return await self._engine.in_thread(slot, function, *args)

  def _cache_was_empty(self) -> bool:
    try:
      return self._cache.is_empty()
    except Exception:  # noqa: BLE001 (an unreadable cache is searched: its reads miss alike)
      return False

  def _cached(self, row_id: str) -> tuple[bytes, bytes] | None:
    try:
      return self._cache.lookup(row_id)
    except Exception:  # noqa: BLE001 (an unreadable cache entry is a miss, not a failed row)
      return None

  def _cache_put(self, row_id: str, data: bytes, digest: bytes) -> int:
    """Stores a download; returns how many entries the cache could not take (0 when fine)."""
    try:
      self._cache.put(row_id, data, digest)
      return 0
    except Exception as error:  # noqa: BLE001 (the cache is an optimisation; the row is fine)
      return self._not_stored(error, row_id)

  def _flush_cache(self) -> None:
    """Commits this instance's waiting puts (on this thread: SQLite connections are per thread,
    and nothing of this bundle is in flight any more) and counts those that failed."""
    if self._cache is None:
      return
    try:
      self._cache.flush()
    except Exception as error:  # noqa: BLE001 (as in _cache_put)
      self._cache_errors.inc(self._not_stored(error, None))

  def _not_stored(self, error: Exception, row_id: str | None) -> int:
    # A cache that cannot be written (full disk, permissions, an object-store hiccup) costs a
    # re-fetch on the next run, never a row or the job. One damaged database fails every
    # put: one warning per worker, not one per row (the counter has them all).
    entries = error.entries if isinstance(error, download_cache.NotStored) else 1
    first = self._cache_failures == 0
    self._cache_failures += entries
    if first:
      what = f"for {row_id[:12]}" if entries == 1 and row_id else f"for {entries} sources"
      logging.getLogger("headstart").warning(
          "ingest: download cache not written %s: %s (later failures of this worker are "
          "counted in the summary's download cache line, not logged one by one)", what, error)
    return entries

  def _decode_many(self, slots: Sequence[inflight.Slot]) -> list:
    """One result or ImageError per fetched slot (a batch: one message to a decoder process)."""
    settings = self._cfg.decode_settings
    calls = [(slot.row if slot.digest is None else {**slot.row, "content_sha256": slot.digest},
              slot.data, settings) for slot in slots]
    if isinstance(self._decode, decoder_pool.IsolatedDecoder):
      return self._decode.map(calls)
    results = []
    for call in calls:
      try:
        results.append(self._decode(*call))
      except image_decode.ImageError as error:
        results.append(error)
    return results

  def _outputs(self, slots: Sequence[inflight.Slot]) -> Iterator:
    """Dead letters, then one list of the images, of finished slots."""
    if not slots:
      return
    images, cpu = [], {"fetch": self._engine.take_loop_cpu()}
    for slot in slots:
      _sum_into(cpu, slot.cpu)
      if slot.cache_hit:
        self._cache_hits.inc()
      if slot.unsaved:
        self._cache_errors.inc(slot.unsaved)
      result = slot.result
      if isinstance(result, (fetch.FetchError, image_decode.ImageError)):
        yield self._dead(result.reason, slot.row, str(result))
      elif isinstance(result, BaseException):
        raise result  # a bug, not a bad input: the bundle fails as it would in-line
      else:
        _sum_into(cpu, result.pop(image_decode.PHASES_KEY, None) or {})
        images.append(result)
    self._cpu.add(cpu)
    if images:
      self._done.inc(len(images))
      self._clock.update(int(time.time() * 1e3))
      yield images
    progress.report("ingest", advance=len(slots), unit="img")

  def process(self, row: dict):
    if not self._started:
      self._started = True
      self._clock.update(int(time.time() * 1e3))
    yield from self._outputs(self._window.push(row))

  def finish_bundle(self):
    for output in self._outputs(self._window.drain()):
      yield _in_global_window(output)
    self._window = None
    # A bundle's downloads are in the cache when it ends, as when each put was committed alone.
    self._flush_cache()
