"""Runs image decoding in subprocesses, so a decoder crash or hang costs one input, not the job.

    decode = IsolatedDecoder(image_decode.prepare_record, processes=2, timeout=30.0)
    record = decode(row, data, settings)   # or raises image_decode.ImageError

A crafted file can make a native decoder segfault or loop forever (reliability matrix rows
31–32). Each call runs in a pool of spawned processes (which import only OpenCV, Pillow and
NumPy, not TensorFlow) with at most `processes` calls in flight, so the timeout measures
decoding, not queueing. A hang kills the pool (`decode_timeout`); a crash breaks it. Calls that
were in flight in a broken pool are retried once alone in a private process, so only an input
that really breaks the decoder is dead-lettered as `decoder_crash`.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from pipeline import image_decode

class IsolatedDecoder:
  """Callable wrapper running `function(*args)` in a subprocess pool with a per-call timeout."""

  def __init__(self, function: Callable, *, processes: int, timeout: float):
    if processes < 1 or timeout <= 0:
      raise ValueError(f"need processes >= 1 and timeout > 0, got {processes!r}, {timeout!r}")
    self._function = function
    self._processes = processes
    self._timeout = timeout
    self._lock = threading.Lock()
    self._slots = threading.Semaphore(processes)
    self._pool: concurrent.futures.ProcessPoolExecutor | None = None
    self._generation = 0

  def _current_pool(self) -> tuple[concurrent.futures.ProcessPoolExecutor, int]:
    with self._lock:
      if self._pool is None:
        # spawn: a fork of a threaded worker holding TensorFlow/gRPC state can deadlock.
        self._pool = concurrent.futures.ProcessPoolExecutor(
            self._processes, mp_context=multiprocessing.get_context("spawn"))
      return self._pool, self._generation

  def _discard(self, generation: int) -> None:
    """Kills the pool of `generation` (once, whichever thread sees the failure first)."""
    with self._lock:
      if self._pool is None or generation != self._generation:
        return
      pool, self._pool = self._pool, None
      self._generation += 1
    self._kill(pool)

  @staticmethod
  def _kill(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    # A hung child never returns by itself: the executor has no public kill, so use its
    # process table.
    for process in list((getattr(pool, "_processes", None) or {}).values()):
      process.kill()
    pool.shutdown(wait=False, cancel_futures=True)

  def _run(self, pool, generation: int | None, args):
    try:
      return pool.submit(self._function, *args).result(timeout=self._timeout)
    except concurrent.futures.TimeoutError:
      self._kill(pool) if generation is None else self._discard(generation)
      raise image_decode.ImageError(
          "decode_timeout", f"decoding took longer than {self._timeout:g}s; the decoder "
          "process was killed") from None

  def __call__(self, *args):
    """Runs the function on `args` in a subprocess.

    Raises:
      image_decode.ImageError: `decode_timeout` or `decoder_crash`, or the function's own.
    """
    with self._slots:
      pool, generation = self._current_pool()
      try:
        return self._run(pool, generation, args)
      except BrokenProcessPool:
        self._discard(generation)
    # The shared pool broke while this call was in flight, maybe because of another input:
    # retry alone in a private process, so only the input that really kills it is blamed.
    private = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"))
    try:
      return self._run(private, None, args)
    except BrokenProcessPool:
      raise image_decode.ImageError("decoder_crash", "the decoder process died on this input "
                                    "(twice, the second time alone)") from None
    finally:
      private.shutdown(wait=False, cancel_futures=True)

  def close(self) -> None:
    """Stops the worker processes."""
    with self._lock:
      pool, self._pool = self._pool, None
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)
