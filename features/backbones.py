"""Backbone registry: frozen `keras.applications` models (or a user's `.keras` / SavedModel) as
feature extractors that take float32 RGB images in [0, 255] and carry their preprocessing inside.

    headstart weights list          # every registered backbone and where its weights come from

The registry itself is plain data (no Keras import), so the cache check in `headstart extract`
can run before TensorFlow's model code is loaded. Building a model imports Keras lazily.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

PREPROCESS_MODES = ("caffe", "tf", "none")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# Channel means of Keras' "caffe" mode, in BGR order (keras.applications.imagenet_utils).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/"
CALIBRATION_IMAGES = 4  # BatchNorm stats per channel: 4 x H x W samples is plenty


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """One registered backbone.

  Attributes:
    name: registry name used on the command line (`vgg16`).
    application: attribute of `keras.applications` that builds it.
    preprocess: `caffe` (RGB->BGR, minus ImageNet means), `tf` (x / 127.5 - 1) or `none` (the
      model rescales internally, e.g. EfficientNet).
    min_size: smallest square input Keras accepts with `include_top=False`.
    keras_file: file name Keras downloads for `weights="imagenet", include_top=False`; `{rows}`
      is replaced by the input size when `keras_rows` lists it, else 224 (as Keras does).
    keras_origin: URL folder Keras downloads `keras_file` from.
    keras_md5: the hash Keras checks after a download (None where Keras checks none).
    keras_rows: input sizes that have their own ImageNet weight file.
    shipped_file: weights file shipped in `features/weights/`, if any.
  """
  name: str
  application: str
  preprocess: str
  min_size: int
  keras_file: str
  keras_origin: str
  keras_md5: str | None = None
  keras_rows: tuple[int, ...] = ()
  shipped_file: str | None = None

  def keras_file_name(self, input_size: int) -> str:
    """The file name Keras itself would cache for this input size."""
    rows = input_size if input_size in self.keras_rows else 224
    return self.keras_file.format(rows=rows)

  def keras_url(self, input_size: int) -> str:
    """Where Keras downloads the ImageNet weights for this input size."""
    return self.keras_origin + self.keras_file_name(input_size)


BACKBONES: Mapping[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("vgg16", "VGG16", "caffe", 32,
                 "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", _KERAS_ORIGIN + "vgg16/",
                 "6d6bbae143d832006294945121d1f1fc"),
    BackboneSpec("vgg19", "VGG19", "caffe", 32,
                 "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", _KERAS_ORIGIN + "vgg19/",
                 "253f8cb515780f3b799900260a226db6"),
    BackboneSpec("resnet50", "ResNet50", "caffe", 32,
                 "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", _KERAS_ORIGIN + "resnet/",
                 "4d473c1dd8becc155b73f8504c6f6626"),
    BackboneSpec("inception_v3", "InceptionV3", "tf", 75,
                 "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 _KERAS_ORIGIN + "inception_v3/", "bcbd6486424b2319ff4ef7d526e38f63"),
    BackboneSpec("mobilenet", "MobileNet", "tf", 32, "mobilenet_1_0_{rows}_tf_no_top.h5",
                 _KERAS_ORIGIN + "mobilenet/", None, (128, 160, 192, 224),
                 shipped_file="mobilenet_1_0_224_imagenet_notop.weights.h5"),
    BackboneSpec("mobilenet_v2", "MobileNetV2", "tf", 32,
                 "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5",
                 _KERAS_ORIGIN + "mobilenet_v2/", None, (96, 128, 160, 192, 224)),
    BackboneSpec("efficientnet_b0", "EfficientNetB0", "none", 32, "efficientnetb0_notop.h5",
                 "https://storage.googleapis.com/keras-applications/",
                 "50bc09e76180e00e4465e1a485ddc09d"),
)}


def is_custom_model(entry: str) -> bool:
  """True when a `--backbones` entry is a user's model file or SavedModel dir (not a name)."""
  return entry.endswith(".keras") or "/" in entry or entry.endswith(".h5")


def custom_model_name(path: str) -> str:
  """Backbone name for a user's model: its file stem, lower-case, safe in a directory name."""
  stem = path.rstrip("/").rsplit("/", 1)[-1]
  stem = re.sub(r"\.(keras|h5)$", "", stem)
  return re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_") or "custom"


def parse_backbones(text: str) -> list[str]:
  """Splits and validates `--backbones`; returns registry names and model paths in order.

  Raises:
    ValueError: an entry is neither a registered backbone nor a model path, or is repeated.
  """
  entries = [part.strip() for part in text.split(",") if part.strip()]
  if not entries:
    raise ValueError(f"--backbones {text!r} names no backbone; allowed: {', '.join(BACKBONES)} "
                     "or a path to a .keras file / SavedModel directory")
  for entry in entries:
    if entry not in BACKBONES and not is_custom_model(entry):
      raise ValueError(f"unknown backbone {entry!r}; allowed: {', '.join(BACKBONES)} "
                       "or a path to a .keras file / SavedModel directory")
  if len(set(entries)) != len(entries):
    raise ValueError(f"--backbones {text!r} repeats a backbone")
  return entries


# ---------------------------------------------------------------------------------------------
# Building models (imports Keras)


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
  """Builds layers under a Keras dtype policy, restoring the global one afterwards.

  Raises:
    ValueError: unknown precision.
  """
  if precision not in PRECISIONS:
    raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
  import keras
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy(precision)
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


def preprocess_layers(mode: str) -> list[Any]:
  """Keras' `preprocess_input` for `mode`, as built-in float32 layers.

  Built-in layers only (no Lambda, no custom class), so a saved backbone+head `.keras` file
  loads anywhere without `custom_objects`. Caffe mode's RGB->BGR swap and mean subtraction is
  a frozen 1x1 convolution with a permutation kernel, which is exact in float32.

  Raises:
    ValueError: unknown mode.
  """
  import keras
  import numpy as np
  if mode == "none":
    return []
  if mode == "tf":
    return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32", name="preprocess_tf")]
  if mode == "caffe":
    conv = keras.layers.Conv2D(3, 1, trainable=False, dtype="float32", name="preprocess_caffe")
    conv.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for out_channel, in_channel in enumerate((2, 1, 0)):
      kernel[0, 0, in_channel, out_channel] = 1.0
    conv.set_weights([kernel, -np.asarray(_CAFFE_MEAN_BGR, np.float32)])
    return [conv]
  raise ValueError(f"unknown preprocess mode {mode!r}; allowed: {', '.join(PREPROCESS_MODES)}")


def build_base(backbone: str, input_size: int, *, weights_file: str | None = None,
               seed: int | None = None, precision: str = "float32") -> Any:
  """Builds a registered application with `include_top=False` (no preprocessing, no truncation).

  Args:
    backbone: registry name.
    input_size: square input side in pixels.
    weights_file: local weights file loaded into the model (`.weights.h5` or Keras' legacy
      `.h5`); None leaves the random initialisation.
    seed: seeds the random initialisation (`--weights none`), so a rebuild is identical; the
      BatchNorm statistics are then calibrated (see `calibrate_batchnorm`).
    precision: Keras dtype policy the layers are built with.

  Raises:
    ValueError: unknown backbone or an input size below its minimum.
  """
  import keras
  spec = BACKBONES.get(backbone)
  if spec is None:
    raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
  if input_size < spec.min_size:
    raise ValueError(f"--input-size {input_size!r} is too small for {backbone}; "
                     f"it needs at least {spec.min_size}")
  if seed is not None:
    keras.utils.set_random_seed(seed)
  with dtype_policy(precision):
    base = getattr(keras.applications, spec.application)(
        include_top=False, weights=None, input_shape=(input_size, input_size, 3))
    if weights_file:
      base.load_weights(weights_file)
    elif seed is not None:
      calibrate_batchnorm(base, spec.preprocess, input_size, seed)
  base.trainable = False
  return base


def calibrate_batchnorm(base: Any, preprocess: str, input_size: int, seed: int) -> None:
  """Sets every BatchNorm's moving mean/variance from one pass over seeded noise images.

  Freshly initialised BatchNorm (mean 0, variance 1) lets activations shrink layer after layer:
  random MobileNetV2 ends at ~1e-12, which float16 maps store as all zeros. One training-mode
  pass with momentum 0 over uniform-noise images (no data involved, same seed -> same numbers)
  gives O(1) activations, so random weights are a usable baseline. Models without BatchNorm
  (VGG) are unchanged.
  """
  import keras
  import numpy as np
  norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
  if not norms:
    return
  images = np.random.default_rng(seed).uniform(
      0, 255, (CALIBRATION_IMAGES, input_size, input_size, 3)).astype(np.float32)
  for layer in preprocess_layers(preprocess):
    images = layer(images)
  momenta = [layer.momentum for layer in norms]
  for layer in norms:
    layer.momentum = 0.0
  base.trainable = True  # frozen BatchNorm ignores training=True in Keras 3
  base(images, training=True)
  for layer, momentum in zip(norms, momenta):
    layer.momentum = momentum


def load_user_model(path: str, precision: str = "float32") -> Any:
  """Loads a user's `.keras` file or SavedModel directory (read through a local copy if remote).

  Raises:
    ValueError: the path does not exist.
  """
  import keras
  import tensorflow as tf
  from features import weights as weights_lib
  if not tf.io.gfile.exists(path):
    raise ValueError(f"backbone model {path!r} does not exist; pass a .keras file or a "
                     "SavedModel directory")
  with dtype_policy(precision):
    if tf.io.gfile.isdir(path):
      # Keras 3 reads SavedModels only as an inference layer; wrap it so it behaves as a model.
      local = weights_lib.local_copy(path)
      layer = keras.layers.TFSMLayer(local, call_endpoint="serving_default")
      return layer
    model = keras.models.load_model(weights_lib.local_copy(path), compile=False)
  model.trainable = False
  return model


def user_model_input_size(model: Any) -> int | None:
  """The fixed square input side of a user's model, or None when it takes any size."""
  shape = getattr(model, "input_shape", None)
  if isinstance(shape, list):
    shape = shape[0]
  if not shape or len(shape) != 4 or shape[1] is None:
    return None
  return int(shape[1])


def build_extractor(backbone: str, *, input_size: int, layer: str | None = None,
                    weights_file: str | None = None, seed: int | None = None,
                    model_path: str | None = None, preprocess: str | None = None,
                    precision: str = "float32") -> Any:
  """Builds the frozen extraction model: float32 images in [0, 255] -> feature map.

  Args:
    backbone: registry name, or the name given to a user's model.
    input_size: square input side.
    layer: output layer name; None keeps the model's last layer (the last conv block).
    weights_file: local weights file for a registered backbone (None: random init).
    seed: seed of the random initialisation when `weights_file` is None.
    model_path: a user's `.keras` file or SavedModel dir (then `backbone` is only a name).
    preprocess: overrides the registry's preprocess mode (user models default to `none`).
    precision: `float32`, `mixed_float16` or `mixed_bfloat16` for the backbone's layers; the
      preprocessing stays float32.

  Returns:
    A `keras.Model` with input `(None, input_size, input_size, 3)`, called with training=False.

  Raises:
    ValueError: unknown backbone or layer, or input size too small.
  """
  import keras
  if model_path:
    base = load_user_model(model_path, precision)
    mode = preprocess or "none"
  else:
    base = build_base(backbone, input_size, weights_file=weights_file, seed=seed,
                      precision=precision)
    mode = preprocess or BACKBONES[backbone].preprocess
  if layer:
    if not hasattr(base, "get_layer"):
      raise ValueError(f"--layer {layer!r} cannot be used with a SavedModel backbone")
    names = [l.name for l in base.layers]
    if layer not in names:
      raise ValueError(f"{backbone} has no layer {layer!r}; some of its layers: "
                       f"{', '.join(names[-8:])} (all {len(names)} via model.summary())")
    base = keras.Model(base.inputs, base.get_layer(layer).output, name=f"{backbone}_to_{layer}")
  inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="image")
  x = inputs
  for preprocess_layer in preprocess_layers(mode):
    x = preprocess_layer(x)
  x = base(x, training=False)
  if isinstance(x, dict):  # a SavedModel signature returns a dict of outputs
    x = next(iter(x.values()))
  return keras.Model(inputs, x, name=f"{backbone}_features")


def load_backbone_for_features(feature_dir: str, manifest: Mapping[str, Any]) -> Any:
  """Rebuilds the exact model a feature dataset was extracted with.

  Args:
    feature_dir: the feature dataset directory (holds the random weights for `--weights none`).
    manifest: its `manifest.json`.

  Returns:
    A `keras.Model`: float32 images `(None, input_size, input_size, 3)` in [0, 255] -> the
    feature map (preprocessing inside).
  """
  from features import weights as weights_lib
  model_path = manifest.get("model_path")
  weights_file = None
  if manifest["weights_kind"] == "none":
    weights_file = weights_lib.local_copy(
        f"{feature_dir.rstrip('/')}/{manifest['backbone_weights_file']}")
  elif not model_path:
    weights_file = weights_lib.localize(weights_lib.WeightsChoice.from_manifest(manifest),
                                        backbone=manifest["backbone"],
                                        input_size=int(manifest["input_size"]))
  return build_extractor(manifest["backbone"], input_size=int(manifest["input_size"]),
                         layer=manifest.get("layer") or None, weights_file=weights_file,
                         model_path=model_path, preprocess=manifest["preprocess"])
