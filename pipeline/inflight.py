"""Many rows in flight per worker: fetched on a thread pool, decoded in batches, handed back in
the order they came (no Beam here; `transforms.FetchDecodeFn` drives it).

    engine = inflight.Engine(fetch_threads=256, max_bytes=256 << 20)    # one per process
    decoding = inflight.DecodeStage(decode_many, workers=2)             # one per DoFn instance
    window = inflight.Window(engine, decoding, fetch_one)               # one per bundle
    for row in rows:
      ready = window.push(row)         # returns the finished rows at the front, in input order
    rest = window.drain()              # waits for the others

Why this shape: a download spends its time waiting on the network, a decode spends it on the
CPU. Before issue 17 a bundle fetched and decoded batches of 4-64 rows in lock step, so the
slowest download of a batch held the rest and at most 16 downloads were in flight: at 100 ms
per response one worker managed ~90 images/s. Now a row's download starts as soon as a fetch
thread is free (`fetch_threads` per process, each download still bounded by the per-host
limit), its bytes go to a queue that the decoder threads empty in batches (one message to an
isolated decoder process per batch, not per image), and the bundle thread takes finished rows
from the front of its window.

Rows leave in input order, so the same input gives byte-identical shards whatever the network
did. A slow download at the front does not stop the others: rows behind it keep being fetched
and decoded, and wait, finished, until it is done. What stays bounded: rows being fetched or
decoded per window (`fetch_threads`), and bytes held by a process's windows (`max_bytes`:
downloaded bytes not yet decoded plus results not yet handed back, `ROW_OVERHEAD_BYTES` at
least per row); past either, no new download starts until rows finish or the front moves.
Memory does not grow with the data.
"""
from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Sequence

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
  """A worker process's download threads and the budget of bytes its windows may hold."""

  def __init__(self, fetch_threads: int, max_bytes: int):
    if fetch_threads < 1 or max_bytes < 1:
      raise ValueError(f"need fetch_threads >= 1 and max_bytes >= 1, got {fetch_threads!r}, "
                       f"{max_bytes!r}")
    self.fetch_threads = fetch_threads
    self.max_bytes = max_bytes
    self.pool = concurrent.futures.ThreadPoolExecutor(fetch_threads,
                                                      thread_name_prefix="headstart-fetch")
    self.changed = threading.Condition()  # one lock for every window, slot and the budget
    self.held = 0                         # bytes held by all windows (guarded by `changed`)

  def close(self) -> None:
    """Stops the download threads (downloads still running end on their own deadlines)."""
    self.pool.shutdown(wait=False, cancel_futures=True)


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
    """Queues a fetched row for decoding."""
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
      except Exception as error:  # noqa: BLE001 (a broken decoder fails its rows, not the job)
        results = [error] * len(batch)
      share = (time.thread_time() - started) / len(batch)
      for slot, result in zip(batch, results):
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
  """The rows of one bundle in flight, handed back in input order."""

  def __init__(self, engine: Engine, decoding: DecodeStage,
               fetch_one: Callable[[dict], bytes], emit_batch: int = 32):
    self.engine = engine
    self._decoding = decoding
    self._fetch_one = fetch_one
    self._emit_batch = emit_batch
    self._slots: collections.deque[Slot] = collections.deque()
    self.unfinished = 0  # rows being fetched or decoded (guarded by engine.changed)

  def _fetch(self, slot: Slot) -> None:
    """Runs on a download thread: fetches, then queues the bytes for decoding."""
    started = time.thread_time()
    try:
      data = self._fetch_one(slot.row)
    except Exception as error:  # noqa: BLE001 (handed back as the row's result)
      slot.cpu["fetch"] = time.thread_time() - started
      _finish([slot], [error])
      return
    slot.cpu["fetch"] = time.thread_time() - started
    with self.engine.changed:
      self.engine.held += len(data)
      slot.size += len(data)
      slot.data = data
    self._decoding.put(slot)

  def _ready(self, at_least: int) -> list[Slot]:
    """Pops the finished slots at the front when there are `at_least` of them (caller holds
    the lock)."""
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
      while self.unfinished >= engine.fetch_threads or engine.held >= engine.max_bytes:
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
    engine.pool.submit(self._fetch, slot)
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
