"""Evaluation numbers for `metrics.json`: classification scores and keypoint pixel errors.

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head conv --out runs/x

Pure numpy on predictions already computed by the model, so the numbers do not depend on how
Keras aggregates metrics over batches.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Clipping for the log in cross-entropy, as Keras does.
_EPSILON = 1e-7


def probabilities(outputs: np.ndarray, task: str) -> np.ndarray:
  """Head outputs -> `[N, num_classes]` class probabilities (binary sigmoid -> two columns)."""
  outputs = np.asarray(outputs, np.float64)
  if task == "binary":
    positive = outputs.reshape(-1)
    return np.stack([1.0 - positive, positive], axis=1)
  return outputs


def classification(labels: np.ndarray, probs: np.ndarray,
                   class_names: Sequence[str]) -> dict[str, Any]:
  """Loss, accuracy, per-class precision/recall/F1 and the confusion matrix.

  Args:
    labels: `[N]` int class indices.
    probs: `[N, K]` probabilities (see `probabilities`).
    class_names: the K class names, in index order.

  Returns:
    A JSON-ready dict; `confusion_matrix[i][j]` counts true class i predicted as j.
  """
  labels = np.asarray(labels, np.int64).reshape(-1)
  num_classes = len(class_names)
  predicted = probs.argmax(axis=1) if len(labels) else np.zeros((0,), np.int64)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  per_class = {}
  for index, name in enumerate(class_names):
    true_positive = confusion[index, index]
    predicted_count = confusion[:, index].sum()
    actual_count = confusion[index, :].sum()
    precision = true_positive / predicted_count if predicted_count else 0.0
    recall = true_positive / actual_count if actual_count else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                       "support": int(actual_count)}
  picked = probs[np.arange(len(labels)), labels] if len(labels) else np.zeros((0,))
  return {
      "num_examples": int(len(labels)),
      "loss": float(-np.log(np.clip(picked, _EPSILON, 1.0)).mean()) if len(labels) else None,
      "accuracy": float((predicted == labels).mean()) if len(labels) else None,
      "per_class": per_class,
      "confusion_matrix": confusion.tolist(),
  }


def source_scale(height: np.ndarray, width: np.ndarray, image_size: int,
                 resize: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per-image affine map from stored-image pixels to source pixels: `src = (p - offset) * scale`.

  Returns `(scale_x, scale_y, offset_x, offset_y)`, each `[N]`. `stretch` scales each axis on its
  own; `pad` fits the long side and centres (offsets are the padding); `crop` fills the short
  side and centre-crops (negative offsets).
  """
  height = np.asarray(height, np.float64)
  width = np.asarray(width, np.float64)
  if resize == "stretch":
    zeros = np.zeros_like(width)
    return width / image_size, height / image_size, zeros, zeros
  fit = np.maximum if resize == "pad" else np.minimum
  factor = image_size / fit(height, width)          # stored pixels per source pixel
  offset_x = (image_size - width * factor) / 2.0
  offset_y = (image_size - height * factor) / 2.0
  return 1.0 / factor, 1.0 / factor, offset_x, offset_y


def keypoints(targets: np.ndarray, predicted: np.ndarray, *, image_size: int | None,
              loss: float | None = None, height: np.ndarray | None = None,
              width: np.ndarray | None = None, resize: str = "stretch",
              baseline: np.ndarray | None = None) -> dict[str, Any]:
  """MAE/RMSE of normalised keypoints, in stored-image pixels and (when known) source pixels.

  Args:
    targets: `[N, 2K]` normalised `x0, y0, x1, y1, ...` in stored-image coordinates.
    predicted: same shape, the head's outputs.
    image_size: side of the stored image; None leaves out the pixel errors.
    loss: the model's loss on the split, reported as is.
    height: `[N]` original heights, or None when the image dataset is not available.
    width: `[N]` original widths.
    resize: the image dataset's resize mode (`stretch`, `pad`, `crop`).
    baseline: `[2K]` mean training targets; adds `mae_px_mean_baseline`, the error of always
      predicting the average face, so a head's error can be judged at a glance.
  """
  targets = np.asarray(targets, np.float64)
  predicted = np.asarray(predicted, np.float64).reshape(targets.shape)
  error = predicted - targets
  result: dict[str, Any] = {
      "num_examples": int(len(targets)), "loss": loss,
      "mae": float(np.abs(error).mean()) if len(targets) else None,
  }
  if image_size and len(targets):
    pixels = error * image_size
    result["mae_px"] = float(np.abs(pixels).mean())
    result["rmse_px"] = float(np.sqrt((pixels ** 2).mean()))
    result["pixels_of"] = f"stored image ({image_size}x{image_size})"
    if baseline is not None:
      result["mae_px_mean_baseline"] = float(
          np.abs((np.asarray(baseline, np.float64)[None] - targets) * image_size).mean())
  if image_size and height is not None and width is not None and len(targets):
    scale_x, scale_y, _, _ = source_scale(height, width, image_size, resize)
    # Offsets cancel in a difference of two points; only the scale matters for the error.
    scale = np.empty_like(pixels)
    scale[:, 0::2] = scale_x[:, None]
    scale[:, 1::2] = scale_y[:, None]
    source = pixels * scale
    result["mae_px_source"] = float(np.abs(source).mean())
    result["rmse_px_source"] = float(np.sqrt((source ** 2).mean()))
  return result
