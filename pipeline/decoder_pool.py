"""Runs image decoding in worker processes, so a decoder crash or hang costs one input, not the job.

    decode = IsolatedDecoder(image_decode.prepare_record, processes=2, timeout=30.0)
    record = decode(row, data, settings)   # or raises image_decode.ImageError

A crafted file can make a native decoder segfault or loop forever (reliability matrix rows
31–32). Each call goes to one idle worker (`python -m pipeline.decode_worker`, which imports
only OpenCV, Pillow and NumPy) over a pipe, with the source bytes in a memory block shared
with that worker (see `decode_worker`), and has `timeout` seconds to answer. A worker that
dies or overruns is killed and replaced. A crash is retried once in a fresh worker (it can be
the machine's fault, not the input's) before the input is dead-lettered as `decoder_crash`; a
hang becomes `decode_timeout` at once. Other calls in flight are unaffected: each worker serves
one call at a time.
"""
from __future__ import annotations

import os
import pickle
import queue
import select
import subprocess
import sys
import threading
from collections.abc import Callable

from pipeline import decode_worker, image_decode

_ATTEMPTS = 2


# Bytes arguments at least this long go through the shared buffer, not the pipe.
_SHARED_MIN_BYTES = 64 * 1024


class _Worker:
  """One child process, its pipes and (on Linux) the buffer shared with it for big arguments."""

  def __init__(self, share_bytes: bool = True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    command = [sys.executable, "-m", "pipeline.decode_worker"]
    self.shared = None
    if share_bytes and hasattr(os, "memfd_create"):
      self.shared = decode_worker.SharedBuffer(os.memfd_create("headstart-decode"))
      command += ["--buffer-fd", str(self.shared.fd)]
    try:
      self.process = subprocess.Popen(
          command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
          pass_fds=(self.shared.fd,) if self.shared else ())
    except BaseException:
      if self.shared is not None:
        self.shared.close()
      raise

  def _share(self, request: tuple) -> tuple:
    """The request with its big bytes arguments moved into the shared buffer."""
    module, function, args = request
    big = [i for i, arg in enumerate(args) if isinstance(arg, bytes)
           and len(arg) >= _SHARED_MIN_BYTES]
    if self.shared is None or not big:
      return request
    places = dict(zip(big, self.shared.put([args[i] for i in big])))
    return module, function, tuple(places.get(i, arg) for i, arg in enumerate(args))

  def call(self, request: tuple, timeout: float):
    """Sends one request; returns the reply, or raises TimeoutError / EOFError."""
    decode_worker.write_message(self.process.stdin, self._share(request))
    ready, _, _ = select.select([self.process.stdout], [], [], timeout)
    if not ready:
      raise TimeoutError
    reply = decode_worker.read_message(self.process.stdout)
    if reply is None:
      raise EOFError
    return reply

  def kill(self) -> None:
    self.process.kill()
    self.process.wait()
    if self.shared is not None:
      self.shared.close()
      self.shared = None


class IsolatedDecoder:
  """Callable running `function(*args)` in worker processes with a per-call timeout."""

  def __init__(self, function: Callable, *, processes: int, timeout: float,
               share_bytes: bool = True):
    if processes < 1 or timeout <= 0:
      raise ValueError(f"need processes >= 1 and timeout > 0, got {processes!r}, {timeout!r}")
    self._name = (function.__module__, function.__name__)
    self._timeout = timeout
    self._share_bytes = share_bytes  # False: big arguments go through the pipe too
    self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
    for _ in range(processes):
      self._idle.put(None)  # a slot; its worker starts on first use
    self._lock = threading.Lock()
    self._workers: list[_Worker] = []

  def _start(self) -> _Worker:
    try:
      worker = _Worker(self._share_bytes)
    except BaseException:
      self._idle.put(None)  # keep the slot, or every later call would wait for it forever
      raise
    with self._lock:
      self._workers.append(worker)
    return worker

  def _retire(self, worker: _Worker) -> None:
    worker.kill()
    with self._lock:
      self._workers.remove(worker)

  def __call__(self, *args):
    """Runs the function on `args` in a worker.

    Raises:
      image_decode.ImageError: `decode_timeout` or `decoder_crash`, or the function's own.
    """
    request = (*self._name, args)
    for _ in range(_ATTEMPTS):
      worker = self._idle.get() or self._start()
      try:
        ok, value = worker.call(request, self._timeout)
      except TimeoutError:
        self._retire(worker)
        raise image_decode.ImageError(
            "decode_timeout", f"decoding took longer than {self._timeout:g}s; the worker was "
            "killed") from None
      except (EOFError, BrokenPipeError, pickle.UnpicklingError):
        self._retire(worker)
        continue  # retried once in a fresh worker: the crash may not be the input's fault
      finally:
        if worker.process.poll() is None:
          self._idle.put(worker)
        else:
          self._idle.put(None)
      if ok:
        return value
      if isinstance(value, image_decode.ImageError):
        raise value
      # Any other exception is the decoder failing on this input: a data problem, not the job's.
      raise image_decode.ImageError("decode_failed", f"{type(value).__name__}: {value}")
    raise image_decode.ImageError("decoder_crash", "the decoder process died on this input "
                                  f"({_ATTEMPTS} attempts)")

  def close(self) -> None:
    """Stops the worker processes."""
    with self._lock:
      workers, self._workers = list(self._workers), []
    for worker in workers:
      worker.process.stdin.close()
      worker.kill()
