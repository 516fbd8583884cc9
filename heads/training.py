"""Trains one head on a cached feature dataset and writes the run directory.

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head conv --out runs/x --epochs 30

`RUN_DIR` gets `config.json` (written first), `history.csv`, `checkpoints/best.weights.h5` (best
on validation), `head.keras`, `model.keras` (raw images in, see `heads.export`),
`predictions_test.csv` and `metrics.json` (written last). An interrupted run resumes from its
last finished epoch when started again with the same arguments (`keras.callbacks.BackupAndRestore`
in `RUN_DIR/backup/`).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contracts import datasets, layout
from heads import export, metrics, reader, sweep, zoo
from heads.config import Config, to_dict

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.csv"
HEAD_NAME = "head.keras"
BEST_WEIGHTS = "checkpoints/best.weights.h5"
BACKUP_DIR = "backup"
RESIZE_MODES = ("stretch", "pad", "crop")


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


def resolve_dataset(features_dir: str, head: str) -> reader.DatasetSpec:
  """The dataset a head trains on: the feature dataset, or for `scratch` its image dataset.

  Raises:
    ValueError: a feature head pointed at an image dataset, or a missing manifest.
  """
  spec = reader.load_spec(features_dir)
  if head == "scratch" and spec.kind == "features":
    image_dir = spec.manifest.get("image_dataset")
    if not image_dir:
      raise ValueError(f"feature dataset {features_dir!r} does not name its image dataset; "
                       "pass the image dataset to --features for --head scratch")
    return reader.load_spec(image_dir)
  if head != "scratch" and spec.kind == "images":
    raise ValueError(f"{features_dir!r} is an image dataset; head {head!r} trains on features "
                     "(run headstart extract first, or use --head scratch)")
  return spec


def image_settings(spec: reader.DatasetSpec) -> dict[str, Any]:
  """What `predict` needs to turn new image files into model inputs like the training images.

  Read from the image dataset's manifest when it is reachable; otherwise from the copies the
  feature manifest keeps (`image_size`, `image_format`, and `resize` when it is a resize mode).
  """
  image_dir = spec.data_dir if spec.kind == "images" else spec.manifest.get("image_dataset")
  if spec.kind == "images":
    manifest = spec.manifest
  elif image_dir and datasets.has_manifest(image_dir):
    manifest = datasets.read_manifest(image_dir)
  else:
    manifest = {"image_size": spec.manifest.get("image_size"),
                "format": spec.manifest.get("image_format")}
    if spec.manifest.get("resize") in RESIZE_MODES:
      manifest["resize"] = spec.manifest["resize"]
  return {
      "image_dataset": image_dir,
      "image_size": manifest.get("image_size"),
      "resize": manifest.get("resize", "stretch"),
      "format": manifest.get("format"),
      # Ingest records the pad colour as `background`; CONTRACTS.md calls it `pad_color`.
      "background": manifest.get("background") or manifest.get("pad_color"),
  }


def _optimizer(config: Config, steps_per_epoch: int):
  train = config.train
  rate = train.learning_rate
  if train.lr_decay:
    # Decays by lr_decay_rate once per epoch (Keras counts optimizer steps).
    rate = keras.optimizers.schedules.ExponentialDecay(
        rate, decay_steps=max(steps_per_epoch, 1), decay_rate=train.lr_decay_rate)
  return {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD,
          "rmsprop": keras.optimizers.RMSprop}[train.optimizer](learning_rate=rate)


def compile_head(model: keras.Model, task: str, optimizer) -> None:
  """Compiles a head (or an assembled model) with the task's loss and metric."""
  metric = "mae" if task == "keypoints" else (
      "binary_accuracy" if task == "binary" else "sparse_categorical_accuracy")
  model.compile(optimizer=optimizer, loss=zoo.loss_for(task), metrics=[metric])


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
  """`balanced` weights: n / (num_classes * count), so each class carries equal total weight."""
  counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
  total = counts.sum()
  return {index: float(total / (num_classes * count)) if count else 0.0
          for index, count in enumerate(counts)}


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
  """BackupAndRestore that refuses a damaged backup in one sentence.

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


def _write_predictions(path: str, ids: np.ndarray, outputs: np.ndarray,
                       spec: reader.DatasetSpec) -> None:
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(export.predictions_csv(ids, outputs, task=spec.task, class_names=spec.class_names,
                                   num_keypoints=spec.num_keypoints))


def _source_sizes(settings: Mapping[str, Any], split: str,
                  ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """Original (height, width) per id from the image dataset, or None when it is unreachable."""
  image_dir = settings.get("image_dataset")
  if not image_dir or not datasets.has_manifest(image_dir):
    return None
  try:
    image_spec = reader.load_spec(image_dir)
    files = datasets.shard_paths(image_dir, image_spec.manifest, split)
  except ValueError:
    return None
  parse = image_spec.schema.batch_parser(("id", "height", "width"))
  sizes = {}
  batches = tf.data.TFRecordDataset(files).batch(1024).map(
      parse, num_parallel_calls=tf.data.AUTOTUNE)
  for batch in batches.as_numpy_iterator():
    sizes.update(zip(batch["id"], zip(batch["height"], batch["width"])))
  if not all(i in sizes for i in ids):
    return None
  pairs = np.array([sizes[i] for i in ids], np.float64).reshape(-1, 2)
  return pairs[:, 0], pairs[:, 1]


def evaluate_split(model: keras.Model, spec: reader.DatasetSpec, split: str, input_kind: str,
                   *, batch_size: int, settings: Mapping[str, Any],
                   baseline: np.ndarray | None = None
                   ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """Metrics of one split plus its ids and raw outputs (for the predictions CSV)."""
  records = reader.read_split(spec, split, input_kind=input_kind, with_id=True).apply(
      tf.data.experimental.assert_cardinality(reader.count_examples(spec, split)))
  arrays = reader.load_arrays(records.map(lambda r: {"id": r["id"], "y": r["y"]},
                                          num_parallel_calls=tf.data.AUTOTUNE), ("id", "y"))
  batches = records.map(lambda r: r["x"], num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
  outputs = model.predict(batches, verbose=0)
  if spec.task == "keypoints":
    sizes = _source_sizes(settings, split, arrays["id"])
    loss = float(np.abs(outputs - arrays["y"]).mean()) if len(outputs) else None
    result = metrics.keypoints(arrays["y"], outputs, image_size=settings.get("image_size"),
                               loss=loss, height=None if sizes is None else sizes[0],
                               width=None if sizes is None else sizes[1],
                               resize=settings.get("resize") or "stretch", baseline=baseline)
  else:
    result = metrics.classification(arrays["y"], metrics.probabilities(outputs, spec.task),
                                    spec.class_names)
  return result, arrays["id"], outputs


@dataclasses.dataclass(frozen=True)
class FitResult:
  """What `fit` did: epochs in the history, epochs run now, their wall times, resumed or not."""
  epochs: int
  epoch_seconds: tuple[float, ...]
  train_seconds: float
  resumed: bool


def fit(model: keras.Model, train_batches: tf.data.Dataset,
        val_batches: tf.data.Dataset | None, out_dir: str, *, epochs: int,
        early_stopping: int = 0, class_weight: dict[int, float] | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = (), verbose: int = 2) -> FitResult:
  """`model.fit` with resume, best-on-validation checkpoint, history.csv and early stopping.

  An unfinished fit in `out_dir` (its `backup/` exists) resumes from its last finished epoch;
  the best weights (validation loss, else training loss) are loaded back into `model` at the end.
  """
  monitor = "val_loss" if val_batches is not None else "loss"
  history_path = f"{out_dir}/{HISTORY_NAME}"
  tf.io.gfile.makedirs(f"{out_dir}/checkpoints")
  resumed = tf.io.gfile.exists(f"{out_dir}/{BACKUP_DIR}")
  if not resumed and tf.io.gfile.exists(history_path):
    tf.io.gfile.remove(history_path)   # a finished earlier run: start the history afresh
  timer = EpochTimer()
  run_callbacks = [
      CheckedBackupAndRestore(f"{out_dir}/{BACKUP_DIR}"),
      keras.callbacks.ModelCheckpoint(
          f"{out_dir}/{BEST_WEIGHTS}", monitor=monitor, save_best_only=True,
          save_weights_only=True,
          # A resumed fit must not overwrite the best checkpoint with a worse epoch.
          initial_value_threshold=_best_so_far(history_path, monitor) if resumed else None),
      keras.callbacks.CSVLogger(history_path, append=True),
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
  epochs_done = _dedupe_history(history_path)
  if tf.io.gfile.exists(f"{out_dir}/{BEST_WEIGHTS}"):
    model.load_weights(f"{out_dir}/{BEST_WEIGHTS}")
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


def train_target_mean(spec: reader.DatasetSpec, input_kind: str) -> np.ndarray:
  """`[2K]` mean keypoint targets of the train split (original images only)."""
  targets = reader.read_split(spec, "train", input_kind=input_kind).map(
      lambda record: {"y": record["y"]}, num_parallel_calls=tf.data.AUTOTUNE)
  return reader.load_arrays(targets, ("y",))["y"].mean(axis=0)


def _feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  # A floor on the variance: channels that are constant on the train split stay finite.
  return x.mean(axis=0), np.maximum(x.var(axis=0), 1e-6)


def train_input_stats(train_records: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and variance of the train split's pooled vectors (small: C floats each)."""
  return _feature_stats(reader.load_arrays(train_records.map(
      lambda record: {"x": record["x"]}, num_parallel_calls=tf.data.AUTOTUNE), ("x",))["x"])


def _export(model: keras.Model, spec: reader.DatasetSpec, out_dir: str, head: str,
            notes: list[str]) -> str | None:
  try:
    export.export_model(model, spec, f"{out_dir}/{export.MODEL_NAME}", head=head)
    return export.MODEL_NAME
  except export.ExportUnavailable as error:
    notes.append(f"model.keras not exported: {error}")
    logging.warning("model.keras not exported: %s", error)
    return None


def export_run(run_dir: str) -> str | None:
  """Writes `model.keras` for a finished run trained with `export_model=False`.

  Returns:
    The exported file name, or None when the backbone cannot be rebuilt (see the run's notes).
  """
  run_dir = run_dir.rstrip("/")
  with tf.io.gfile.GFile(f"{run_dir}/{CONFIG_NAME}", "r") as f:
    saved = json.load(f)
  spec = resolve_dataset(saved["features"], saved["head_name"])
  reader.check_cache_key(spec, saved.get("cache_key", ""), run_dir)
  head_model = keras.models.load_model(f"{run_dir}/{HEAD_NAME}")
  metrics_path = f"{run_dir}/{METRICS_NAME}"
  with tf.io.gfile.GFile(metrics_path, "r") as f:
    result = json.load(f)
  notes = [n for n in result.get("notes", []) if not n.startswith("model.keras not exported")]
  result["exported"] = _export(head_model, spec, run_dir, saved["head_name"], notes)
  result["notes"] = notes
  datasets.write_json(metrics_path, result)
  return result["exported"]


def evaluate_and_write(model: keras.Model, spec: reader.DatasetSpec, input_kind: str,
                       out_dir: str, *, batch_size: int, settings: Mapping[str, Any]
                       ) -> dict[str, Any]:
  """Metrics of the validation and test splits present; writes `predictions_test.csv`."""
  baseline = train_target_mean(spec, input_kind) if spec.task == "keypoints" else None
  result = {}
  for split in ("validation", "test"):
    if split not in spec.splits:
      continue
    result[split], ids, outputs = evaluate_split(model, spec, split, input_kind,
                                                 batch_size=batch_size, settings=settings,
                                                 baseline=baseline)
    if split == "test":
      _write_predictions(f"{out_dir}/predictions_test.csv", ids, outputs, spec)
  return result


def _pick_l2(spec: reader.DatasetSpec, kind: str, train_records: tf.data.Dataset,
             config: Config) -> tuple[Config, list[dict[str, Any]],
                                      tuple[np.ndarray, np.ndarray]]:
  """Runs the L2 sweep on in-memory features.

  Returns:
    The config with the chosen strength, the sweep's rows, and the train features' (mean,
    variance), which the head's standardisation reuses instead of loading the split again.
  """
  if "validation" not in spec.splits:
    raise ValueError("--sweep needs a validation split to pick the L2 strength; "
                     f"{spec.data_dir!r} has none")
  train_arrays = reader.load_arrays(train_records)
  val_arrays = reader.load_arrays(reader.read_split(spec, "validation", input_kind=kind))
  # The probe standardises its input (see zoo.build_head): sweep on the same standardised view.
  stats = _feature_stats(train_arrays["x"])
  mean, std = stats[0], np.sqrt(stats[1])
  best_l2, rows = sweep.sweep_l2(
      (train_arrays["x"] - mean) / std, train_arrays["y"], (val_arrays["x"] - mean) / std,
      val_arrays["y"], task=spec.task,
      num_outputs=spec.num_outputs, grid=config.train.sweep_grid,
      steps=config.train.sweep_steps, seed=config.train.seed)
  return (dataclasses.replace(config, head=dataclasses.replace(config.head, l2=best_l2)), rows,
          stats)


def _check_run_dir(out_dir: str, spec: reader.DatasetSpec, head: str) -> None:
  """Refuses to resume or overwrite a run directory with other features or another head."""
  previous = f"{out_dir}/{CONFIG_NAME}"
  if not tf.io.gfile.exists(previous):
    return
  with tf.io.gfile.GFile(previous, "r") as f:
    saved = json.load(f)
  # A run directory belongs to one feature set: resuming or overwriting it with other features
  # would mix checkpoints and metrics of two different inputs.
  reader.check_cache_key(spec, saved.get("cache_key", ""), out_dir)
  if tf.io.gfile.exists(f"{out_dir}/{BACKUP_DIR}") and saved.get("head_name") != head:
    raise ValueError(f"run {out_dir!r} holds an unfinished {saved.get('head_name')!r} head; "
                     f"resume it with --head {saved.get('head_name')} or use a new --out")


def train(features_dir: str, head: str, out_dir: str, config: Config = Config(), *,
          sweep_l2: bool = False, callbacks: Sequence[keras.callbacks.Callback] = (),
          verbose: int = 2, export_model: bool = True) -> dict[str, Any]:
  """Trains `head` on `features_dir` into `out_dir`; returns the metrics also written there.

  Args:
    features_dir: a feature dataset (or, for `head="scratch"`, an image dataset).
    head: one of `heads.zoo.HEADS`.
    out_dir: the run directory (created; an unfinished run there is resumed).
    config: hyperparameters.
    sweep_l2: `linear` only: pick the output L2 strength on validation first.
    callbacks: extra Keras callbacks (tests use one to simulate an interruption).
    verbose: Keras `fit` verbosity.
    export_model: write `model.keras` (backbone + head, raw images in). `compare` turns it off
      for its grid (each export holds a whole backbone) and exports the best run only.

  Raises:
    ValueError: bad head/dataset combination, no train split, missing manifest.
  """
  started = time.perf_counter()
  out_dir = out_dir.rstrip("/")
  kind = zoo.input_kind(head)
  if sweep_l2 and head != "linear":
    raise ValueError(f"--sweep tunes the linear probe's L2 strength; head {head!r} has no sweep")
  spec = resolve_dataset(features_dir, head)
  if "train" not in spec.splits:
    raise layout.DatasetError(f"dataset {spec.data_dir!r} has no train split (it has "
                                  f"{', '.join(spec.splits)}); nothing to train on")
  _check_run_dir(out_dir, spec, head)
  for split in spec.splits:
    datasets.check_shards(spec.data_dir, spec.manifest, split)
  notes = [f"no {split} split in the dataset: not evaluated"
           for split in ("validation", "test") if split not in spec.splits]
  has_validation = "validation" in spec.splits
  keras.utils.set_random_seed(config.train.seed)
  tf.io.gfile.makedirs(f"{out_dir}/checkpoints")
  settings = image_settings(spec)
  train_records = reader.read_split(spec, "train", input_kind=kind, views=config.train.views)

  sweep_rows = input_stats = None
  if sweep_l2:
    config, sweep_rows, input_stats = _pick_l2(spec, kind, train_records, config)

  run_config = {**to_dict(config), "head_name": head, "features": spec.data_dir,
                "dataset_kind": spec.kind, "task": spec.task, "class_names": list(spec.class_names),
                "num_keypoints": spec.num_keypoints, "cache_key": spec.cache_key,
                "backbone": spec.backbone, "weights_kind": spec.weights_kind,
                "input_kind": kind, "image": settings, "sweep": sweep_l2,
                "image_fingerprint": (spec.manifest.get("fingerprint") if spec.kind == "images"
                                      else spec.manifest.get("image_fingerprint"))}
  datasets.write_json(f"{out_dir}/{CONFIG_NAME}", run_config)

  batch_size = config.train.batch_size
  num_train = reader.count_examples(spec, "train", views=config.train.views)
  epoch_seed = EpochSeed()
  train_batches = reader.make_for_train(train_records, batch_size=batch_size,
                                        shuffle_buffer=config.train.shuffle_buffer,
                                        seed=config.train.seed, num_examples=num_train,
                                        epoch=epoch_seed.epoch)
  val_batches = reader.make_for_eval(
      reader.read_split(spec, "validation", input_kind=kind), batch_size=batch_size,
      num_examples=reader.count_examples(spec, "validation")) if has_validation else None
  steps_per_epoch = -(-num_train // batch_size)

  weights = None
  if config.train.class_weight == "balanced" and spec.task != "keypoints":
    labels = reader.load_arrays(train_records.map(
        lambda r: {"y": r["y"]}, num_parallel_calls=tf.data.AUTOTUNE), ("y",))["y"]
    weights = class_weights(labels, max(len(spec.class_names), 2))

  target_mean = None
  if spec.task == "keypoints":
    target_mean = train_target_mean(spec, kind)
  if kind == "pooled" and input_stats is None:
    input_stats = train_input_stats(train_records)
  model = zoo.build_head(head, spec, config.head, target_mean=target_mean,
                         input_stats=input_stats)
  compile_head(model, spec.task, _optimizer(config, steps_per_epoch))
  if not has_validation:
    notes.append("best checkpoint and early stopping monitor the training loss")
  fitted = fit(model, train_batches, val_batches, out_dir, epochs=config.train.epochs,
               early_stopping=config.train.early_stopping, class_weight=weights,
               callbacks=[epoch_seed, *callbacks], verbose=verbose)
  model.save(f"{out_dir}/{HEAD_NAME}")
  result: dict[str, Any] = {
      "task": spec.task, "head": head, "backbone": spec.backbone,
      "weights_kind": spec.weights_kind, "cache_key": spec.cache_key,
      "features": spec.data_dir, "params": int(model.count_params()),
      "class_names": list(spec.class_names), "num_train_examples": num_train,
      **throughput(fitted, num_train), "batch_size": batch_size, "l2": config.head.l2,
  }
  if sweep_rows is not None:
    result["sweep"] = sweep_rows
  result.update(evaluate_and_write(model, spec, kind, out_dir, batch_size=batch_size,
                                   settings=settings))
  if export_model:
    result["exported"] = _export(model, spec, out_dir, head, notes)
  else:
    notes.append("model.keras not exported (export_run() writes it from head.keras)")
  result["notes"] = notes
  result["wall_seconds"] = time.perf_counter() - started   # sweep, fit, evaluation and export
  datasets.write_json(f"{out_dir}/{METRICS_NAME}", result)
  return result


def load_run(run_dir: str) -> dict[str, Any]:
  """The `config.json` of a finished run.

  Raises:
    ValueError: the directory holds no finished run.
  """
  run_dir = run_dir.rstrip("/")
  if not tf.io.gfile.exists(f"{run_dir}/{METRICS_NAME}"):
    raise ValueError(f"{run_dir!r} is not a finished headstart run (no {METRICS_NAME})")
  with tf.io.gfile.GFile(f"{run_dir}/{CONFIG_NAME}", "r") as f:
    return json.load(f)
