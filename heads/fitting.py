"""The run routine `headstart train` and `headstart finetune` share: fit, save, evaluate, record.

    result = fitting.train_and_evaluate(model, runs.RunDir("runs/x"), inputs,
                                        describe={"task": ..., "head": ...}, epochs=30,
                                        notes=[], started=time.perf_counter())

`fit` is `model.fit` with resume (`keras.callbacks.BackupAndRestore` in `RUN_DIR/backup/`), the
best-on-validation checkpoint, `history.csv` and early stopping. `train_and_evaluate` then saves
the model, evaluates the validation and test splits (`heads.evaluation`, which writes
`predictions_test.csv`) and writes `metrics.json` last, so its presence means "finished".
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contracts import layout, runs
from heads import caching, evaluation, reader
from heads.config import TrainConfig


def _cache_keras_skipsets() -> None:
  """Makes Keras' saving code build its per-class attribute skip sets once per process.

  Keras 3 (3.15.1 here) stores each set under `saving_attr_skipset_<type>` but looks it up under
  `saving_attr_skiplist_<type>`, so every save and load of weights builds them again, each time
  constructing a throwaway Layer, Metric, CompileMetrics and optimizer: ~0.1 s of a pooled
  head's ~1 s run in a compare grid (py-spy, 12 runs). The sets depend on the type name alone
  and are only read, so one per type is kept.
  """
  try:   # a private module: a Keras without it (or without the function) is left alone
    from keras.src.saving import saving_lib
  except ImportError:
    return
  build = getattr(saving_lib, "get_attr_skipset", None)
  if callable(build) and getattr(build, "cache_info", None) is None:   # not wrapped yet
    saving_lib.get_attr_skipset = functools.cache(build)


_cache_keras_skipsets()


def fuse_adam(optimizer: Any) -> Any:
  """Makes a Keras `Adam` apply each variable's update with TensorFlow's fused Adam kernel.

  Keras 3's Adam updates a variable with about ten separate element-wise ops (moments, square
  root, division, assignments), each a pass over the variable and a dispatch of TensorFlow's
  executor: 0.67 ms of a 1.1 ms step for the mlp head's 131 k weights on 2 cores, where
  `ResourceApplyAdam` makes one pass (the mlp head's cached epochs 0.50 -> 0.35 s). The update
  is the same formula (`alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)`, `m += (g - m)(1 - b1)`,
  `v += (g^2 - v)(1 - b2)`, `w -= alpha m / (sqrt(v) + eps)`) evaluated in one kernel, so
  weights agree to float32 rounding, not bit for bit. The optimizer stays a plain `Adam` (its
  config, variables and saved files are unchanged); amsgrad, sparse gradients and other
  backends keep Keras' own step. Returns `optimizer`.
  """
  if (type(optimizer) is not keras.optimizers.Adam or optimizer.amsgrad
      or keras.backend.backend() != "tensorflow"
      or "update_step" in vars(optimizer)):   # already fused (an optimizer compiled again)
    return optimizer
  keras_step = optimizer.update_step

  def update_step(gradient, variable, learning_rate):
    if isinstance(gradient, tf.IndexedSlices):
      return keras_step(gradient, variable, learning_rate)
    dtype = variable.dtype
    index = optimizer._get_variable_index(variable)  # noqa: SLF001 (Adam's own slot lookup)
    step = tf.cast(optimizer.iterations + 1, dtype)
    beta_1, beta_2 = tf.cast(optimizer.beta_1, dtype), tf.cast(optimizer.beta_2, dtype)
    return tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=optimizer._momentums[index].handle,  # noqa: SLF001
        v=optimizer._velocities[index].handle,  # noqa: SLF001
        beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
        lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
        epsilon=tf.cast(optimizer.epsilon, dtype), grad=tf.cast(gradient, dtype))

  optimizer.update_step = update_step
  return optimizer


class EpochTimer(keras.callbacks.Callback):
  """Records wall seconds per epoch, so throughput can leave out the cache-filling first epoch."""

  def __init__(self):
    super().__init__()
    self.seconds: list[float] = []
    self._start = 0.0

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)


class EpochSeed(keras.callbacks.Callback):
  """Publishes the epoch about to run to the input pipeline (`reader.make_for_train(epoch=)`).

  Keras builds each epoch's iterator after `on_epoch_begin`, so epoch k shuffles with (seed, k)
  even when a resumed fit starts at k in a fresh process (F14: resume ends where an
  uninterrupted run ends).
  """

  def __init__(self):
    super().__init__()
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch.assign(epoch)


class CheckedBackupAndRestore(keras.callbacks.BackupAndRestore):
  """BackupAndRestore that refuses a damaged backup in one sentence, and skips the backup of the
  last epoch.

  Keras raises h5py's OSError deep inside `fit`; worse, deleting the backup by hand to get past
  it would silently restart from random weights. The run stops instead, naming the folder.
  """

  def on_train_begin(self, logs=None):
    try:
      super().on_train_begin(logs)
    except (OSError, ValueError, KeyError) as error:
      raise layout.DatasetError(
          f"resume checkpoint {self.backup_dir!r} is damaged ({type(error).__name__}: "
          f"{str(error).splitlines()[0][:120]}); restore it, or delete it to retrain this run "
          "from scratch") from error

  def on_epoch_end(self, epoch, logs=None):
    # The last epoch's backup would be deleted as training ends: it is not written (a save
    # costs about as much as an epoch of a pooled head on a few thousand examples).
    if epoch + 1 < self.params.get("epochs", epoch + 2):
      super().on_epoch_end(epoch, logs)


def _best_so_far(history_path: str, monitor: str) -> float | None:
  """Best monitored value in an existing history, so a resumed run keeps the better checkpoint."""
  if not tf.io.gfile.exists(history_path):
    return None
  with tf.io.gfile.GFile(history_path, "r") as f:
    values = [float(row[monitor]) for row in csv.DictReader(f) if row.get(monitor)]
  return min(values) if values else None


def _dedupe_history(history_path: str) -> int:
  """Keeps the last row per epoch (an epoch cut short and redone appears twice); returns rows."""
  if not tf.io.gfile.exists(history_path):
    return 0
  with tf.io.gfile.GFile(history_path, "r") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    return 0
  by_epoch = {int(row["epoch"]): row for row in rows}
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(by_epoch[epoch] for epoch in sorted(by_epoch))
  with tf.io.gfile.GFile(history_path, "w") as f:
    f.write(buffer.getvalue())
  return len(by_epoch)


@dataclasses.dataclass(frozen=True)
class FitResult:
  """What `fit` did: epochs in the history, epochs run now, their wall times, resumed or not."""
  epochs: int
  epoch_seconds: tuple[float, ...]
  train_seconds: float
  resumed: bool


def fit(model: keras.Model, train_batches: tf.data.Dataset,
        val_batches: tf.data.Dataset | None, run: runs.RunDir, *, epochs: int,
        early_stopping: int = 0, class_weight: dict[int, float] | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = (), verbose: int = 2,
        initial_best: float | None = None) -> FitResult:
  """`model.fit` with resume, best-on-validation checkpoint, history.csv and early stopping.

  An unfinished fit in `run` (its `backup/` exists) resumes from its last finished epoch; the
  best weights (validation loss, else training loss) are loaded back into `model` at the end.
  With `initial_best` (the monitored loss of the weights `model` starts with), those starting
  weights are the checkpoint to beat: a fit whose every epoch is worse ends where it began.
  """
  monitor = "val_loss" if val_batches is not None else "loss"
  tf.io.gfile.makedirs(run.best_weights_path.rsplit("/", 1)[0])
  resumed = run.unfinished
  if not resumed and run.exists(runs.HISTORY_NAME):
    tf.io.gfile.remove(run.history_path)   # a finished earlier run: start the history afresh
  if initial_best is not None and not resumed:
    # Built first, so the checkpoint holds the optimizer's slots too and loads back silently.
    model.optimizer.build(model.trainable_variables)
    model.save_weights(run.best_weights_path)
  # A resumed fit must not overwrite the best checkpoint with a worse epoch.
  known = [value for value in (_best_so_far(run.history_path, monitor) if resumed else None,
                               initial_best) if value is not None]
  timer = EpochTimer()
  run_callbacks = [
      CheckedBackupAndRestore(run.backup_dir),
      keras.callbacks.ModelCheckpoint(
          run.best_weights_path, monitor=monitor, save_best_only=True, save_weights_only=True,
          initial_value_threshold=min(known) if known else None),
      keras.callbacks.CSVLogger(run.history_path, append=True),
      timer,
  ]
  if early_stopping:
    run_callbacks.append(keras.callbacks.EarlyStopping(
        monitor=monitor, patience=early_stopping, restore_best_weights=True))
  started = time.perf_counter()
  model.fit(train_batches, validation_data=val_batches, epochs=epochs, class_weight=class_weight,
            callbacks=[*run_callbacks, *callbacks], verbose=verbose,
            shuffle=False)   # the dataset shuffles itself
  train_seconds = time.perf_counter() - started
  epochs_done = _dedupe_history(run.history_path)
  if run.exists(runs.BEST_WEIGHTS):
    model.load_weights(run.best_weights_path)
  return FitResult(epochs_done, tuple(timer.seconds), train_seconds, resumed)


def throughput(fitted: FitResult, num_train: int) -> dict[str, Any]:
  """Epoch counts, wall time and training examples per second for `metrics.json`."""
  epochs_now = len(fitted.epoch_seconds)
  later = sum(fitted.epoch_seconds[1:])
  return {
      "epochs": fitted.epochs, "epochs_this_session": epochs_now, "resumed": fitted.resumed,
      "train_seconds": fitted.train_seconds,
      "examples_per_second": (num_train * epochs_now / fitted.train_seconds
                              if fitted.train_seconds else None),
      # The first epoch fills the cache and traces the graph; later ones show the cached rate.
      "examples_per_second_cached": (num_train * (epochs_now - 1) / later
                                     if epochs_now > 1 and later else None),
  }


@dataclasses.dataclass(frozen=True)
class RunInputs:
  """What a run fits on and is evaluated on."""
  spec: reader.DatasetSpec
  input_kind: str                          # pooled, map or image
  train: tf.data.Dataset                   # shuffled (x, y) batches
  validation: tf.data.Dataset | None       # (x, y) batches, or None without a validation split
  num_train: int
  batch_size: int
  eval_batch_size: int                     # validation and evaluation (`eval_batch_size`)
  settings: Mapping[str, Any]              # image settings (keypoint errors in pixels)
  cache: caching.CachePlan                 # where the parsed splits live between passes


# Validation and evaluation batches of feature inputs hold up to this many bytes of inputs as
# stored (`caching.bytes_per_example`: float16 maps are cast to float32 per batch, so twice
# this in flight; up to `MAX_EVAL_BATCH` examples), never fewer examples than a training batch. A loss or metric
# over a split does not depend on how the split is batched (up to float rounding), and 2,000
# pooled vectors in batches of 64 cost 32 steps of per-step overhead per epoch, most of a
# validation pass. Images go through a backbone whose activations, not its inputs, bound
# memory: they keep the training batch size.
EVAL_BATCH_BYTES = 8 << 20
MAX_EVAL_BATCH = 1024


def eval_batch_size(spec: reader.DatasetSpec, input_kind: str, batch_size: int) -> int:
  """Examples per validation and evaluation batch (see `EVAL_BATCH_BYTES`)."""
  if input_kind == "image":
    return batch_size
  fitting_bytes = EVAL_BATCH_BYTES // caching.bytes_per_example(spec, input_kind)
  return max(batch_size, min(MAX_EVAL_BATCH, fitting_bytes))


def make_inputs(spec: reader.DatasetSpec, input_kind: str, *, batch_size: int,
                train: TrainConfig, settings: Mapping[str, Any], cache: caching.CachePlan,
                epoch: tf.Variable | None = None) -> RunInputs:
  """Shuffled train batches and validation batches of `spec` (see `reader.make_for_train`).

  The splits come from `caching.cached_split`, cached where `cache` says and shared with every
  other run of this process on the same data.

  Args:
    spec: the dataset.
    input_kind: what the model reads.
    batch_size: examples per batch.
    train: shuffle buffer, seed and whether augmented views are trained on.
    settings: the run's image settings.
    cache: the cache placement (`caching.plan_cache`).
    epoch: `EpochSeed.epoch`, so each epoch's order depends on (seed, epoch) alone.
  """
  num_train = reader.count_examples(spec, "train", views=train.views)
  train_batches = reader.make_for_train(
      split_records(spec, "train", input_kind, cache, views=train.views),
      batch_size=batch_size, shuffle_buffer=train.shuffle_buffer, seed=train.seed,
      cache="none", num_examples=num_train, epoch=epoch)
  eval_batch = eval_batch_size(spec, input_kind, batch_size)
  val_batches = reader.make_for_eval(
      split_records(spec, "validation", input_kind, cache), batch_size=eval_batch,
      cache="none", num_examples=reader.count_examples(spec, "validation")
  ) if "validation" in spec.splits else None
  return RunInputs(spec, input_kind, train_batches, val_batches, num_train, batch_size,
                   eval_batch, settings, cache)


def split_records(spec: reader.DatasetSpec, split: str, input_kind: str,
                  cache: caching.CachePlan, *, views: bool = False) -> tf.data.Dataset:
  """One split's shared, cached per-example dicts (`caching.cached_split`) under `cache`."""
  key = caching.cache_key(spec, caching.shared_kinds(spec, input_kind), views)
  return caching.cached_split(spec, split, input_kind=input_kind, views=views, where=cache.where,
                             cache_file=cache.file_prefix(split, key))


@dataclasses.dataclass(frozen=True)
class FitOptions:
  """How `train_and_evaluate` fits (see `fit`)."""
  epochs: int
  early_stopping: int = 0
  class_weight: dict[int, float] | None = None
  callbacks: Sequence[keras.callbacks.Callback] = ()
  verbose: int = 2
  initial_best: float | None = None


def train_and_evaluate(model: keras.Model, run: runs.RunDir, inputs: RunInputs,
                       options: FitOptions, *, describe: Mapping[str, Any], notes: list[str],
                       started: float, extra: Mapping[str, Any] | None = None,
                       saved_as: str = runs.HEAD_NAME, baseline: np.ndarray | None = None,
                       export: Callable[[keras.Model, list[str]], str | None] | None = None
                       ) -> dict[str, Any]:
  """Fits a compiled model, saves it, evaluates it and writes `metrics.json` (last).

  Args:
    model: compiled, with `config.json` already written to `run`.
    run: the run directory (an unfinished fit there is resumed).
    inputs: batches and dataset.
    options: epochs, early stopping, class weights, callbacks, verbosity.
    describe: the leading `metrics.json` entries (task, head, backbone, params...).
    notes: notes so far; `export` may add to them; written as `notes`.
    started: `time.perf_counter()` at the run's start, for `wall_seconds`.
    extra: entries after the throughput block (e.g. `l2`, `sweep`).
    saved_as: the file the fitted model is saved to (`head.keras`, or `model.keras` when it
      takes raw images).
    baseline: keypoints: the mean training targets (computed when None).
    export: writes further files from the fitted model; returns `metrics.json`'s `exported`.

  Returns:
    The metrics also written to `metrics.json`.
  """
  fitted = fit(model, inputs.train, inputs.validation, run, epochs=options.epochs,
               early_stopping=options.early_stopping, class_weight=options.class_weight,
               callbacks=options.callbacks, verbose=options.verbose,
               initial_best=options.initial_best)
  return save_and_evaluate(model, run, inputs, throughput(fitted, inputs.num_train),
                           describe=describe, notes=notes, started=started, extra=extra,
                           saved_as=saved_as, baseline=baseline, export=export)


def save_and_evaluate(model: keras.Model, run: runs.RunDir, inputs: RunInputs,
                      fitted: Mapping[str, Any], *, describe: Mapping[str, Any],
                      notes: list[str], started: float, extra: Mapping[str, Any] | None = None,
                      saved_as: str = runs.HEAD_NAME, baseline: np.ndarray | None = None,
                      export: Callable[[keras.Model, list[str]], str | None] | None = None
                      ) -> dict[str, Any]:
  """The second half of `train_and_evaluate`, for models fitted another way (a closed-form
  ridge solve, a search that trains several heads at once): save, evaluate, export, record.

  `fitted` is the `throughput` block (epochs, seconds, examples per second); the other
  arguments are `train_and_evaluate`'s.
  """
  model.save(run.file(saved_as))
  result: dict[str, Any] = {**describe, **fitted, "batch_size": inputs.batch_size,
                            "eval_batch_size": inputs.eval_batch_size, **(extra or {})}
  result.update(evaluation.evaluate_and_write(
      model, inputs.spec, inputs.input_kind, run, batch_size=inputs.eval_batch_size,
      settings=inputs.settings, baseline=baseline,
      records=lambda split: split_records(inputs.spec, split, inputs.input_kind, inputs.cache)))
  if export is not None:
    result["exported"] = export(model, notes)
  result["notes"] = notes
  result["wall_seconds"] = time.perf_counter() - started   # sweep, fit, evaluation and export
  run.write_metrics(result)
  return result
