"""How stages report progress of long work, for the app layer to draw (`headstart.logs`).

    progress.report("extract", total=5000, unit="img")    # once, when the size is known
    progress.report("extract", advance=64)                  # per batch, from any stage

A report is a record on the `headstart.progress` logger (cheap, and nothing is drawn unless the
app set up a handler), so stages stay free of any terminal library; in Beam worker processes,
where no handler is set up, reports cost one log call and show nowhere.
"""
from __future__ import annotations

import logging

LOGGER = "headstart.progress"


def report(task: str, *, advance: int = 0, total: int | None = None, unit: str = "it",
           done: bool = False) -> None:
  """Advances (or sizes, or closes) the progress bar of `task`."""
  logger = logging.getLogger(LOGGER)
  if logger.isEnabledFor(logging.INFO):
    logger.info("", extra={"progress": {"task": task, "advance": advance, "total": total,
                                        "unit": unit, "done": done}})
