"""Many rows in flight per worker: downloaded as coroutines on one event loop, decoded in
batches, handed back in the order they came (no Beam here; `fetch_decode.FetchDecodeFn` drives
it).

    engine = inflight.Engine(fetcher, max_in_flight=256, max_bytes=256 << 20, file_threads=16)
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
and decoded, and wait, finished, until it is done. What stays bounded: rows being fetched or
decoded per window (`max_in_flight`), and bytes held by a process's windows (`max_bytes`:
downloaded bytes not yet decoded plus results not yet handed back, `ROW_OVERHEAD_BYTES` at
least per row); past either, no new download starts until rows finish or the front moves.
Memory does not grow with the data.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

from pipeline import fetch

# Bytes a row counts for besides its data (row dict, bookkeeping), so a window of rows that
# fail without bytes (404s behind a stalled front) is bounded too.
ROW_OVERHEAD_BYTES = 2048
# The decoder threads wait this long for more fetched rows before sending a batch of fewer
# than `batch_size`: one message per few rows, not per row, when downloads trickle in.
_LINGER_SECONDS = 0.005


class Slot:
  """One row in flight: its bytes once fetched, then its result (or error)."""
  __slots__ = ("row", "data", "result", "done", "size", "cpu", "window")

  def __init__(self, row: dict, window: Window):
    self.row = row
    self.data: bytes | None = None
    self.result = None
    self.done = False
    self.size = ROW_OVERHEAD_BYTES
    self.cpu: dict[str, float] = {}
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
    self._loop_cpu = 0.0                  # the loop thread's CPU seconds already reported

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
               batch_size: int = 32):
    if workers < 1 or batch_size < 1:
      raise ValueError(f"need workers >= 1 and batch_size >= 1, got {workers!r}, "
                       f"{batch_size!r}")
    self._decode_many = decode_many
    self._batch_size = batch_size
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
    """`first` and the rows queued after it, up to a batch; True when told to stop."""
    batch, deadline = [first], time.monotonic() + _LINGER_SECONDS
    while len(batch) < self._batch_size:
      try:
        slot = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if slot is None:
        return batch, True
      batch.append(slot)
    return batch, False

  def _serve(self) -> None:
    while (first := self._queue.get()) is not None:
      batch, stop = self._batch(first)
      started = time.thread_time()
      try:
        results = self._decode_many(batch)
      except Exception as error:  # noqa: BLE001 (handed back: the bundle fails on it)
        results = [error] * len(batch)
      share = (time.thread_time() - started) / len(batch)
      for slot in batch:
        slot.cpu["handoff"] = share
      _finish(batch, results)
      if stop:
        return


def _finish(slots: Sequence[Slot], results: Sequence) -> None:
  """Marks slots done with their results and wakes whoever waits on their windows."""
  if not slots:
    return
  engine = slots[0].window.engine
  with engine.changed:
    for slot, result in zip(slots, results):
      size = ROW_OVERHEAD_BYTES + (len(result.get("image", b"")) if isinstance(result, dict)
                                   else 0)
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
    # Rows pushed but not yet started, and whether the loop has been woken for them (guarded
    # by engine.changed): one wake-up per batch of rows, not per row, while the loop is busy
    # (each wake-up is a write to the loop's self-pipe and a loop iteration).
    self._pending: list[Slot] = []
    self._woken = False

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
    except Exception as error:  # noqa: BLE001 (handed back as the row's result)
      _finish([slot], [error])
      return
    with self.engine.changed:
      self.engine.held += len(data)
      slot.size += len(data)
      slot.data = data
    self._decoding.put(slot)

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
      while self.unfinished >= engine.max_in_flight or engine.held >= engine.max_bytes:
        ready = self._ready(1)
        if ready:
          out += ready
          continue
        engine.changed.wait()
      slot = Slot(row, self)
      self._slots.append(slot)
      self.unfinished += 1
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
          self.engine.changed.wait()
    return out
