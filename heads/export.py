"""Export: frozen backbone + trained head in one `model.keras` that takes stored-size images.

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head conv --out runs/x
    # -> runs/x/model.keras; keras.models.load_model("runs/x/model.keras") works on its own

The exported model maps float32 `[N, S, S, 3]` images in [0, 255] (S = the image dataset's
`image_size`, i.e. what `pipeline.image_decode.decode_and_resize` returns) to the head's
outputs: resize to the backbone's input size exactly as extraction did (OpenCV's weights in frozen
built-in layers), backbone preprocessing and the frozen backbone
(all from `features.backbones.load_backbone_for_features`, so the very same weights, random
ones included), global pooling for pooled-vector heads, then the head. The same path the
features took, so the model reproduces the run's test predictions.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import cv2
import keras
import numpy as np

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


# How extraction went from the stored image to the backbone's input (`input_resize` in the
# feature manifest, see features.records.decode_image).
_CV2_INTERPOLATION = {"cv2_area": cv2.INTER_AREA, "cv2_linear": cv2.INTER_LINEAR}
# OpenCV's uint8 bilinear resize uses fixed-point weights with INTER_RESIZE_COEF_BITS = 11.
_CV2_LINEAR_WEIGHT_SCALE = 2048.0


def resize_matrix(size_in: int, size_out: int, interpolation: int) -> np.ndarray:
  """`[size_out, size_in]` weights of OpenCV's resize along one axis.

  OpenCV's area and bilinear resizes are separable linear maps, so resizing an identity image
  along one axis reads the weights off exactly.
  """
  identity = np.eye(size_in, dtype=np.float32)
  return cv2.resize(identity, (size_in, size_out), interpolation=interpolation)


def _rounding_boundaries(half_even: bool) -> list[float]:
  """Bucket edges that round [0, 255] floats to integers (ties up, or to even)."""
  edges = []
  for level in range(255):
    edge = np.float32(level + 0.5)
    if half_even and level % 2 == 0:
      edge = np.nextafter(edge, np.float32(np.inf))   # a tie k + 0.5 stays at the even k
    edges.append(float(edge))
  return edges


def _cv2_resize_layers(size_in: int, size_out: int, input_resize: str | None):
  """Built-in frozen layers that resize like extraction's uint8 OpenCV call.

  Keras' `Resizing` differs from cv2's INTER_AREA by enough to move probabilities by more than
  0.02 (MobileNet features move by ~0.8 for +-0.5 grey levels), so the per-axis weights are
  read off OpenCV and applied with two `EinsumDense` layers, then rounded to integers as
  OpenCV's uint8 output is: ties to even on the general area path, up on the integer-factor
  path (exact for INTER_AREA). INTER_LINEAR's uint8 path is fixed-point (11-bit weights, kept
  here) and matches to within one grey level. Built-in layers only, so the file loads anywhere.
  """
  if input_resize not in _CV2_INTERPOLATION:
    input_resize = "cv2_area" if size_out < size_in else "cv2_linear"
  weights = resize_matrix(size_in, size_out, _CV2_INTERPOLATION[input_resize]).T
  half_even = input_resize == "cv2_area" and size_in % size_out != 0
  if input_resize == "cv2_linear":
    weights = np.round(weights * _CV2_LINEAR_WEIGHT_SCALE) / _CV2_LINEAR_WEIGHT_SCALE
  rows = keras.layers.EinsumDense("bhwc,hy->bywc", output_shape=(size_out, size_in, 3),
                                  trainable=False, name="resize_rows")
  columns = keras.layers.EinsumDense("bywc,wx->byxc", output_shape=(size_out, size_out, 3),
                                     trainable=False, name="resize_columns")
  rounding = keras.layers.Discretization(bin_boundaries=_rounding_boundaries(half_even),
                                         name="round_to_uint8")
  # Discretization yields integer bin indices; Rescaling(1) makes them float32 pixels again.
  to_float = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")

  def apply(x):
    x = rows(x)
    rows.set_weights([weights])
    x = columns(x)
    columns.set_weights([weights])
    return to_float(rounding(x))

  return apply


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
  backbone = _backbone(spec)
  images = keras.Input((image_size, image_size, 3), name="image")
  x = images
  if image_size != input_size:
    x = _cv2_resize_layers(image_size, input_size, spec.manifest.get("input_resize"))(x)
  x = backbone(x, training=False)
  if zoo.input_kind(head) == "pooled":
    pooling = spec.manifest.get("pooling", "avg")
    x = (keras.layers.GlobalMaxPooling2D(name="pool") if pooling == "max"
         else keras.layers.GlobalAveragePooling2D(name="pool"))(x)
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
