"""Per-record logic of stage 2, without Beam: image Example in, feature Example out.

    headstart extract --images out/images --out out/features --backbones vgg16

Image records follow docs/CONTRACTS.md (`id`, encoded `image`, `label` or `targets`); feature
records carry `id`, the same `label`/`targets`, `view`, `feature_map` (float16 raw bytes) and
`pooled` (float32 raw bytes), never FloatLists for big tensors.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from contracts import layout, pixels
from contracts import schema as schema_lib

STORE_CHOICES = layout.STORE_CHOICES


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
  image: np.ndarray  # uint8 (S, S, 3) RGB at the stored size (the forward resizes)
  label: int | None = None
  targets: np.ndarray | None = None  # float32 (K, 2) in [0, 1]


def parse_image_example(serialized: bytes, image_schema: schema_lib.Schema) -> dict[str, Any]:
  """Reads the fields stage 2 needs from a serialized image Example.

  Returns:
    `id` (str), `image` (encoded bytes), `label` (int or None), `targets` ((K, 2) float32 or None).

  Raises:
    RecordError: not an Example, or no `id` / `image` (reason `schema_mismatch`).
  """
  keys = [key for key in ("id", "image", "label", "targets") if key in image_schema.names]
  try:
    fields = image_schema.decode(serialized, keys)
  except ValueError as error:
    raise RecordError("schema_mismatch", f"image record: {error}") from error
  return {"label": None, "targets": None, **fields}


def decode_stored(data: bytes, image_size: int | None = None) -> np.ndarray:
  """Stored JPEG/PNG bytes -> uint8 RGB `[S, S, 3]`, by `contracts.pixels.decode` (the one
  decoder of a stored image: the exported model and every head see these very pixels). The
  resize to the backbone's input size happens inside the compiled forward (`features.forward`).

  Args:
    data: the stored image bytes.
    image_size: the dataset's stored side; an image of another size is a broken record.

  Raises:
    RecordError: undecodable bytes (`undecodable`) or a stored size that contradicts the
      dataset (`schema_mismatch`).
  """
  import tensorflow as tf
  try:
    image = pixels.decode(data).numpy()
  except tf.errors.InvalidArgumentError:
    raise RecordError("undecodable",
                      f"stored image of {len(data)} bytes cannot be decoded") from None
  height, width = image.shape[:2]
  if image_size and (height, width) != (image_size, image_size):
    raise RecordError("schema_mismatch", f"stored image is {width}x{height}, the dataset says "
                      f"{image_size}x{image_size}")
  return image


def encode_feature_record(schema: schema_lib.Schema, record: ImageRecord,
                          feature_map: np.ndarray, pooled: np.ndarray) -> bytes:
  """One feature Example: id, label/targets, view, float16 map and/or float32 pooled as bytes
  (whichever of the two the job's schema stores)."""
  values: dict[str, Any] = {"id": record.id, "view": int(record.view)}
  if record.label is not None:
    values["label"] = int(record.label)
  if record.targets is not None:
    values["targets"] = record.targets
  if "feature_map" in schema.names:
    values["feature_map"] = feature_map
  if "pooled" in schema.names:
    values["pooled"] = pooled
  return schema.encode(values)
