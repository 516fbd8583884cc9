"""Runs image decoding in worker processes, so a decoder crash or hang costs one input, not the job.

    decode = IsolatedDecoder(image_decode.prepare_record, processes=2, timeout=30.0)
    decode.start()                         # optional: workers start and import now, in parallel
    record = decode(row, data, settings)   # or raises image_decode.ImageError

A crafted file can make a native decoder segfault or loop forever (reliability matrix rows
31–32). `map(calls)` sends a batch of calls to one idle worker (`python -m
pipeline.decode_worker`, which imports only OpenCV, Pillow and NumPy) over a pipe, big source
bytes in a memory block shared with that worker (see `decode_worker`); the worker answers the
calls one by one, and each answer has `timeout` seconds from the one before (`__call__` is a
batch of one). A worker that dies or overruns is killed and replaced. A crash is retried once
in a fresh worker (it can be the machine's fault, not the input's) before the input is
dead-lettered as `decoder_crash`; a hang becomes `decode_timeout` at once; the calls after it
go on in a fresh worker. Other batches are unaffected: each worker serves one batch at a time.

A hostile image is contained, not trusted: each worker runs under an address-space limit
(`max_memory_bytes`: unbounded allocation ends in `decode_out_of_memory`) and a CPU-time limit
per call (SIGXCPU from the kernel: `decode_timeout`); its reply is a frame of raw bytes parsed
here without unpickling (`decode_worker.decode_reply`), read under the same deadline as the
call, so a child that writes half a reply and stalls is killed like one that never answers, and
a reply that breaks the framing kills the worker (`decoder_crash`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from pipeline import decode_worker, image_decode

_ATTEMPTS = 2
_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")
_READ_BYTES = 1 << 20
_PIPE_BYTES = 1 << 20
# How long the parent lets a batch's replies pile up before it reads them (see `_Worker.calls`).
_GATHER_SECONDS = 0.002


# How long `IsolatedDecoder.start` waits for a worker to import its function (or the decode
# timeout, if longer): a cold import of OpenCV and NumPy can take seconds.
_WARM_UP_SECONDS = 60.0
# Bytes arguments at least this long go through the shared buffer, not the pipe.
_SHARED_MIN_BYTES = 64 * 1024


def _widen(fd: int) -> None:
  """Gives a pipe 1 MiB (Linux; the default is 64 KiB): a batch's replies, ~30 KB each for a
  224 px JPEG, then flow without the child waiting for the parent after every other one."""
  with contextlib.suppress(OSError, AttributeError):
    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


def _error_of(reply: dict) -> image_decode.ImageError:
  """The dead-letter error for a worker's error reply (plain fields, never an object)."""
  if reply["type"] == "ImageError" and _REASON.fullmatch(reply["reason"]):
    return image_decode.ImageError(reply["reason"], reply["message"])
  if reply["type"] == "MemoryError":
    return image_decode.ImageError("decode_out_of_memory", "decoding needed more memory than "
                                   f"the worker's limit: {reply['message']}")
  # Any other exception is the decoder failing on this input: a data problem, not the job's.
  return image_decode.ImageError("decode_failed", f"{reply['type']}: {reply['message']}")


class _Worker:
  """One child process, its pipes and (on Linux) the buffer shared with it for big arguments."""

  def __init__(self, share_bytes: bool = True, limits: tuple[int, float] = (0, 0.0)):
    # NumPy's and OpenCV's OpenBLAS each start a thread per core at import, which decoding
    # never uses: those threads spun on the cores the decoders share (perf, HTTP benchmark:
    # ~0.024 ms of CPU per image).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
               OPENBLAS_NUM_THREADS="1")
    command = [sys.executable, "-m", "pipeline.decode_worker",
               "--max-memory-bytes", str(limits[0]), "--cpu-seconds", str(limits[1])]
    self.shared = None
    self._received = bytearray()  # reply bytes read ahead; consumed up to `_start`
    self._start = 0
    self._chunk = bytearray(_READ_BYTES)
    self._chunk_view = memoryview(self._chunk)
    if share_bytes and hasattr(os, "memfd_create"):
      self.shared = decode_worker.SharedBuffer(os.memfd_create("headstart-decode"))
      command += ["--buffer-fd", str(self.shared.fd)]
    try:
      self.process = subprocess.Popen(
          command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0,
          pass_fds=(self.shared.fd,) if self.shared else ())
    except BaseException:
      if self.shared is not None:
        self.shared.close()
      raise
    for pipe in (self.process.stdin, self.process.stdout):
      _widen(pipe.fileno())

  def _share(self, calls: list[tuple]) -> list[tuple]:
    """The calls with their big bytes arguments moved into the shared buffer."""
    big = [(c, i) for c, args in enumerate(calls) for i, arg in enumerate(args)
           if isinstance(arg, bytes) and len(arg) >= _SHARED_MIN_BYTES]
    if self.shared is None or not big:
      return calls
    places = dict(zip(big, self.shared.put([calls[c][i] for c, i in big])))
    return [tuple(places.get((c, i), arg) for i, arg in enumerate(args))
            for c, args in enumerate(calls)]

  def _fill(self, size: int, deadline: float, gather: float = 0.0) -> None:
    """Reads until `size` unconsumed reply bytes are buffered, before `deadline`; a child that
    stops half way is no different from one that never answers. Reads what is there (several
    replies at once), first letting `gather` seconds of replies pile up when they are not
    there yet.

    Raises:
      TimeoutError: the deadline passed; EOFError: the child closed its end (it died).
    """
    stream = self.process.stdout
    if gather and len(self._received) - self._start < size:
      time.sleep(min(gather, max(0.0, deadline - time.monotonic())))
    while len(self._received) - self._start < size:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([stream], [], [], left)[0]:
        raise TimeoutError
      # Into a buffer kept for the worker's life: a fresh 1 MiB bytes per read cost more than
      # the read itself.
      count = stream.readinto(self._chunk)
      if not count:
        raise EOFError
      if self._start:  # drop what was consumed only when more arrives, not once per reply
        del self._received[:self._start]
        self._start = 0
      self._received += self._chunk_view[:count]

  def calls(self, name: tuple[str, str], calls: list[tuple], timeout: float):
    """Sends a batch of calls; yields each parsed reply (see `decode_worker.decode_reply`) as
    it arrives, each within `timeout` seconds of the one before.

    Raises:
      TimeoutError, EOFError (see `_read`); decode_worker.BadReply: a reply breaking the framing.
    """
    decode_worker.write_message(self.process.stdin, (*name, self._share(calls)))
    for left in range(len(calls) - 1, -1, -1):
      # Waking for every reply the moment it lands cost a context switch per image on cores
      # the decoders share with this process; replies before a batch's last one are collected
      # a few at a time (the worker does not wait for them: the pipe holds 1 MiB).
      yield self._reply(time.monotonic() + timeout, _GATHER_SECONDS if left else 0.0)

  def warm_up(self, name: tuple[str, str], timeout: float) -> tuple[bool, object]:
    """Has the child import the function's module now; its reply (see `decode_worker`).

    Raises:
      TimeoutError, EOFError, decode_worker.BadReply: as `calls`.
    """
    decode_worker.write_message(self.process.stdin, (*name, []))
    return self._reply(time.monotonic() + timeout)

  def _reply(self, deadline: float, gather: float = 0.0) -> tuple[bool, object]:
    """The next reply frame, parsed (see `decode_worker.decode_reply`), read before `deadline`."""
    header = decode_worker.REPLY_HEADER.size
    self._fill(header, deadline, gather)
    # The parts leave the read-ahead buffer with one copy each (a bytearray slice, then bytes of
    # it, was two); a view is released at once so the next read can resize the buffer.
    with memoryview(self._received) as view:
      kind, text_size, blob_size = decode_worker.reply_sizes(
          bytes(view[self._start:self._start + header]))
    self._fill(header + text_size + blob_size, deadline)  # may move the frame to the front
    text_start = self._start + header
    blob_start = text_start + text_size
    self._start = blob_start + blob_size
    with memoryview(self._received) as view:
      return decode_worker.decode_reply(kind, bytes(view[text_start:blob_start]),
                                        bytes(view[blob_start:self._start]))

  def died_of_cpu_limit(self) -> bool:
    """True when the kernel ended the child for using up its CPU time (SIGXCPU)."""
    try:
      return self.process.wait(timeout=1.0) == -signal.SIGXCPU
    except subprocess.TimeoutExpired:
      return False

  def kill(self) -> None:
    self.process.kill()
    self.process.wait()
    if self.shared is not None:
      self.shared.close()
      self.shared = None


class IsolatedDecoder:
  """Callable running `function(*args)` in worker processes with a per-call timeout."""

  def __init__(self, function: Callable, *, processes: int, timeout: float,
               share_bytes: bool = True, max_memory_bytes: int = 0,
               cpu_seconds: float | None = None):
    if processes < 1 or timeout <= 0:
      raise ValueError(f"need processes >= 1 and timeout > 0, got {processes!r}, {timeout!r}")
    self._name = (function.__module__, function.__name__)
    self._timeout = timeout
    # Per call: the wall-clock deadline here, and the kernel's CPU-time limit in the child.
    self._limits = (max_memory_bytes, timeout if cpu_seconds is None else cpu_seconds)
    self._share_bytes = share_bytes  # False: big arguments go through the pipe too
    self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
    for _ in range(processes):
      self._idle.put(None)  # a slot; its worker starts on first use
    self._lock = threading.Lock()
    self._workers: list[_Worker] = []

  def start(self) -> None:
    """Starts every worker not yet running and waits until each has imported the function's
    module (in parallel), so a job's first batches do not wait ~0.2 s per worker for it: the
    HTTP benchmark's first images left 0.2 s after its first downloads. A worker that fails
    to start or to import is retired; its slot starts a worker on first use, as before."""
    slots = []
    with contextlib.suppress(queue.Empty):
      while True:
        slots.append(self._idle.get_nowait())
    started = []
    for worker in slots:
      if worker is None:
        try:
          worker = self._start()
        except OSError:
          continue  # `_start` kept the slot: the first call starts the worker (or fails)
      started.append(worker)
    for worker in started:
      try:
        ok, _ = worker.warm_up(self._name, max(self._timeout, _WARM_UP_SECONDS))
      except (TimeoutError, EOFError, BrokenPipeError, decode_worker.BadReply):
        ok = False
      if ok:
        self._idle.put(worker)
      else:
        self._retire(worker)
        self._idle.put(None)

  def _start(self) -> _Worker:
    try:
      worker = _Worker(self._share_bytes, self._limits)
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
      image_decode.ImageError: `decode_timeout`, `decode_out_of_memory`, `decoder_crash`, or
        the function's own.
    """
    (result,) = self.map([args])
    if isinstance(result, image_decode.ImageError):
      raise result
    return result

  def map(self, calls: Sequence[tuple]) -> list:
    """Runs the function on each args tuple of `calls`, as one batch in one worker where
    nothing goes wrong; returns per call its result or its `image_decode.ImageError`.

    A call that hangs or breaks the framing costs that call (its worker is replaced); one that
    kills its worker is tried once more first. The calls after it go on in a fresh worker.
    """
    results: list = [None] * len(calls)
    pending = list(range(len(calls)))
    crashed: set[int] = set()
    while pending:
      worker = self._idle.get() or self._start()
      done = 0
      try:
        for ok, value in worker.calls(self._name, [calls[i] for i in pending], self._timeout):
          call = calls[pending[done]]
          if ok and call and isinstance(call[0], dict):  # sent against its row: see encode_reply
            value = decode_worker.merge_reply(call[0], value)
          results[pending[done]] = value if ok else _error_of(value)
          done += 1
      except TimeoutError:
        self._retire(worker)
        results[pending[done]] = image_decode.ImageError(
            "decode_timeout", f"decoding took longer than {self._timeout:g}s; the worker was "
            "killed")
        done += 1
      except decode_worker.BadReply as error:
        self._retire(worker)
        results[pending[done]] = image_decode.ImageError(
            "decoder_crash", f"the decoder process sent a malformed reply ({error}); it was "
            "killed")
        done += 1
      except (EOFError, BrokenPipeError):
        cpu = worker.died_of_cpu_limit()
        self._retire(worker)
        index = pending[done]
        if cpu:
          results[index] = image_decode.ImageError(
              "decode_timeout", f"decoding used more than {self._limits[1]:g}s of CPU time; "
              "the kernel ended the worker")
          done += 1
        elif index in crashed:
          results[index] = image_decode.ImageError(
              "decoder_crash", f"the decoder process died on this input ({_ATTEMPTS} attempts)")
          done += 1
        else:
          crashed.add(index)  # retried once in a fresh worker: the crash may not be its fault
      finally:
        if worker.process.poll() is None:
          self._idle.put(worker)
        else:
          self._idle.put(None)
      pending = pending[done:]
    return results

  def close(self) -> None:
    """Stops the worker processes."""
    with self._lock:
      workers, self._workers = list(self._workers), []
    for worker in workers:
      worker.process.stdin.close()
      worker.kill()
