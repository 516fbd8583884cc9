"""Many rows in flight per worker: downloaded as coroutines on one event loop, decoded in
batches, handed back in the order they came (no Beam here; `fetch_decode.FetchDecodeFn` drives
it).

    engine = inflight.Engine(fetcher, max_in_flight=512, max_bytes=64 << 20, file_threads=16)
    decoding = inflight.DecodeStage(decode_many, workers=2)     # one per DoFn instance
    window = inflight.Window(engine, decoding, fetch_one)       # one per bundle
    for row in rows:
      ready = window.push(row)      # the finished rows at the front, in input order (or none)
    rest = window.drain()           # waits for the others

Why this shape (issue 17): a download spends its time waiting on the network, a decode spends
it on the CPU. Before, a bundle fetched and decoded batches of 4-64 rows in lock step on 16
threads, so the slowest download of a batch held the rest and at 100 ms per response one worker
managed ~90 images/s. Now a row's download starts as soon as it arrives, as a coroutine on the
fetcher's event loop (`fetch.Fetcher.loop`: one thread for hundreds of downloads; 256 threads
cost 0.84 ms of CPU per image in GIL hand-offs at loopback speed, the loop under 0.2 ms), each
still bounded by the per-host limit; files and the download cache are read on `file_threads`
threads. Fetched bytes go to a queue that the decoder threads empty in batches (one message to
an isolated decoder process per batch, not per image), and the bundle thread takes finished
rows from the front of its window.

Rows leave in input order, so the same input gives byte-identical shards whatever the network
did. A slow download at the front does not stop the others: rows behind it keep being fetched
and decoded, and wait, finished, until it is done. What stays bounded: rows being fetched per
window (`max_in_flight`), rows being fetched or decoded per window (that plus the decoder
threads' batches), and bytes held by a process's windows (`max_bytes`:
downloaded bytes not yet decoded plus results not yet handed back, `ROW_OVERHEAD_BYTES` at
least per row, and the bytes the rows being fetched will bring at the mean row size so far;
see `Engine.may_start`); past either, no new download starts until rows finish or the front
moves. Decoder batches stop at `BATCH_ROWS` rows or `BATCH_BYTES`. Memory does not grow with
the data.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

from pipeline import fetch

# Bytes a row counts for besides its data (row dict, bookkeeping), so a window of rows that
# fail without bytes (404s behind a stalled front) is bounded too.
ROW_OVERHEAD_BYTES = 2048
# Rows a worker process starts before any has been fetched (see `Engine.may_start`).
SLOW_START_ROWS = 16
# A window waiting this long without any row finishing logs what it waits for.
STALL_SECONDS = 300.0
# The decoder threads wait this long for more fetched rows before sending a batch of fewer
# than `batch_size`: one message per few rows, not per row, when downloads trickle in.
_LINGER_SECONDS = 0.005
# Rows a decoder batch takes at most (one message to a decoder process, one thread hand-off).
# 32 -> 128 (issue 17; HTTP benchmark, CPU per image between 1,000 and 10,000 small images,
# rounds interleaved): 0.649 -> 0.588 ms at 0 ms per response (3 rounds), 0.711 -> 0.642 at
# 100 ms (2 rounds; 2,380 -> 2,700 images/s): fewer batch ends, where a decoder waits for its
# next batch, and fewer wake-ups per image on the cores the decoders share with this process.
BATCH_ROWS = 128
# A batch takes no more rows once it holds this many fetched bytes. The bytes travel in a
# buffer shared with the decoder process that grows to the largest batch and stays that size:
# 32 large photos per batch grew each buffer to 128 MB, counted in the RSS of both processes
# (ingest peaked 1163 MB at 200 photos, 1351 MB at 1000). Small images fill a batch by count.
BATCH_BYTES = 8 << 20


class Slot:
  """One row in flight: its bytes once fetched, then its result (or error)."""
  __slots__ = ("row", "data", "result", "done", "size", "cpu", "cache_hit", "unsaved",
               "digest", "window")

  def __init__(self, row: dict, window: Window):
    self.row = row
    self.data: bytes | None = None
    self.result = None
    self.done = False
    self.size = ROW_OVERHEAD_BYTES
    self.cpu: dict[str, float] = {}
    # What the download cache did for the row: whether it held the bytes, and the entries its
    # put failed to store (itself, or the whole batch its put completed), counted by the
    # bundle's thread: Beam counters incremented on the download loop's thread are lost.
    self.cache_hit = False
    self.unsaved = 0
    self.digest: str | None = None   # sha256 of `data` (hex) when the fetch computed it
    self.window = window


class Engine:
  """A worker process's downloads: the fetcher (its event loop), threads for files and the
  download cache, the limits, and the budget of bytes its windows may hold."""

  def __init__(self, fetcher: fetch.Fetcher, *, max_in_flight: int, max_bytes: int,
               file_threads: int):
    if min(max_in_flight, max_bytes, file_threads) < 1:
      raise ValueError(f"need max_in_flight, max_bytes and file_threads >= 1, got "
                       f"{max_in_flight!r}, {max_bytes!r}, {file_threads!r}")
    self.fetcher = fetcher
    self.max_in_flight = max_in_flight
    self.max_bytes = max_bytes
    self._files = concurrent.futures.ThreadPoolExecutor(file_threads,
                                                        thread_name_prefix="headstart-files")
    self.changed = threading.Condition()  # one lock for every window, slot and the budget
    self.held = 0                         # bytes held by all windows (guarded by `changed`)
    # Rows whose bytes are on their way, and (bytes, rows) fetched so far, failures as 0 bytes
    # (guarded by `changed`): see `may_start`.
    self.fetching = 0
    self._fetched = (0, 0)
    self._loop_cpu = 0.0                  # the loop thread's CPU seconds already reported

  def may_start(self) -> bool:
    """Whether one more row may start fetching (the caller holds the lock).

    The budget counts the bytes the rows being fetched will bring, at the mean size of the rows
    fetched so far: counting bytes only once they arrived let a window start all its rows
    first (2 x 256 photos of ~420 KB held 160 MB against a 64 MB budget). Until
    `SLOW_START_ROWS` sizes are known, at most that many rows are fetched at once; then the
    budget alone decides. (Doubling the rows in flight with every round trip instead took 3
    round trips to reach 256: 0.3 s at 100 ms per response, a tenth of the benchmark's job.)
    """
    total, rows = self._fetched
    if rows < SLOW_START_ROWS and self.fetching >= SLOW_START_ROWS:
      return False
    mean = total // rows if rows else 0
    return self.held + self.fetching * mean < self.max_bytes

  def fetched(self, size: int) -> None:
    """A row's fetch ended with `size` bytes (0: it failed); the caller holds the lock."""
    self.fetching -= 1
    total, rows = self._fetched
    self._fetched = (total + size, rows + 1)
    if rows < SLOW_START_ROWS:   # slow start: a waiting window may start more rows
      self.changed.notify_all()

  async def in_thread(self, slot: Slot, function: Callable, *args):
    """`function(*args)` on a file thread (blocking I/O: files, gs://, the download cache);
    its CPU counts as the slot's `fetch` time."""
    def timed():
      started = time.thread_time()
      try:
        return function(*args)
      finally:
        slot.cpu["fetch"] = slot.cpu.get("fetch", 0.0) + time.thread_time() - started
    return await asyncio.get_running_loop().run_in_executor(self._files, timed)

  def take_loop_cpu(self) -> float:
    """CPU seconds the download loop's thread used since the last call (any window's)."""
    thread = self.fetcher.loop_thread_id()
    if thread is None:
      return 0.0
    try:
      total = time.clock_gettime(time.pthread_getcpuclockid(thread))
    except (OSError, AttributeError):  # not Linux, or the thread is gone
      return 0.0
    with self.changed:
      delta, self._loop_cpu = total - self._loop_cpu, total
    return max(delta, 0.0)

  def close(self) -> None:
    """Stops the file threads and the fetcher's loop."""
    self._files.shutdown(wait=False, cancel_futures=True)
    self.fetcher.close()


class DecodeStage:
  """Threads that take fetched rows off a queue and decode them in batches.

  `decode_many(slots)` returns one result or exception per slot, in order (an isolated decoder
  sends the batch to one process as one message).
  """

  def __init__(self, decode_many: Callable[[Sequence[Slot]], list], workers: int,
               batch_size: int = BATCH_ROWS):
    if workers < 1 or batch_size < 1:
      raise ValueError(f"need workers >= 1 and batch_size >= 1, got {workers!r}, "
                       f"{batch_size!r}")
    self._decode_many = decode_many
    self._batch_size = batch_size
    # Rows the stage works on at once when busy: a batch per thread.
    self.capacity = batch_size * workers
    self._queue: queue.SimpleQueue[Slot | None] = queue.SimpleQueue()
    self._threads = [threading.Thread(target=self._serve, name=f"headstart-decode-{i}",
                                      daemon=True) for i in range(workers)]
    for thread in self._threads:
      thread.start()

  def put(self, slot: Slot) -> None:
    """Queues a fetched row for decoding (from any thread)."""
    self._queue.put(slot)

  def close(self) -> None:
    """Stops the threads once the rows queued before are decoded."""
    for _ in self._threads:
      self._queue.put(None)
    for thread in self._threads:
      thread.join()

  def _batch(self, first: Slot) -> tuple[list[Slot], bool]:
    """`first` and the rows queued after it, up to a batch (`batch_size` rows or
    `BATCH_BYTES`); True when told to stop."""
    batch, deadline = [first], time.monotonic() + _LINGER_SECONDS
    held = len(first.data or b"")
    while len(batch) < self._batch_size and held < BATCH_BYTES:
      try:
        slot = self._queue.get_nowait()
      except queue.Empty:
        # Polled, not a timed get: a decoder thread was found stuck for minutes in
        # SimpleQueue.get(timeout=<under 5 ms>) long past its deadline, holding its batch (the
        # ingest hang of fb3e0c1). A sleep of at most 1 ms between polls lingers the same.
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          break
        time.sleep(min(remaining, 0.001))
        continue
      if slot is None:
        return batch, True
      batch.append(slot)
      held += len(slot.data or b"")
    return batch, False

  def _serve(self) -> None:
    while (first := self._queue.get()) is not None:
      batch, stop = self._batch(first)
      started = time.thread_time()
      try:
        results = list(self._decode_many(batch))
      except BaseException as error:  # noqa: BLE001 (handed back: the bundle fails on it)
        results = [_as_exception(error)] * len(batch)
      if len(results) != len(batch):
        # A slot without a result would never finish and its bundle would wait forever.
        results = [RuntimeError(f"decoder returned {len(results)} results for {len(batch)} "
                                "rows")] * len(batch)
      share = (time.thread_time() - started) / len(batch)
      for slot in batch:
        slot.cpu["handoff"] = share
      _finish(batch, results)
      if stop:
        return


def _as_exception(error: BaseException) -> Exception:
  """`error` as an Exception the bundle can raise (a cancellation or exit, wrapped)."""
  return error if isinstance(error, Exception) else RuntimeError(f"row ended by {error!r}")


def _finish(slots: Sequence[Slot], results: Sequence) -> None:
  """Marks slots done with their results and wakes whoever waits on their windows."""
  if not slots:
    return
  engine = slots[0].window.engine
  with engine.changed:
    for slot, result in zip(slots, results):
      size = 0 if slot.window.abandoned else ROW_OVERHEAD_BYTES + (
          len(result.get("image", b"")) if isinstance(result, dict) else 0)
      engine.held += size - slot.size
      slot.size, slot.result, slot.data, slot.done = size, result, None, True
      slot.window.unfinished -= 1
    engine.changed.notify_all()


class Window:
  """The rows of one bundle in flight, handed back in input order.

  `fetch_one(slot)` is a coroutine returning the row's bytes (run on the fetcher's loop).
  """

  def __init__(self, engine: Engine, decoding: DecodeStage,
               fetch_one: Callable[[Slot], Awaitable[bytes]], emit_batch: int = 32):
    self.engine = engine
    self._decoding = decoding
    self._fetch_one = fetch_one
    self._emit_batch = emit_batch
    self._loop = engine.fetcher.loop()
    self._slots: collections.deque[Slot] = collections.deque()
    self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
    self.unfinished = 0  # rows being fetched or decoded (guarded by engine.changed)
    self.fetching = 0    # rows whose bytes are on their way (guarded by engine.changed)
    # Rows being fetched are at most `max_in_flight`; with the decoder's batches on top, all
    # unfinished rows at most this many. When both counted against `max_in_flight` alone, the
    # two decoder batches (64 rows) took their places from downloads: 192 of 256 rows were
    # being fetched at 100 ms per response, 1,514 images/s over 10,000 URLs (issue 17).
    self._unfinished_limit = engine.max_in_flight + decoding.capacity
    # Rows pushed but not yet started, and whether the loop has been woken for them (guarded
    # by engine.changed): one wake-up per batch of rows, not per row, while the loop is busy
    # (each wake-up is a write to the loop's self-pipe and a loop iteration).
    self._pending: list[Slot] = []
    self._woken = False
    # Set when its bundle failed (`abandon`): the bytes its rows held go back to the budget.
    self.abandoned = False

  def _start_pending(self) -> None:
    """On the loop: starts the downloads of the rows pushed since the last wake-up."""
    with self.engine.changed:
      pending, self._pending, self._woken = self._pending, [], False
    for slot in pending:
      task = self._loop.create_task(self._fetch(slot))
      self._tasks.add(task)
      task.add_done_callback(self._tasks.discard)

  async def _fetch(self, slot: Slot) -> None:
    try:
      data = await self._fetch_one(slot)
    except BaseException as error:  # noqa: BLE001 (handed back; a cancelled fetch too)
      with self.engine.changed:
        self.engine.fetched(0)
        self._fetched()
      _finish([slot], [_as_exception(error)])
      if isinstance(error, asyncio.CancelledError):
        raise
      return
    with self.engine.changed:
      self.engine.fetched(len(data))
      self._fetched()
      abandoned = self.abandoned
      if not abandoned:
        self.engine.held += len(data)
        slot.size += len(data)
        slot.data = data
    if abandoned:   # nobody will take this row: it ends here, holding nothing
      _finish([slot], [None])
    else:
      self._decoding.put(slot)

  def _fetched(self) -> None:
    """One of this window's rows has its bytes, or failed (the caller holds the lock)."""
    self.fetching -= 1
    if self.fetching == self.engine.max_in_flight - 1:  # a push may be waiting for this
      self.engine.changed.notify_all()

  def _ready(self, at_least: int) -> list[Slot]:
    """Pops the finished slots at the front when there are `at_least` of them, at most
    `emit_batch` (the caller holds the lock)."""
    count = 0
    for slot in self._slots:
      if not slot.done or count == self._emit_batch:
        break
      count += 1
    if count < at_least:
      return []
    ready = [self._slots.popleft() for _ in range(count)]
    self.engine.held -= sum(slot.size for slot in ready)
    self.engine.changed.notify_all()
    return ready

  def push(self, row: dict) -> list[Slot]:
    """Starts fetching `row` once the limits allow; returns finished slots from the front
    (a batch of them, or none yet), in input order."""
    engine, out = self.engine, []
    with engine.changed:
      while (self.fetching >= engine.max_in_flight or self.unfinished >= self._unfinished_limit
             or not engine.may_start()):
        ready = self._ready(1)
        if ready:
          out += ready
          continue
        self._wait()
      slot = Slot(row, self)
      self._slots.append(slot)
      self.unfinished += 1
      self.fetching += 1
      engine.fetching += 1
      engine.held += slot.size
      out += self._ready(self._emit_batch)
      self._pending.append(slot)
      wake, self._woken = not self._woken, True
    if wake:
      self._loop.call_soon_threadsafe(self._start_pending)
    return out

  def drain(self) -> list[Slot]:
    """Waits for every row in flight; returns them all, in input order."""
    out = []
    with self.engine.changed:
      while self._slots:
        ready = self._ready(1)
        if ready:
          out += ready
        else:
          self._wait()
    return out

  def abandon(self) -> None:
    """Gives up the window (its bundle failed): its rows' bytes go back to the process's
    budget at once, rows not started never start and downloads under way are cancelled.
    Without this, every failed bundle left its bytes counted, and a worker whose retries had
    used up the budget would start nothing again."""
    engine = self.engine
    with engine.changed:
      if self.abandoned:
        return
      self.abandoned = True
      engine.fetching -= len(self._pending)
      self.fetching -= len(self._pending)
      self.unfinished -= len(self._pending)
      self._pending = []
      for slot in self._slots:
        engine.held -= slot.size
        slot.size = 0
      self._slots.clear()
      engine.changed.notify_all()
    self._loop.call_soon_threadsafe(self._cancel_tasks)

  def _cancel_tasks(self) -> None:
    for task in list(self._tasks):
      task.cancel()

  def _wait(self) -> None:
    """Waits for a row to finish (the caller holds the lock). When none has for
    `STALL_SECONDS`, says what the window waits for: a stuck row is named, not silent."""
    engine = self.engine
    if engine.changed.wait(STALL_SECONDS):
      return
    front = self._slots[0] if self._slots else None
    state = ("none" if front is None else "decoding" if front.data is not None
             else "done" if front.done else "fetching")
    logging.getLogger("headstart").warning(
        "ingest: no row finished for %.0f s; front row %s (%s); this window: %d rows, %d "
        "unfinished; process: %d of %d bytes held, %d rows fetching", STALL_SECONDS,
        front.row.get("location") if front else "-", state, len(self._slots), self.unfinished,
        engine.held, engine.max_bytes, engine.fetching)
