"""Export: frozen backbone + trained head in one `model.keras` that takes stored-size images.

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head conv --out runs/x
    # -> runs/x/model.keras; keras.models.load_model("runs/x/model.keras") works on its own

The exported model maps `[N, S, S, 3]` stored images in [0, 255] (S = the image dataset's
`image_size`, decoded by `contracts.pixels.decode`) to the head's outputs: the resize to the
backbone's input size with the very layer extraction ran (`contracts.pixels.resize_layers`),
backbone preprocessing and the frozen backbone (from `features.backbones.
load_backbone_for_features`, so the very same weights, random ones included), global average
pooling for pooled-vector heads, then the head. The same path the features took, so the model
reproduces the run's test predictions.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import keras
import numpy as np

from contracts import pixels
from heads import zoo
from heads.reader import DatasetSpec


class ExportUnavailable(RuntimeError):
  """The backbone cannot be rebuilt here (stage 2's loader is missing or failed)."""


def _backbone(spec: DatasetSpec) -> keras.Model:
  try:
    from features import backbones
  except ImportError as error:
    raise ExportUnavailable(f"features.backbones is not importable ({error})") from error
  loader = getattr(backbones, "load_backbone_for_features", None)
  if loader is None:
    raise ExportUnavailable("features.backbones has no load_backbone_for_features")
  try:
    backbone = loader(spec.data_dir, spec.manifest)
  except (KeyError, ValueError, OSError) as error:
    # The run's metrics are still worth keeping; the caller records why there is no model.keras.
    raise ExportUnavailable(f"cannot rebuild backbone {spec.backbone!r} of {spec.data_dir!r}: "
                            f"{type(error).__name__}: {error}") from error
  backbone.trainable = False
  return backbone


def assemble(head_model: keras.Model, spec: DatasetSpec, *, head: str) -> keras.Model:
  """Builds the raw-image model: [resize] -> backbone -> [pool] -> head.

  Args:
    head_model: the trained head.
    spec: the dataset the head was trained on.
    head: the head's name (decides pooling).

  Raises:
    ExportUnavailable: the backbone cannot be rebuilt.
  """
  if spec.kind == "images":
    return head_model   # --head scratch already reads stored images
  image_size = int(spec.manifest.get("image_size") or spec.manifest["input_size"])
  input_size = int(spec.manifest["input_size"])
  if str(spec.manifest.get("input_resize", "")).startswith("cv2_"):
    raise ExportUnavailable(f"{spec.data_dir!r} was extracted with OpenCV's resize by an older "
                            "headstart; extract it again to export a model that sees its pixels")
  backbone = _backbone(spec)
  images = keras.Input((image_size, image_size, 3), name="image")
  x = images
  for layer in pixels.resize_layers(image_size=image_size, input_size=input_size):
    x = layer(x)
  x = backbone(x, training=False)
  if zoo.input_kind(head) == "pooled":
    # Stage 2's pooled vector is the feature map's global average (features/forward.py).
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = head_model(x, training=False)
  return keras.Model(images, outputs, name=f"{spec.backbone}_{head}")


def export_model(head_model: keras.Model, spec: DatasetSpec, path: str, *, head: str) -> None:
  """Assembles and saves `model.keras` (see `assemble`)."""
  assemble(head_model, spec, head=head).save(path)


def predictions_csv(ids: Sequence, outputs: np.ndarray, *, task: str,
                    class_names: Sequence[str], num_keypoints: int = 0,
                    extra: dict[str, Sequence] | None = None) -> str:
  """CSV text: `id,label,prob_<class>...` (classification) or `id,x0,y0,...` (keypoints).

  Keypoint columns are normalised [0, 1] stored-image coordinates, like the dataset's targets.
  `extra` adds columns after `id` (e.g. `source` in `headstart predict`).
  """
  extra = extra or {}
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  outputs = np.asarray(outputs, np.float64)
  if task == "keypoints":
    header = [f"{axis}{index}" for index in range(num_keypoints) for axis in ("x", "y")]
  else:
    header = ["label", *(f"prob_{name}" for name in class_names)]
  writer.writerow(["id", *extra, *header])
  for row, identifier in enumerate(ids):
    identifier = identifier.decode() if isinstance(identifier, bytes) else str(identifier)
    values = [extra[key][row] for key in extra]
    if task == "keypoints":
      writer.writerow([identifier, *values, *(f"{v:.6f}" for v in outputs[row].reshape(-1))])
      continue
    if task == "binary":
      probs = np.array([1.0 - outputs[row].reshape(-1)[0], outputs[row].reshape(-1)[0]])
    else:
      probs = outputs[row]
    writer.writerow([identifier, *values, class_names[int(np.argmax(probs))],
                     *(f"{p:.6f}" for p in probs)])
  return buffer.getvalue()
