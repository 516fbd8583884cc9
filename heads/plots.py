"""Figures of stage 3, as PNG bytes: the leaderboard chart and a run report's figures.

    png = plots.learning_curves(run.history(), task)         # None without history
    png = plots.leaderboard_chart(rows)                        # compare's leaderboard.png

Each function draws one matplotlib figure (Agg backend, no display needed) and returns its PNG
bytes; writing them is the caller's business (`heads.report` puts them next to its page,
`heads.compare` writes `leaderboard.png`). Run figures: learning curves (`history.csv`), the
test confusion matrix, the most confident misclassified test images, keypoint overlays (true vs
predicted), and activation maps of the frozen backbone (a few channels at three depths).
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")   # no display here or on CI; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from contracts import datasets, runs  # noqa: E402

MAX_MISCLASSIFIED = 16
MAX_KEYPOINT_IMAGES = 8
ACTIVATION_LAYERS = 3
ACTIVATION_CHANNELS = 4


def figure_png(figure, *, dpi: int = 90, bbox_inches: str | None = "tight") -> bytes:
  """Renders a matplotlib figure to PNG bytes and closes it."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi, bbox_inches=bbox_inches)
  plt.close(figure)
  return buffer.getvalue()


def leaderboard_chart(rows: Sequence[Mapping[str, Any]]) -> bytes:
  """Horizontal bars of the test metric (mean, std as error bars), random init hatched."""
  shown = [row for row in rows if row["test_mean"] is not None] or list(rows)
  labels = ["from-scratch CNN (no backbone)" if r["head"] == "scratch"
            else f"{r['backbone']} [{r['weights']}] / {r['head']}" for r in shown]
  means = [r["test_mean"] or 0.0 for r in shown]
  stds = [r["test_std"] or 0.0 for r in shown]
  figure, axes = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.4))
  bars = axes.barh(range(len(shown)), means, xerr=stds, color="#4c72b0", capsize=3)
  for bar, row in zip(bars, shown):
    if row["weights"] != "imagenet":
      bar.set_hatch("//")
      bar.set_color("#dd8452")
  axes.set_yticks(range(len(shown)), labels, fontsize=8)
  axes.invert_yaxis()
  metric = shown[0]["metric"] if shown else "metric"
  axes.set_xlabel(f"test {metric} (mean ± std over seeds)"
                  + ("; lower is better" if shown and shown[0]["better"] == "lower" else ""))
  axes.set_title("blue: ImageNet weights; orange hatched: random init, scratch or file",
                 fontsize=8)
  figure.tight_layout()
  return figure_png(figure, dpi=110, bbox_inches=None)


def learning_curves(history: Sequence[Mapping[str, str]], task: str) -> bytes | None:
  """Loss and metric per epoch, train vs validation; None without history."""
  if not history:
    return None
  epochs = [int(row["epoch"]) + 1 for row in history]
  metric = next((key for key in history[0] if key not in ("epoch", "loss", "learning_rate")
                 and not key.startswith("val_")), None)
  figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
  for axis, name in zip(axes, ("loss", metric)):
    if name is None:
      axis.set_visible(False)
      continue
    for prefix, style in (("", "-o"), ("val_", "--s")):
      values = [float(row[prefix + name]) if row.get(prefix + name) else np.nan for row in history]
      if not np.all(np.isnan(values)):
        axis.plot(epochs, values, style, markersize=3,
                  label="validation" if prefix else "train")
    axis.set_xlabel("epoch")
    axis.set_ylabel(name + (" (normalised coordinates)" if task == "keypoints" and name != "loss"
                            else ""))
    axis.legend()
    axis.grid(alpha=0.3)
  figure.suptitle("learning curves")
  return figure_png(figure)


def confusion_figure(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
  """Test confusion matrix: rows true class, columns predicted, counts annotated."""
  matrix = np.asarray(confusion)
  size = max(3.0, 0.55 * len(class_names) + 1.5)
  figure, axis = plt.subplots(figsize=(size + 1, size))
  image = axis.imshow(matrix, cmap="Blues")
  axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
  axis.set_yticks(range(len(class_names)), class_names)
  axis.set_xlabel("predicted")
  axis.set_ylabel("true")
  for (i, j), value in np.ndenumerate(matrix):
    axis.text(j, i, str(value), ha="center", va="center",
              color="white" if value > matrix.max() / 2 else "black")
  figure.colorbar(image, ax=axis, fraction=0.046)
  axis.set_title("test confusion matrix")
  return figure_png(figure)


def misclassified(predictions: Sequence[Mapping[str, str]], examples: Mapping[str, Any],
                  class_names: Sequence[str], *, limit: int = MAX_MISCLASSIFIED
                  ) -> tuple[bytes | None, int, int]:
  """Grid of wrong test predictions, most confident first.

  Returns:
    `(PNG or None when nothing is wrong or no image joins, wrong count, joined count)`.
  """
  wrong = []
  joined = 0
  for row in predictions:
    example = examples.get(row["id"])
    if example is None:
      continue
    joined += 1
    true = class_names[int(example["label"])]
    if row["label"] != true:
      confidence = float(row.get(f"prob_{row['label']}") or 0.0)
      wrong.append((confidence, true, row["label"], example["image"]))
  wrong.sort(key=lambda item: -item[0])
  if not wrong:
    return None, 0, joined
  shown = wrong[:limit]
  columns = min(len(shown), 8)
  rows = -(-len(shown) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 2.0 * rows), squeeze=False)
  for axis in axes.flat:
    axis.axis("off")
  for axis, (confidence, true, predicted, image) in zip(axes.flat, shown):
    axis.imshow(image)
    axis.set_title(f"true {true}\npred {predicted} {confidence:.2f}", fontsize=7)
  figure.suptitle(f"misclassified test images ({len(wrong)} of {joined}; "
                  f"showing {len(shown)}, most confident first)", fontsize=9)
  return figure_png(figure), len(wrong), joined


def keypoint_overlays(predictions: Sequence[Mapping[str, str]], examples: Mapping[str, Any],
                      num_keypoints: int, *, limit: int = MAX_KEYPOINT_IMAGES) -> bytes | None:
  """Test images with true (green circles) and predicted (red crosses) keypoints."""
  pairs = []
  for row in predictions:
    example = examples.get(row["id"])
    if example is None:
      continue
    predicted = np.array([[float(row[f"x{k}"]), float(row[f"y{k}"])]
                          for k in range(num_keypoints)])
    pairs.append((example["image"], np.asarray(example["targets"]).reshape(-1, 2), predicted))
    if len(pairs) >= limit:
      break
  if not pairs:
    return None
  columns = min(len(pairs), 4)
  rows = -(-len(pairs) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.7 * rows), squeeze=False)
  for axis in axes.flat:
    axis.axis("off")
  for axis, (image, true, predicted) in zip(axes.flat, pairs):
    height, width = image.shape[:2]
    axis.imshow(image)
    # Targets are normalised to the stored image; pixel centres sit at (size - 1) * t.
    axis.scatter(true[:, 0] * (width - 1), true[:, 1] * (height - 1), s=22, facecolors="none",
                 edgecolors="lime", linewidths=1.2, label="true")
    axis.scatter(predicted[:, 0] * (width - 1), predicted[:, 1] * (height - 1), s=22, c="red",
                 marker="x", linewidths=1.2, label="predicted")
  axes.flat[0].legend(fontsize=7, loc="lower left")
  figure.suptitle("test keypoints: true (green circles) vs predicted (red crosses)", fontsize=9)
  return figure_png(figure)


def _probe_layers(base) -> list[Any]:
  """Up to three conv-block outputs of a backbone at increasing depth (after their ReLU)."""
  import keras
  candidates = []
  for layer in base.layers:
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    if shape is None or len(shape) != 4:
      continue
    activated = isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)) or (
        isinstance(layer, keras.layers.Conv2D)
        and getattr(layer, "activation", None) is not keras.activations.linear)
    if activated:
      candidates.append(layer)
  if len(candidates) <= ACTIVATION_LAYERS:
    return candidates
  picks = np.linspace(0, len(candidates) - 1, ACTIVATION_LAYERS).round().astype(int)
  return [candidates[i] for i in picks]


def _probe(model, images: Sequence[np.ndarray],
           input_size: int) -> tuple[list[Any], list[np.ndarray]]:
  """`(layers, [N, H, W, C] activations)` at up to three depths of `model` for `images`.

  A nested base model (the extractor's frozen application) is probed directly after the
  extractor's own preprocessing layers.
  """
  import keras
  nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
  base = nested[0] if nested else model
  before = []
  if nested:
    for layer in model.layers[1:]:
      if layer is base:
        break
      before.append(layer)
  picked = _probe_layers(base)
  if not picked:
    return [], []
  probe = keras.Model(base.inputs, [layer.output for layer in picked])
  x = tf.image.resize(np.stack(images).astype(np.float32), (input_size, input_size))
  for layer in before:
    x = layer(x)
  outputs = probe(x, training=False)
  return picked, [np.asarray(o, np.float32) for o in (outputs if isinstance(outputs, list)
                                                      else [outputs])]


def activation_maps(model, images: Sequence[np.ndarray], input_size: int,
                    title: str) -> bytes | None:
  """A few channels from three depths of `model` (an extractor or a scratch CNN) per image.

  `model` takes float32 images in [0, 255]. For each probed layer the channels whose
  activations vary most over the shown images are drawn.
  """
  if not images:
    return None
  picked, outputs = _probe(model, images, input_size)
  if not picked:
    return None
  columns = 1 + len(picked) * ACTIVATION_CHANNELS
  figure, axes = plt.subplots(len(images), columns, figsize=(1.15 * columns, 1.3 * len(images)),
                              squeeze=False)
  for axis in axes.flat:
    axis.axis("off")
  for row, image in enumerate(images):
    axes[row, 0].imshow(image)
    if row == 0:
      axes[row, 0].set_title("image", fontsize=7)
  for index, (layer, values) in enumerate(zip(picked, outputs)):
    # The most varied channels: a channel stuck at 0 (or at ReLU6's 6) shows nothing.
    channels = np.argsort(-values.std(axis=(0, 1, 2)))[:ACTIVATION_CHANNELS]
    for c_index, channel in enumerate(channels):
      column = 1 + index * ACTIVATION_CHANNELS + c_index
      for row in range(len(images)):
        axes[row, column].imshow(values[row, :, :, channel], cmap="viridis")
        if row == 0:
          axes[row, column].set_title(f"{layer.name}\n#{channel} "
                                      f"{values.shape[1]}x{values.shape[2]}", fontsize=6)
  figure.suptitle(title, fontsize=9)
  return figure_png(figure)


def run_activation_maps(run: runs.RunDir, run_config: Mapping[str, Any],
                        images: Sequence[np.ndarray]) -> tuple[bytes | None, str]:
  """Activation maps of a run's backbone (its own CNN for scratch runs), or (None, why not)."""
  import keras
  if not images:
    return None, "no test images could be joined, so no activation maps"
  if run_config.get("dataset_kind") == "images":
    model = keras.models.load_model(run.head_path, compile=False)
    return activation_maps(model, images, int(model.input_shape[1]),
                           "activation maps of the from-scratch CNN"), ""
  from features import backbones
  features_dir = run_config["features"]
  manifest = datasets.read_manifest(features_dir)
  try:
    model = backbones.load_backbone_for_features(features_dir, manifest)
  except (ValueError, OSError) as error:
    return None, f"backbone could not be rebuilt for activation maps: {error}"
  weights = manifest.get("weights_kind")
  label = "random init" if weights == "none" else weights
  return activation_maps(model, images, int(manifest["input_size"]),
                         f"activation maps of the frozen {manifest['backbone']} ({label} "
                         "weights): top channels at three depths"), ""
