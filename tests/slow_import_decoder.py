"""A test decoder whose module takes seconds to import in a decoder process (as OpenCV and
NumPy can on a cold machine), for `IsolatedDecoder.start`'s test; instant elsewhere."""
from __future__ import annotations

import sys
import time

IMPORT_SECONDS = 1.5

_main = getattr(sys.modules.get("__main__"), "__spec__", None)
if _main is not None and _main.name == "pipeline.decode_worker":
  time.sleep(IMPORT_SECONDS)


def describe(row: dict, data: bytes, settings) -> dict:
  """The row with the length of its bytes."""
  return {**row, "length": len(data)}
