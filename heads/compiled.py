"""Compiled heads reused by the runs of one process, so a compare grid traces each head once.

    model = compiled.reuse(key, zoo.build_head(...), lambda m: training.compile_head(m, ...))

Tracing a head's train step, validation step and forward pass costs about as much as a few
epochs of a pooled head (1-1.5 s of 2 CPU cores), and a compare grid used to build and trace a
new model for every seed of every cell. Runs whose heads share architecture and settings (the
`key`: same head, dataset and hyperparameters; only the seed differs) now share one compiled
model: each run still builds its own head under its own seed, which is cheap and gives its
initial weights and dropout seeds, and those values are copied into the shared model's
variables; its optimizer goes back to the state it had when first built (zero moments, step 0).
The traced functions read the same variables, so nothing is traced again and a run trains
exactly as on a model of its own (tests compare the predictions bit for bit).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Hashable
from typing import Any

import keras
import numpy as np

# Compiled models kept; a grid moves through datasets one at a time (see `heads.compare`).
MAX_SHARED = 4


@dataclasses.dataclass
class _Shared:
  model: keras.Model
  optimizer_start: list[np.ndarray]   # its optimizer variables' values right after building
  traced: dict[Hashable, Any] = dataclasses.field(default_factory=dict)


# Keyed by (thread, key): threads of one worker (Beam's multi_threading runner, Dataflow's SDK
# harness) may train runs of the same head at once, and must not train one model together.
_SHARED: collections.OrderedDict[tuple[int, str], _Shared] = collections.OrderedDict()
_LOCK = threading.Lock()


def reuse(key: str, fresh: keras.Model, compile_model: Callable[[keras.Model], None]
          ) -> keras.Model:
  """The process's compiled model for `key`, holding `fresh`'s initial state.

  Args:
    key: what the model's traced functions depend on besides its variables' values: the head,
      the dataset (its statistics are constants of the standardising layer) and every
      hyperparameter but the seed.
    fresh: the run's newly built, uncompiled head.
    compile_model: compiles a head (used the first time `key` is seen).

  Raises:
    ValueError: `fresh` does not have the variables of the model shared under `key`.
  """
  slot = (threading.get_ident(), key)
  with _LOCK:
    entry = _SHARED.get(slot)
    if entry is not None:
      _SHARED.move_to_end(slot)
  if entry is None:
    compile_model(fresh)
    fresh.optimizer.build(fresh.trainable_variables)
    with _LOCK:
      _SHARED[slot] = _Shared(fresh, [np.array(v.numpy()) for v in fresh.optimizer.variables])
      while len(_SHARED) > MAX_SHARED:
        _SHARED.popitem(last=False)
    return fresh
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
  return model


def traced(model: keras.Model, key: Hashable, trace: Callable[[], Any]) -> Any:
  """`trace()`'s result, computed once per shared model and `key` (each call for others).

  For functions traced outside Keras' own (e.g. `evaluation.compiled_forward`): they read the
  model's variables, so they serve every run the model is shared with.
  """
  with _LOCK:
    entry = next((e for e in _SHARED.values() if e.model is model), None)
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
