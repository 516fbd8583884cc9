"""Child process of `pipeline.decoder_pool`: runs decode calls sent over its stdin.

    python -m pipeline.decode_worker      # started by IsolatedDecoder, not by hand

Protocol, one batch of calls at a time: the parent writes an 8-byte big-endian length and a
pickle of `(module, function name, [args, args, ...])`; the child runs the calls in order and
answers each with a reply frame of raw bytes as soon as it is done (see `encode_reply`: a header
of fixed size, JSON fields, raw bytes values) that the parent parses without unpickling
anything, within that call's deadline. A batch costs one message for many small images (at
~11 KB per image the per-call hand-off was a fifth of the CPU an image took). An empty batch is
a warm-up: the child imports the function's module and answers one reply (an empty result, or
the import's error). It is a plain interpreter started with `-m`, so it imports only what the
function needs (OpenCV, Pillow, NumPy) and never re-runs the parent's main script, as
multiprocessing's spawn does.

Limits: the worker caps its own address space (`--max-memory-bytes`, RLIMIT_AS) before serving,
and the CPU time of each call (`--cpu-seconds`, RLIMIT_CPU moved before every call), so a
hostile image that makes a decoder allocate or spin without bound is stopped by the kernel.

Large `bytes` arguments (source images) do not go through the pipe: the parent copies them into
a buffer shared with this worker (a Linux memfd passed as `--buffer-fd`) and sends a
`SharedBytes(offset, length)` in their place. Pushing ~0.5 MB through a 64 KB pipe cost ~0.9 ms
of CPU per image on the two sides (pickle copies, syscalls, context switches), about a tenth of
the whole ingest; the shared buffer costs two memcpys.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import math
import mmap
import os
import pickle
import resource
import struct
import sys
import time

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
  """One length-prefixed pickle from a binary stream; None at end of stream.

  Only for requests: the child unpickles what its parent sent. Replies travel as `Reply`
  frames the parent parses without unpickling (a decoder subverted by a hostile image could
  otherwise run code in the parent).
  """
  header = stream.read(_LENGTH.size)
  if len(header) < _LENGTH.size:
    return None
  (size,) = _LENGTH.unpack(header)
  payload = stream.read(size)
  if len(payload) < size:
    return None
  return pickle.loads(payload)


def write_message(stream, message: object) -> None:
  """Writes one length-prefixed pickle (a request) and flushes."""
  payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
  stream.write(_LENGTH.pack(len(payload)) + payload)
  stream.flush()


# ---------------------------------------------------------------------------------------------
# Replies: fixed framing of raw bytes, parsed by the parent without unpickling.
#
#   header  = struct ">BII": kind (0 result, 1 error), JSON length, blob length
#   JSON    = the result dict, each top-level bytes value replaced by {"$bytes": [offset, size]}
#             into the blob; or, for an error, {"type", "reason", "message"}
#   blob    = the raw bytes values, concatenated

REPLY_HEADER = struct.Struct(">BII")
MAX_REPLY_JSON = 16 << 20
MAX_REPLY_BLOB = 512 << 20
_RESULT, _ERROR = 0, 1
_BYTES_KEY = "$bytes"
# Keys of the call's row that its result no longer has (see `encode_reply`'s `base`).
DROPPED_KEY = "$dropped"


class BadReply(ValueError):
  """A reply that breaks the framing: the worker is not trusted any more."""


def _plain(value):
  """JSON fallback for NumPy scalars and arrays a decoder may return."""
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"a {type(value).__name__} cannot be sent back from the decoder")


def encode_reply(ok: bool, value, base: dict | None = None) -> bytes:
  """The frame of one reply: a result dict, or an exception.

  With `base` (the call's first argument, a row the parent holds), a result that extends it
  carries only the keys it added or changed, and those of `base` it dropped under `DROPPED_KEY`
  (`merge_reply` puts them back together): the row's own fields (id, URL, label ...) need not
  travel back to where they came from.
  """
  if ok:
    if not isinstance(value, dict):
      return encode_reply(False, TypeError(f"the decoder returned a {type(value).__name__}, "
                                           "not a dict"))
    fields, chunks, offset = {}, [], 0
    if base is not None:
      dropped = [key for key in base if key not in value]
      value = {key: item for key, item in value.items()
               if key not in base or base[key] is not item}
      if dropped:
        value[DROPPED_KEY] = dropped
    for key, item in value.items():
      if isinstance(item, (bytes, bytearray, memoryview)):
        item = bytes(item)
        fields[key] = {_BYTES_KEY: [offset, len(item)]}
        chunks.append(item)
        offset += len(item)
      else:
        fields[key] = item
    try:
      text = json.dumps(fields, default=_plain).encode("utf-8")
    except (TypeError, ValueError) as error:
      return encode_reply(False, error)
    kind, blob = _RESULT, b"".join(chunks)
  else:
    kind = ("ImageError" if hasattr(value, "reason") else
            "MemoryError" if isinstance(value, MemoryError) else type(value).__name__)
    text = json.dumps({"type": kind, "reason": str(getattr(value, "reason", "")),
                       "message": str(value)[:2000]}).encode("utf-8")
    kind, blob = _ERROR, b""
  return REPLY_HEADER.pack(kind, len(text), len(blob)) + text + blob


def reply_sizes(header: bytes) -> tuple[int, int, int]:
  """(kind, JSON length, blob length) of a reply header, checked against the limits.

  Raises:
    BadReply: unknown kind or sizes above the limits.
  """
  kind, text_size, blob_size = REPLY_HEADER.unpack(header)
  if kind not in (_RESULT, _ERROR) or text_size > MAX_REPLY_JSON or blob_size > MAX_REPLY_BLOB:
    raise BadReply(f"reply header {header.hex()} is out of bounds")
  return kind, text_size, blob_size


def decode_reply(kind: int, text: bytes, blob: bytes) -> tuple[bool, object]:
  """(True, result dict) or (False, {"type", "reason", "message"}) from a reply's parts.

  Raises:
    BadReply: the JSON or a bytes reference is malformed.
  """
  try:
    fields = json.loads(text.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise BadReply(f"reply is not JSON: {error}") from None
  if not isinstance(fields, dict):
    raise BadReply("reply is not a JSON object")
  if kind == _ERROR:
    return False, {k: str(fields.get(k, "")) for k in ("type", "reason", "message")}
  for key, item in fields.items():
    if isinstance(item, dict) and set(item) == {_BYTES_KEY}:
      offset, size = item[_BYTES_KEY]
      if not (isinstance(offset, int) and isinstance(size, int)
              and 0 <= offset <= offset + size <= len(blob)):
        raise BadReply(f"bytes field {key!r} points outside the reply")
      fields[key] = blob[offset:offset + size]
  return True, fields


def merge_reply(base: dict, fields: dict) -> dict:
  """The whole result of a call whose reply was encoded against `base` (its row).

  Raises:
    BadReply: `DROPPED_KEY` is not a list of names.
  """
  dropped = fields.pop(DROPPED_KEY, [])
  if not isinstance(dropped, list):
    raise BadReply(f"{DROPPED_KEY} is not a list")
  result = {key: item for key, item in base.items() if key not in dropped}
  result.update(fields)
  return result


_reply_stream = None


def reply_stream():
  """The stream replies go to (what a misbehaving decoder in this process could write to;
  tests use it to act as one)."""
  return _reply_stream


def _limit_memory(max_bytes: int) -> None:
  """Caps this process's address space: a decoder that allocates without bound gets a
  MemoryError (or dies) instead of taking the machine's memory from every other worker."""
  if max_bytes > 0:
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


class _CpuLimit:
  """Lets each call use at most `seconds` more CPU time; then the kernel sends SIGXCPU, which
  ends this process. RLIMIT_CPU counts the process's whole life, so the soft limit is moved
  before every call (and stays under the hard limit, so it can move again). The limit is in
  whole seconds: it is set only when that second changes, after one clock read per call
  (getrusage, getrlimit and setrlimit per call were ~4 us of an image's CPU)."""

  def __init__(self, seconds: float):
    self._seconds = seconds
    self._soft: int | None = None
    self._hard = resource.getrlimit(resource.RLIMIT_CPU)[1] if seconds > 0 else None

  def before_call(self) -> None:
    if self._seconds > 0:
      soft = math.ceil(time.process_time() + self._seconds)
      if soft != self._soft:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, self._hard))
        self._soft = soft


def _one_thread_per_worker() -> None:
  """Makes OpenCV run each call on this process's own thread.

  The parallelism is the number of worker processes; OpenCV's default pool (one thread per
  core) in every worker would oversubscribe the cores and burn CPU on hand-offs for images of
  a few hundred kilopixels.
  """
  import cv2  # pylint: disable=import-outside-toplevel (only when serving, not for the protocol)
  cv2.setNumThreads(1)


def _answer(function, args: tuple, shared: SharedBuffer | None) -> bytes:
  """The reply frame of one call. `function` is its import's error when the import failed:
  answered as it is (raising the one stored instance again grew its traceback every call)."""
  if isinstance(function, Exception):
    return encode_reply(False, function)
  try:
    if shared is not None:
      args = tuple(shared.get(a) if isinstance(a, SharedBytes) else a for a in args)
    result = function(*args)
    return encode_reply(True, result, args[0] if args and isinstance(args[0], dict) else None)
  except Exception as error:  # noqa: BLE001 - every failure goes back to the parent
    return encode_reply(False, error)


def main(argv: list[str] | None = None) -> None:
  """Serves calls until stdin closes."""
  global _reply_stream
  parser = argparse.ArgumentParser(prog="python -m pipeline.decode_worker")
  parser.add_argument("--buffer-fd", type=int, default=None,
                      help="file descriptor of the buffer shared with the parent")
  parser.add_argument("--max-memory-bytes", type=int, default=0,
                      help="address-space limit of this process (0: none)")
  parser.add_argument("--cpu-seconds", type=float, default=0.0,
                      help="CPU time each call may use before the kernel ends the process")
  options = parser.parse_args(argv)
  shared = SharedBuffer(options.buffer_fd) if options.buffer_fd is not None else None
  # The protocol owns the original stdout; anything a library prints goes to stderr instead.
  _reply_stream = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  requests = sys.stdin.buffer
  _one_thread_per_worker()
  _limit_memory(options.max_memory_bytes)
  functions = {}
  cpu_limit = _CpuLimit(options.cpu_seconds)
  while (request := read_message(requests)) is not None:
    module_name, function_name, calls = request
    key = (module_name, function_name)
    # The function's module (OpenCV, NumPy: 0.2 s and more of CPU) is imported before any
    # call's CPU limit and deadline start, not inside the first call's.
    if key not in functions:
      try:
        functions[key] = getattr(importlib.import_module(module_name), function_name)
      except Exception as error:  # noqa: BLE001 - every call of the batch gets this reply
        functions[key] = error
      gc.freeze()  # the modules' objects stay out of every later collection's walk
    function = functions[key]
    if not calls:  # a warm-up (`IsolatedDecoder.start`): one reply, whether the import worked
      failed = isinstance(function, Exception)
      _reply_stream.write(encode_reply(not failed, function if failed else {}))
      _reply_stream.flush()
      continue
    for args in calls:
      cpu_limit.before_call()
      # One frame per call, flushed at once: the parent times each call on its own and knows
      # which call of a batch a crash or a hang belongs to.
      _reply_stream.write(_answer(function, args, shared))
      _reply_stream.flush()

if __name__ == "__main__":
  # Run the importable module's main, not this `__main__` copy: the parent pickles
  # `pipeline.decode_worker.SharedBytes`, and isinstance must see that very class.
  from pipeline import decode_worker
  decode_worker.main()
