"""The one record schema of image and feature datasets, and everything derived from it.

    schema = schema_lib.image_schema(image_size=96, image_format="jpeg", class_names=("a", "b"))
    serialized = schema.encode({"id": ..., "image": jpeg_bytes, ...})   # tf.train.Example bytes
    schema.tfds_features()                 # the TFDS FeaturesDict written to features.json
    parse = schema.batch_parser(("pooled", "label"))   # tf.string[N] -> dict of tensors
    schema.decode(serialized, ("id", "image", "label"))  # one record -> Python/NumPy values

A `Field` says what a key holds; TFDS' feature connectors, the Example encoder and the parse
specs of every reader are derived from the same fields, so the wire format cannot drift between
the stage that writes a record and the ones that read it. Big tensors (`encoding="bytes"`) are
stored as raw bytes (TFDS `Tensor(encoding='bytes')`), never as FloatLists.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

KINDS = ("text", "int", "label", "image", "tensor")


@dataclasses.dataclass(frozen=True)
class Field:
  """One record key: its kind and, for tensors, shape, dtype and storage encoding."""
  name: str
  kind: str
  shape: tuple[int, ...] = ()
  dtype: str = ""            # tensors: NumPy dtype name
  raw_bytes: bool = False    # tensors: stored as raw bytes (TFDS encoding='bytes')
  optional: bool = False     # parse default instead of an error when absent (e.g. `view`)
  class_names: tuple[str, ...] = ()
  image_format: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"field {self.name!r} has kind {self.kind!r}; allowed: {', '.join(KINDS)}")

  def tfds_feature(self) -> Any:
    """The TFDS feature connector of this field."""
    import tensorflow_datasets as tfds  # slow import, needed only when writing metadata

    if self.kind == "text":
      return tfds.features.Text()
    if self.kind == "int":
      return tfds.features.Scalar(dtype=np.int64)
    if self.kind == "label":
      return tfds.features.ClassLabel(names=list(self.class_names))
    if self.kind == "image":
      return tfds.features.Image(shape=self.shape, encoding_format=self.image_format)
    return tfds.features.Tensor(shape=self.shape, dtype=np.dtype(self.dtype),
                                encoding="bytes" if self.raw_bytes else "none")

  def parse_feature(self) -> tf.io.FixedLenFeature:
    """The `tf.io.parse_example` spec of this field (before raw bytes are decoded)."""
    if self.kind in ("text", "image") or self.raw_bytes:
      return tf.io.FixedLenFeature([], tf.string)
    if self.kind in ("int", "label"):
      return tf.io.FixedLenFeature([], tf.int64, default_value=0 if self.optional else None)
    return tf.io.FixedLenFeature([int(np.prod(self.shape))], tf.dtypes.as_dtype(self.dtype))

  def fill(self, feature: tf.train.Feature, value: Any) -> None:
    """Writes one value into `feature` as the Example feature TFDS would write for it (in
    place: building each message by its constructor cost ~3x as much per record)."""
    if self.kind in ("text", "image") or self.raw_bytes:
      if self.raw_bytes:
        value = np.ascontiguousarray(value, self.dtype).tobytes()
      elif isinstance(value, str):
        value = value.encode("utf-8")
      if not isinstance(value, bytes):
        raise TypeError(f"record key {self.name!r} needs bytes or str, got "
                        f"{type(value).__name__}")
      feature.bytes_list.value.append(value)
    elif self.kind in ("int", "label"):
      feature.int64_list.value.append(int(value))
    else:
      flat = np.asarray(value, self.dtype).ravel()
      if flat.size != int(np.prod(self.shape)):
        raise ValueError(f"record key {self.name!r} needs shape {self.shape}, got "
                         f"{np.shape(value)}")
      feature.float_list.value.extend(flat.tolist())


@dataclasses.dataclass(frozen=True)
class Schema:
  """The fields of one dataset's records."""
  fields: tuple[Field, ...]

  @functools.cached_property
  def _by_name(self) -> dict[str, Field]:
    return {field.name: field for field in self.fields}

  def __getitem__(self, name: str) -> Field:
    if name in self._by_name:
      return self._by_name[name]
    raise KeyError(f"record key {name!r} is not in this dataset's schema; it has "
                   f"{', '.join(self.names)}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(field.name for field in self.fields)

  def tfds_features(self) -> Any:
    """The TFDS `FeaturesDict` of one record (what `builder_from_directory` decodes)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({f.name: f.tfds_feature() for f in self.fields})

  def encode(self, values: Mapping[str, Any]) -> bytes:
    """A serialized `tf.train.Example` of `values` (keys absent from `values` are left out).

    Raises:
      KeyError: a key the schema does not know.
    """
    fields = [self[key] for key in values]   # every key known before any is written
    example = tf.train.Example()
    features = example.features.feature
    for field, value in zip(fields, values.values()):
      field.fill(features[field.name], value)
    # deterministic=True: the feature map's entries are otherwise written in an order that
    # changes from process to process, so re-ingesting the same images gave other shard bytes,
    # another dataset fingerprint, and a feature-cache miss downstream.
    return example.SerializeToString(deterministic=True)

  def parse_spec(self, keys: Sequence[str]) -> dict[str, tf.io.FixedLenFeature]:
    """`tf.io.parse_example` spec of the given keys."""
    return {key: self[key].parse_feature() for key in keys}

  def batch_parser(self, keys: Sequence[str], *, maps_as: tf.DType = tf.float32):
    """`parse(serialized: tf.string[N]) -> {key: Tensor[N, ...]}` for a batch of records.

    Raw-byte tensors are decoded and reshaped to `[N, *shape]` (float16 maps cast to `maps_as`;
    pass tf.float16 to keep them as stored); other tensors (`targets`) stay flat, `[N, 2K]`,
    as heads read them. Works eagerly and inside `Dataset.map`.
    """
    spec = self.parse_spec(keys)
    fields = [self[key] for key in keys]

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
      parsed = tf.io.parse_example(serialized, spec)
      for field in fields:
        if field.raw_bytes:
          raw = tf.io.decode_raw(parsed[field.name], tf.dtypes.as_dtype(field.dtype))
          tensor = tf.reshape(raw, [-1, *field.shape])
          parsed[field.name] = tensor if tensor.dtype != tf.float16 else tf.cast(tensor, maps_as)
      return parsed

    return parse

  def decode(self, serialized: bytes, keys: Sequence[str]) -> dict[str, Any]:
    """One serialized record -> Python/NumPy values of `keys` (None when an optional key or a
    label/targets key is absent).

    Raises:
      ValueError: the bytes are not an Example, or a required key is missing.
    """
    from google.protobuf.message import DecodeError

    try:
      feature = tf.train.Example.FromString(serialized).features.feature
    except DecodeError as error:
      raise ValueError(f"record is not a tf.train.Example: {error}") from error
    values = {}
    for key in keys:
      field = self[key]
      if key not in feature:
        if field.optional or field.kind == "label" or key == "targets":
          values[key] = None
          continue
        raise ValueError(f"record lacks {key!r} (keys: {sorted(feature)!r})")
      values[key] = _value_of(field, feature[key])
    return values


def _value_of(field: Field, feature: tf.train.Feature) -> Any:
  if field.kind in ("text", "image") or field.raw_bytes:
    data = feature.bytes_list.value[0]
    if field.raw_bytes:
      return np.frombuffer(data, field.dtype).reshape(field.shape)
    return data.decode("utf-8") if field.kind == "text" else data
  if field.kind in ("int", "label"):
    return int(feature.int64_list.value[0])
  return np.asarray(feature.float_list.value, field.dtype).reshape(field.shape)


def _label_and_targets(class_names: Sequence[str] | None, num_keypoints: int) -> list[Field]:
  fields = []
  if class_names:
    fields.append(Field("label", "label", class_names=tuple(class_names)))
  if num_keypoints:
    fields.append(Field("targets", "tensor", (int(num_keypoints), 2), "float32"))
  return fields


def image_schema(*, image_size: int, image_format: str, class_names: Sequence[str] | None,
                 num_keypoints: int) -> Schema:
  """Records of a stage-1 image dataset (docs/CONTRACTS.md)."""
  return Schema((
      Field("id", "text"),
      Field("image", "image", (int(image_size), int(image_size), 3), image_format=image_format),
      Field("source", "text"), Field("group", "text"), Field("content_sha256", "text"),
      Field("height", "int"), Field("width", "int"),
      *_label_and_targets(class_names, num_keypoints)))


def feature_schema(*, class_names: Sequence[str] | None, num_keypoints: int | None,
                   map_shape: Sequence[int] | None, pooled_dim: int | None,
                   store: str = "both") -> Schema:
  """Records of a stage-2 feature dataset: float16 map and/or float32 pooled vector as bytes."""
  fields = [Field("id", "text"), Field("view", "int", optional=True),
            *_label_and_targets(class_names, int(num_keypoints or 0))]
  if store in ("both", "maps") and map_shape:
    fields.append(Field("feature_map", "tensor", tuple(int(d) for d in map_shape), "float16",
                        raw_bytes=True))
  if store in ("both", "pooled") and pooled_dim:
    fields.append(Field("pooled", "tensor", (int(pooled_dim),), "float32", raw_bytes=True))
  return Schema(tuple(fields))


def from_manifest(manifest: Mapping[str, Any]) -> Schema:
  """The schema of a dataset's records, from its manifest.

  Raises:
    ValueError: the manifest's kind is neither images nor features.
  """
  class_names = manifest.get("class_names")
  keypoints = int(manifest.get("num_keypoints") or 0)
  if manifest.get("kind") == "images":
    return image_schema(image_size=int(manifest["image_size"]), image_format=manifest["format"],
                        class_names=class_names, num_keypoints=keypoints)
  if manifest.get("kind") == "features":
    return feature_schema(class_names=class_names, num_keypoints=keypoints,
                          map_shape=manifest.get("feature_map_shape"),
                          pooled_dim=manifest.get("pooled_dim"),
                          store=manifest.get("store", "both"))
  raise ValueError(f"manifest of kind {manifest.get('kind')!r}; expected images or features")
