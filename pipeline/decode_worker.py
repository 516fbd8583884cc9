"""Child process of `pipeline.decoder_pool`: runs decode calls sent over its stdin.

    python -m pipeline.decode_worker      # started by IsolatedDecoder, not by hand

Protocol, one call at a time: the parent writes an 8-byte big-endian length and a pickle of
`(module, function name, args)`; the child answers with a length and a pickle of
`(True, result)` or `(False, exception)`. It is a plain interpreter started with `-m`, so it
imports only what the function needs (OpenCV, Pillow, NumPy) and never re-runs the parent's
main script, as multiprocessing's spawn does.
"""
from __future__ import annotations

import importlib
import os
import pickle
import struct
import sys

_LENGTH = struct.Struct(">Q")


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


def main() -> None:
  """Serves calls until stdin closes."""
  # The protocol owns the original stdout; anything a library prints goes to stderr instead.
  channel = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  requests = sys.stdin.buffer
  functions = {}
  while (request := read_message(requests)) is not None:
    module_name, function_name, args = request
    key = (module_name, function_name)
    try:
      if key not in functions:
        functions[key] = getattr(importlib.import_module(module_name), function_name)
      reply = (True, functions[key](*args))
    except Exception as error:  # noqa: BLE001 - every failure goes back to the parent
      reply = (False, error)
    write_message(channel, reply)


if __name__ == "__main__":
  main()
