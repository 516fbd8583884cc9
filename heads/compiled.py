"""Compiled heads reused by the runs of one process, so a compare grid traces each head once.

    with compiled.lend(key, zoo.build_head(...), lambda m: training.compile_head(m, ...)) as model:
      model.fit(...)

Tracing a head's train step, validation step and forward pass costs about as much as a few
epochs of a pooled head (1-1.5 s of 2 CPU cores), and a compare grid used to build and trace a
new model for every seed of every cell. Runs whose heads share architecture and settings (the
`key`: same head, dataset and hyperparameters; only the seed differs) now share one compiled
model: each run still builds its own head under its own seed, which is cheap and gives its
initial weights and dropout seeds, and those values are copied into the shared model's
variables; its optimizer goes back to the state it had when first built (zero moments, step 0).
The traced functions read the same variables, so nothing is traced again and a run trains
exactly as on a model of its own (tests compare the predictions bit for bit).

A model is lent to one run at a time: runs training at once in threads of one process
(`compare --parallel-runs`, Beam's multi_threading runner) each get a model no other run is
training, and a second compiled copy is made only when every copy of `key` is busy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import keras
import numpy as np

# Compiled models kept (two heads x two runs at once); a grid moves through datasets one at a
# time (see `heads.compare`).
MAX_SHARED = 4


@dataclasses.dataclass(eq=False)
class _Shared:
  key: str
  model: keras.Model
  optimizer_start: list[np.ndarray]   # its optimizer variables' values right after building
  traced: dict[Hashable, Any] = dataclasses.field(default_factory=dict)
  busy: bool = True                   # lent to a run now


_SHARED: list[_Shared] = []   # least recently lent first
_LOCK = threading.Lock()


@contextlib.contextmanager
def lend(key: str, fresh: keras.Model, compile_model: Callable[[keras.Model], None]
         ) -> Iterator[keras.Model]:
  """The process's compiled model for `key`, holding `fresh`'s initial state, for one run.

  Args:
    key: what the model's traced functions depend on besides its variables' values: the head,
      the dataset (its statistics are constants of the standardising layer) and every
      hyperparameter but the seed.
    fresh: the run's newly built, uncompiled head.
    compile_model: compiles a head (used when no idle model of `key` is kept).

  Raises:
    ValueError: `fresh` does not have the variables of the model shared under `key`.
  """
  with _LOCK:
    entry = next((e for e in _SHARED if e.key == key and not e.busy), None)
    if entry is not None:
      entry.busy = True
      _SHARED.remove(entry)
      _SHARED.append(entry)
  try:
    if entry is None:
      compile_model(fresh)
      fresh.optimizer.build(fresh.trainable_variables)
      entry = _Shared(key, fresh, [np.array(v.numpy()) for v in fresh.optimizer.variables])
      with _LOCK:
        _SHARED.append(entry)
        idle = [e for e in _SHARED if not e.busy]
        for evicted in idle[:max(0, len(_SHARED) - MAX_SHARED)]:
          _SHARED.remove(evicted)
    else:
      _restart(entry, key, fresh)
    yield entry.model
  finally:
    if entry is not None:
      entry.busy = False


def _restart(entry: _Shared, key: str, fresh: keras.Model) -> None:
  """Puts `fresh`'s initial weights into the shared model and resets its optimizer."""
  model = entry.model
  targets, sources = model.variables, fresh.variables
  # Auto-named layers (dropout_3...) differ between builds: positions, shapes and dtypes match.
  if [(tuple(v.shape), v.dtype) for v in targets] != [(tuple(v.shape), v.dtype) for v in sources]:
    raise ValueError(f"head {fresh.name!r} does not match the compiled head shared as {key!r}")
  for target, source in zip(targets, sources):   # weights and dropout seed states
    target.assign(source)
  if len(model.optimizer.variables) != len(entry.optimizer_start):
    raise ValueError(f"the optimizer of the head shared as {key!r} changed its variables")
  for variable, value in zip(model.optimizer.variables, entry.optimizer_start):
    variable.assign(value)
  # Per-fit state Keras keeps on the model: a resumed run's BackupAndRestore sets the epoch
  # the next fit starts from, and nothing resets it.
  model._initial_epoch = None  # noqa: SLF001 (Keras' resume hook, read by fit)
  model.stop_training = False


def traced(model: keras.Model, key: Hashable, trace: Callable[[], Any]) -> Any:
  """`trace()`'s result, computed once per shared model and `key` (each call for others).

  For functions traced outside Keras' own (e.g. `evaluation.compiled_forward`): they read the
  model's variables, so they serve every run the model is shared with.
  """
  with _LOCK:
    entry = next((e for e in _SHARED if e.model is model), None)
  if entry is None:
    return trace()
  if key not in entry.traced:
    entry.traced[key] = trace()
  return entry.traced[key]


def release() -> None:
  """Drops the shared models (and with them their traced functions)."""
  with _LOCK:
    _SHARED.clear()


def shared_count() -> int:
  """How many compiled models this process holds now."""
  return len(_SHARED)
