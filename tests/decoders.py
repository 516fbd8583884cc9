"""Test-only decoders for the isolation tests (F4, F5): importable by spawned processes."""
from __future__ import annotations

import os
import time

from pipeline import image_decode


def crash_or_hang(row: dict, data: bytes, settings: image_decode.DecodeSettings) -> dict:
  """Aborts the process on b'CRASH', sleeps forever on b'HANG', else decodes normally."""
  if data.startswith(b"CRASH"):
    os.abort()
  if data.startswith(b"HANG"):
    time.sleep(3600)
  return image_decode.prepare_record(row, data, settings)
