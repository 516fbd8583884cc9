"""Test-only decoders for the isolation tests (F4, F5, issue 16.7): importable by spawned
processes."""
from __future__ import annotations

import os
import time

import numpy as np

from pipeline import decode_worker, image_decode


def crash_or_hang(row: dict, data: bytes, settings: image_decode.DecodeSettings) -> dict:
  """Misbehaves on a marker at the start of the bytes, else decodes normally.

  CRASH aborts the process; HANG sleeps forever; ALLOC allocates without bound (64 GiB of
  address space, untouched pages, so without a limit the call just returns); SPIN burns CPU
  forever; HALF writes the first bytes of a reply frame and stalls; FORGE sends a frame whose
  bytes field points outside the reply.
  """
  if data.startswith(b"CRASH"):
    os.abort()
  if data.startswith(b"HANG"):
    time.sleep(3600)
  if data.startswith(b"ALLOC"):
    hoard = [np.zeros(1 << 30, np.uint8) for _ in range(64)]
    del hoard
  if data.startswith(b"SPIN"):
    while True:
      pass
  if data.startswith(b"HALF"):
    frame = decode_worker.encode_reply(True, {**row, "image": bytes(10000)})
    decode_worker.reply_stream().write(frame[:len(frame) // 2])
    decode_worker.reply_stream().flush()
    time.sleep(3600)
  if data.startswith(b"FORGE"):
    text = b'{"image": {"$bytes": [0, 999999]}}'
    decode_worker.reply_stream().write(
        decode_worker.REPLY_HEADER.pack(0, len(text), 4) + text + b"abcd")
    decode_worker.reply_stream().flush()
  return image_decode.prepare_record(row, data, settings)
