"""Per-record logic of stage 2, without Beam: image Example in, feature Example out.

    headstart extract --images out/images --out out/features --backbones vgg16

Image records follow docs/CONTRACTS.md (`id`, encoded `image`, `label` or `targets`); feature
records carry `id`, the same `label`/`targets`, `view`, `feature_map` (float16 raw bytes) and
`pooled` (float32 raw bytes), never FloatLists for big tensors.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline import dataset_io

STORE_CHOICES = ("both", "maps", "pooled")


class RecordError(ValueError):
  """One image record stage 2 cannot use; `reason` is its `errors.jsonl` reason code."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class ImageRecord:
  """One decoded image (or augmented view) on its way to the backbones."""
  id: str
  split: str
  view: int
  image: np.ndarray  # uint8 (input_size, input_size, 3), RGB
  label: int | None = None
  targets: np.ndarray | None = None  # float32 (K, 2) in [0, 1]


def split_of_shard(file_name: str) -> str:
  """`.../images-train.tfrecord-00000-of-00002` -> `train` (TFDS shard naming)."""
  base = file_name.rstrip("/").rsplit("/", 1)[-1]
  return base.split(".tfrecord", 1)[0].rsplit("-", 1)[-1]


def parse_image_example(serialized: bytes) -> dict[str, Any]:
  """Reads the fields stage 2 needs from a serialized image Example.

  Returns:
    `id` (str), `image` (encoded bytes), `label` (int or None), `targets` ((K, 2) float32 or None).

  Raises:
    RecordError: not an Example, or no `id` / `image` (reason `schema_mismatch`).
  """
  import tensorflow as tf
  from google.protobuf.message import DecodeError
  try:
    feature = tf.train.Example.FromString(serialized).features.feature
  except DecodeError as error:
    raise RecordError("schema_mismatch", f"record is not a tf.train.Example: {error}") from error
  if "id" not in feature or "image" not in feature:
    raise RecordError("schema_mismatch",
                      f"image record lacks 'id' or 'image' (keys: {sorted(feature)!r})")
  label = feature["label"].int64_list.value if "label" in feature else []
  targets = feature["targets"].float_list.value if "targets" in feature else []
  return {
      "id": feature["id"].bytes_list.value[0].decode("utf-8"),
      "image": feature["image"].bytes_list.value[0],
      "label": int(label[0]) if len(label) else None,
      "targets": np.asarray(targets, np.float32).reshape(-1, 2) if len(targets) else None,
  }


def decode_image(data: bytes, input_size: int, image_size: int | None = None) -> np.ndarray:
  """Encoded JPEG/PNG -> uint8 RGB (input_size, input_size, 3).

  Stored images are already square at the dataset's image size; a different input size is
  reached with INTER_AREA when shrinking (no aliasing) and INTER_LINEAR when growing.

  Args:
    data: the stored image bytes.
    input_size: square side the backbone sees.
    image_size: the dataset's stored side; an image of another size is a broken record.

  Raises:
    RecordError: undecodable bytes (`undecodable`) or a stored size that contradicts the
      dataset (`schema_mismatch`).
  """
  import cv2
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise RecordError("undecodable", f"stored image of {len(data)} bytes cannot be decoded")
  image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  height, width = image.shape[:2]
  if image_size and (height, width) != (image_size, image_size):
    raise RecordError("schema_mismatch", f"stored image is {width}x{height}, the dataset says "
                      f"{image_size}x{image_size}")
  if (height, width) != (input_size, input_size):
    shrinking = input_size < min(height, width)
    image = cv2.resize(image, (input_size, input_size),
                       interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
  return image


def input_resize_name(image_size: int, input_size: int) -> str:
  """Cache-key name of the stored-image -> input-size resize done by `decode_image`."""
  if image_size == input_size:
    return "none"
  return "cv2_area" if input_size < image_size else "cv2_linear"


def encode_feature_record(record: ImageRecord, feature_map: np.ndarray, pooled: np.ndarray,
                          store: str) -> bytes:
  """One feature Example: id, label/targets, view, float16 map and/or float32 pooled as bytes.

  Raises:
    ValueError: unknown `store`.
  """
  if store not in STORE_CHOICES:
    raise ValueError(f"--store {store!r} is not one of {', '.join(STORE_CHOICES)}")
  values: dict[str, Any] = {"id": record.id, "view": int(record.view)}
  if record.label is not None:
    values["label"] = int(record.label)
  if record.targets is not None:
    values["targets"] = np.asarray(record.targets, np.float32)
  if store in ("both", "maps"):
    values["feature_map"] = np.ascontiguousarray(feature_map, np.float16).tobytes()
  if store in ("both", "pooled"):
    values["pooled"] = np.ascontiguousarray(pooled, np.float32).tobytes()
  return dataset_io.to_example(values)


def feature_tfds_features(*, task: str, class_names: Sequence[str] | None,
                          num_keypoints: int | None, map_shape: Sequence[int], pooled_dim: int,
                          store: str) -> Any:
  """The TFDS `FeaturesDict` of a feature dataset (what `builder_from_directory` decodes)."""
  import tensorflow_datasets as tfds
  spec: dict[str, Any] = {"id": tfds.features.Text(),
                          "view": tfds.features.Scalar(dtype=np.int64)}
  if class_names:
    spec["label"] = tfds.features.ClassLabel(names=list(class_names))
  if task == "keypoints" and num_keypoints:
    spec["targets"] = tfds.features.Tensor(shape=(int(num_keypoints), 2), dtype=np.float32)
  if store in ("both", "maps"):
    spec["feature_map"] = tfds.features.Tensor(shape=tuple(int(d) for d in map_shape),
                                               dtype=np.float16, encoding="bytes")
  if store in ("both", "pooled"):
    spec["pooled"] = tfds.features.Tensor(shape=(int(pooled_dim),), dtype=np.float32,
                                          encoding="bytes")
  return tfds.features.FeaturesDict(spec)
