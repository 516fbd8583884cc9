"""One logging set-up for every command: headstart's own lines clean, framework noise silenced,
progress bars for long local work.

    logs.setup(verbose=False)     # before TensorFlow, absl or Beam is imported
    log = logging.getLogger("headstart")
    log.info("extract: 3 backbones")                 # printed as is, on stderr
    progress.report("ingest", advance=64)   # from any stage (contracts.progress): a bar moves

TensorFlow's C++ start-up lines (oneDNN, CUDA probing), absl's and Beam's import-time warnings
("apitools not found") and Python warnings are noise to a user who asked for a dataset: they
are hidden unless `--verbose` (or HEADSTART_VERBOSE=1) is given. Stages report progress with
`contracts.progress.report()`; the bars are drawn by `ProgressHandler` (tqdm on stderr) in the
process that set up logging, so they show for local in-process runners and stay silent in
worker processes.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Any

from contracts import progress

LOGGER = "headstart"
_NOISY_LOGGERS = ("tensorflow", "absl", "apache_beam", "h5py", "matplotlib", "PIL", "urllib3")


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever `sys.stderr` is at the time (pytest and Beam may swap it)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, _):
    pass


class ProgressHandler(logging.Handler):
  """Draws one tqdm bar per task from `contracts.progress` records."""

  def __init__(self):
    super().__init__(level=logging.INFO)
    self._bars: dict[str, Any] = {}

  def emit(self, record: logging.LogRecord) -> None:
    event = getattr(record, "progress", None)
    if not event:
      return
    try:
      from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, never a failure
      return
    task = event["task"]
    bar = self._bars.get(task)
    if bar is None:
      # disable=None: no bar when stderr is not a terminal (CI logs, tests, pipes).
      bar = self._bars[task] = tqdm(total=event.get("total"), desc=task,
                                    unit=event.get("unit", "it"), file=sys.stderr, disable=None,
                                    leave=False, dynamic_ncols=True)
    if event.get("total") is not None and bar.total != event["total"]:
      bar.total = event["total"]
      bar.refresh()
    if event.get("advance"):
      bar.update(event["advance"])
    if event.get("done"):
      bar.close()
      del self._bars[task]

  def close(self) -> None:
    for bar in self._bars.values():
      bar.close()
    self._bars.clear()
    super().close()


def quiet_environment(verbose: bool) -> None:
  """Environment settings that must precede TensorFlow's import (and reach worker processes)."""
  if verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")     # C++ INFO/WARNING/ERROR start-up lines
  os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  os.environ.setdefault("PYTHONWARNINGS", "ignore")     # Beam's worker processes inherit it


def _import_quietly(module: str) -> None:
  """Imports `module` with the process's stderr (file descriptor 2) pointed at /dev/null.

  TensorFlow's C++ layer writes its start-up lines ("oneDNN custom operations are on", "Could
  not find cuda drivers") before absl logging is initialised, straight to fd 2: neither
  TF_CPP_MIN_LOG_LEVEL nor Python logging holds them back (measured with TF 2.21).
  """
  if module in sys.modules:
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    importlib.import_module(module)
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def setup(verbose: bool = False) -> None:
  """Configures logging for one command; call before TensorFlow, absl or Beam is imported."""
  verbose = verbose or os.environ.get("HEADSTART_VERBOSE") == "1"
  quiet_environment(verbose)
  root = logging.getLogger()
  if not verbose:
    # A root handler exists, so an import-time `logging.warning(...)` (Beam's "apitools not
    # found") no longer triggers basicConfig and prints nothing below ERROR.
    if not root.handlers:
      root.addHandler(logging.NullHandler())
    root.setLevel(logging.ERROR)
    for name in _NOISY_LOGGERS:
      logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    _import_quietly("tensorflow")   # every command needs it; its start-up lines are noise
    try:
      from absl import logging as absl_logging  # absl's own verbosity (used by TF and TFDS)
      absl_logging.set_verbosity(absl_logging.ERROR)
      absl_logging.use_python_logging(quiet=True)
    except ImportError:
      pass
  else:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  ours = logging.getLogger(LOGGER)
  ours.setLevel(logging.INFO)
  ours.propagate = False
  if not any(isinstance(h, _StderrHandler) for h in ours.handlers):
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda record: not getattr(record, "progress", None))
    ours.addHandler(handler)
  bars = logging.getLogger(progress.LOGGER)
  bars.propagate = False
  bars.setLevel(logging.INFO)
  if not any(isinstance(h, ProgressHandler) for h in bars.handlers):
    bars.addHandler(ProgressHandler())
