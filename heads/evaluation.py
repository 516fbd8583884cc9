"""Evaluation of a trained head (or assembled model): metrics of each split, test predictions.

    result = evaluation.evaluate_and_write(model, spec, "pooled", run, batch_size=64,
                                           settings=training.image_settings(spec))

Each split is read once: one pass yields ids, targets and the model's outputs batch by batch
(only the outputs are kept, never the inputs, so memory is the size of the predictions). The
numbers themselves are computed in numpy by `heads.metrics`.

The model's forward pass is traced once per model with the batch dimension left open, and that
one concrete function serves every batch of every split. Keras' `model.predict` builds a new
`tf.function` for each model and traces it again for each new batch shape (validation and test
end in different partial batches); TensorFlow's retracing detector keys functions by their
Python code, so across a compare grid every new model's traces counted as retraces of one
function and printed "5 out of the last 5 calls ... triggered tf.function retracing". A
concrete function is called without going through that detector and is never retraced.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contracts import runs, statistics
from heads import compiled, dataset_stats, export, metrics, reader

EVALUATED_SPLITS = ("validation", "test")


def missing_split_notes(spec: reader.DatasetSpec) -> list[str]:
  """`metrics.json` notes for the evaluated splits the dataset lacks."""
  return [f"no {split} split in the dataset: not evaluated"
          for split in EVALUATED_SPLITS if split not in spec.splits]


def train_target_mean(spec: reader.DatasetSpec) -> np.ndarray:
  """`[2K]` mean keypoint targets of the train split (original images only), from the
  dataset's statistics (no pass over the split when stage 2 wrote them)."""
  return statistics.targets_mean(dataset_stats.load(spec))


def compiled_forward(model: keras.Model, example: tf.TensorSpec) -> Callable[[tf.Tensor],
                                                                             tf.Tensor]:
  """`model(x, training=False)` traced once for batches of any size of `example`-shaped inputs."""
  # Cached inputs arrive as stored (float16 maps, uint8 images): cast inside the one trace.
  signature = tf.TensorSpec([None, *example.shape], example.dtype)
  # A head shared by several runs (`heads.compiled`) keeps its trace for the next run.
  return compiled.traced(model, ("forward", signature), lambda: tf.function(
      lambda x: model(tf.cast(x, tf.float32), training=False)).get_concrete_function(signature))


def predict_split(forward: Callable[[tf.Tensor], tf.Tensor], records: tf.data.Dataset, *,
                  batch_size: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
  """One pass over per-example dicts: `outputs` of `forward` on `x`, plus the other `keys`."""
  columns: dict[str, list[np.ndarray]] = {key: [] for key in (*keys, "outputs")}
  for batch in records.batch(batch_size).prefetch(tf.data.AUTOTUNE):
    columns["outputs"].append(np.asarray(forward(batch["x"])))
    for key in keys:
      columns[key].append(batch[key].numpy())
  return {key: np.concatenate(parts) if parts else np.zeros((0,))
          for key, parts in columns.items()}


def _sizes(columns: Mapping[str, np.ndarray], split: str, settings: Mapping[str, Any]
           ) -> tuple[np.ndarray, np.ndarray] | None:
  """Original (height, width) per evaluated example, or None when they cannot be joined.

  Image records carry them (read in the same pass); feature records do not, so they are joined
  by id from the image dataset's split, parsing only ids and sizes.
  """
  if "height" in columns:
    return columns["height"].astype(np.float64), columns["width"].astype(np.float64)
  sizes = reader.source_sizes(settings.get("image_dataset"), split)
  if sizes is None or not all(i in sizes for i in columns["id"]):
    return None
  pairs = np.array([sizes[i] for i in columns["id"]], np.float64).reshape(-1, 2)
  return pairs[:, 0], pairs[:, 1]


def split_metrics(spec: reader.DatasetSpec, columns: Mapping[str, np.ndarray], split: str, *,
                  settings: Mapping[str, Any], baseline: np.ndarray | None) -> dict[str, Any]:
  """The `metrics.json` block of one split from its targets (`y`) and `outputs`."""
  targets, outputs = columns["y"], columns["outputs"]
  if spec.task != "keypoints":
    return metrics.classification(targets, metrics.probabilities(outputs, spec.task),
                                  spec.class_names)
  sizes = _sizes(columns, split, settings)
  loss = float(np.abs(outputs - targets).mean()) if len(outputs) else None
  return metrics.keypoints(targets, outputs, image_size=settings.get("image_size"),
                           loss=loss, height=None if sizes is None else sizes[0],
                           width=None if sizes is None else sizes[1],
                           resize=settings.get("resize") or "stretch", baseline=baseline)


def _write_predictions(path: str, ids: np.ndarray, outputs: np.ndarray,
                       spec: reader.DatasetSpec) -> None:
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(export.predictions_csv(ids, outputs, task=spec.task, class_names=spec.class_names,
                                   num_keypoints=spec.num_keypoints))


def evaluate_and_write(model: keras.Model, spec: reader.DatasetSpec, input_kind: str,
                       run: runs.RunDir, *, batch_size: int, settings: Mapping[str, Any],
                       baseline: np.ndarray | None = None,
                       records: Callable[[str], tf.data.Dataset] | None = None
                       ) -> dict[str, Any]:
  """Metrics of the validation and test splits present; writes `predictions_test.csv`.

  Args:
    model: the trained head (or assembled model) taking `input_kind` inputs.
    spec: the dataset it was trained on.
    input_kind: `pooled`, `map` or `image`.
    run: the run directory the predictions go to.
    batch_size: examples per forward pass.
    settings: the run's image settings (`training.image_settings`): keypoint errors in pixels.
    baseline: keypoints: the mean training targets (computed when None).
    records: split -> per-example dicts with `id` (the run's shared cache); default a fresh
      read of the split.
  """
  if spec.task == "keypoints" and baseline is None:
    baseline = train_target_mean(spec)
  # Image records carry the source size the keypoint errors in source pixels need.
  extra = ("height", "width") if spec.task == "keypoints" and spec.kind == "images" else ()
  result, forward = {}, None
  for split in EVALUATED_SPLITS:
    if split not in spec.splits:
      continue
    split_records = (records(split) if records else
                     reader.read_split(spec, split, input_kind=input_kind, with_id=True,
                                       extra_keys=extra))
    forward = forward or compiled_forward(model, split_records.element_spec["x"])
    columns = predict_split(forward, split_records, batch_size=batch_size,
                            keys=("id", "y", *extra))
    result[split] = split_metrics(spec, columns, split, settings=settings, baseline=baseline)
    if split == "test":
      _write_predictions(run.predictions_path, columns["id"], columns["outputs"], spec)
  return result
