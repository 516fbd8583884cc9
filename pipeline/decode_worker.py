"""Child process of `pipeline.decoder_pool`: runs decode calls sent over its stdin.

    python -m pipeline.decode_worker      # started by IsolatedDecoder, not by hand

Protocol, one call at a time: the parent writes an 8-byte big-endian length and a pickle of
`(module, function name, args)`; the child answers with a length and a pickle of
`(True, result)` or `(False, exception)`. It is a plain interpreter started with `-m`, so it
imports only what the function needs (OpenCV, Pillow, NumPy) and never re-runs the parent's
main script, as multiprocessing's spawn does.

Large `bytes` arguments (source images) do not go through the pipe: the parent copies them into
a buffer shared with this worker (a Linux memfd passed as `--buffer-fd`) and sends a
`SharedBytes(offset, length)` in their place. Pushing ~0.5 MB through a 64 KB pipe cost ~0.9 ms
of CPU per image on the two sides (pickle copies, syscalls, context switches), about a tenth of
the whole ingest; the shared buffer costs two memcpys.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import mmap
import os
import pickle
import struct
import sys

_LENGTH = struct.Struct(">Q")


@dataclasses.dataclass(frozen=True)
class SharedBytes:
  """Stands, in a request, for `length` bytes at `offset` of the worker's shared buffer."""
  offset: int
  length: int


class SharedBuffer:
  """A growable memory block both processes map from one file descriptor (a memfd).

  The parent `put`s arguments before each call; the worker `get`s them. Only the parent grows
  the file; the worker re-maps when a request reaches past its current mapping.
  """

  def __init__(self, fd: int):
    self.fd = fd
    self._map: mmap.mmap | None = None
    self._remap()

  def _remap(self) -> None:
    if self._map is not None:
      self._map.close()
    size = os.fstat(self.fd).st_size
    self._map = mmap.mmap(self.fd, size) if size else None

  def _size(self) -> int:
    return len(self._map) if self._map is not None else 0

  def put(self, chunks: list[bytes]) -> list[SharedBytes]:
    """Copies `chunks` into the buffer (growing it to a power of two); returns their places."""
    needed = sum(len(chunk) for chunk in chunks)
    if needed > self._size():
      os.ftruncate(self.fd, 1 << max(20, (needed - 1).bit_length()))
      self._remap()
    places, offset = [], 0
    for chunk in chunks:
      self._map[offset:offset + len(chunk)] = chunk
      places.append(SharedBytes(offset, len(chunk)))
      offset += len(chunk)
    return places

  def get(self, place: SharedBytes) -> bytes:
    """A copy of the bytes at `place` (a copy: the parent reuses the buffer for the next call)."""
    end = place.offset + place.length
    if end > self._size():
      self._remap()
    if end > self._size():
      raise ValueError(f"shared bytes {place} reach past the buffer ({self._size()} bytes)")
    return self._map[place.offset:end]

  def close(self) -> None:
    """Unmaps and closes the descriptor."""
    if self._map is not None:
      self._map.close()
      self._map = None
    os.close(self.fd)


def read_message(stream) -> object | None:
  """One length-prefixed pickle from a binary stream; None at end of stream."""
  header = stream.read(_LENGTH.size)
  if len(header) < _LENGTH.size:
    return None
  (size,) = _LENGTH.unpack(header)
  payload = stream.read(size)
  if len(payload) < size:
    return None
  return pickle.loads(payload)


def write_message(stream, message: object) -> None:
  """Writes one length-prefixed pickle and flushes."""
  try:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
  except (pickle.PicklingError, TypeError, AttributeError) as error:
    # An exception type that cannot cross processes still has to report what happened.
    payload = pickle.dumps((False, RuntimeError(f"unpicklable reply: {error!r}")))
  stream.write(_LENGTH.pack(len(payload)) + payload)
  stream.flush()


def _one_thread_per_worker() -> None:
  """Makes OpenCV run each call on this process's own thread.

  The parallelism is the number of worker processes; OpenCV's default pool (one thread per
  core) in every worker would oversubscribe the cores and burn CPU on hand-offs for images of
  a few hundred kilopixels.
  """
  import cv2  # pylint: disable=import-outside-toplevel (only when serving, not for the protocol)
  cv2.setNumThreads(1)


def main(argv: list[str] | None = None) -> None:
  """Serves calls until stdin closes."""
  parser = argparse.ArgumentParser(prog="python -m pipeline.decode_worker")
  parser.add_argument("--buffer-fd", type=int, default=None,
                      help="file descriptor of the buffer shared with the parent")
  options = parser.parse_args(argv)
  shared = SharedBuffer(options.buffer_fd) if options.buffer_fd is not None else None
  # The protocol owns the original stdout; anything a library prints goes to stderr instead.
  channel = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  requests = sys.stdin.buffer
  _one_thread_per_worker()
  functions = {}
  while (request := read_message(requests)) is not None:
    module_name, function_name, args = request
    key = (module_name, function_name)
    try:
      if shared is not None:
        args = tuple(shared.get(a) if isinstance(a, SharedBytes) else a for a in args)
      if key not in functions:
        functions[key] = getattr(importlib.import_module(module_name), function_name)
      reply = (True, functions[key](*args))
    except Exception as error:  # noqa: BLE001 - every failure goes back to the parent
      reply = (False, error)
    write_message(channel, reply)


if __name__ == "__main__":
  # Run the importable module's main, not this `__main__` copy: the parent pickles
  # `pipeline.decode_worker.SharedBytes`, and isinstance must see that very class.
  from pipeline import decode_worker
  decode_worker.main()
