"""The head zoo: small Keras functional models built from a dataset's feature spec.

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head conv --out runs/x

| head      | reads          | layers                                                          |
|-----------|----------------|-----------------------------------------------------------------|
| linear    | pooled vector  | output                                                          |
| mlp       | pooled vector  | Dense(hidden) -> Dropout -> output                              |
| gap_dense | feature map    | GAP -> Dense(128) -> output                                     |
| conv      | feature map    | Conv2D 512 3x3 same -> MaxPool -> Flatten -> Dense 512 -> Dropout -> output |
| conv2     | feature map    | two conv blocks (as used on ResNet50 maps), then as conv         |
| keypoints | feature map    | Conv2D -> Flatten -> Dense -> Dropout -> 2K linear (MAE)        |
| ridge     | feature map    | Flatten -> output, solved in closed form (`heads.ridge`)        |
| ridge_pooled | pooled vector | output, solved in closed form (`heads.ridge`)                 |
| scratch   | stored images  | small CNN trained from pixels, to show what transfer buys       |

The task picks the output: binary -> Dense(1, sigmoid), multiclass -> Dense(K, softmax),
keypoints -> Dense(2K) linear regression of normalised (x, y) pairs.
"""
from __future__ import annotations

import keras
import numpy as np

from heads.config import HeadConfig
from heads.reader import DatasetSpec

HEAD_INPUTS = {
    "linear": "pooled", "mlp": "pooled", "gap_dense": "map", "conv": "map", "conv2": "map",
    "keypoints": "map", "ridge": "map", "ridge_pooled": "pooled", "scratch": "image",
}
HEADS = tuple(HEAD_INPUTS)


def input_kind(head: str) -> str:
  """`pooled`, `map` or `image`: what the head reads.

  Raises:
    ValueError: unknown head name.
  """
  if head not in HEAD_INPUTS:
    raise ValueError(f"unknown head {head!r}; allowed: {', '.join(HEADS)}")
  return HEAD_INPUTS[head]


def input_shape(head: str, spec: DatasetSpec) -> tuple[int, ...]:
  """Shape of one input example of `head` on `spec`."""
  kind = input_kind(head)
  if kind == "pooled":
    return (spec.pooled_dim,)
  if kind == "map":
    return tuple(spec.feature_map_shape)
  return (spec.image_size, spec.image_size, 3)


def loss_for(task: str) -> str:
  """Keras loss name for a task."""
  return {"binary": "binary_crossentropy", "multiclass": "sparse_categorical_crossentropy",
          "keypoints": "mean_absolute_error"}[task]


def _output(x, spec: DatasetSpec, config: HeadConfig, target_mean: np.ndarray | None):
  activation = {"binary": "sigmoid", "multiclass": "softmax", "keypoints": None}[spec.task]
  regularizer = keras.regularizers.L2(config.l2) if config.l2 > 0 else None
  initializers = {}
  if target_mean is not None:
    # Regression starts at the mean training target with a zero kernel: with the MAE loss's
    # constant-size gradients, a random start on unnormalised features (pooled values up to ~6
    # over 1024 channels) leaves Adam oscillating far from the targets for hundreds of steps.
    initializers = {"kernel_initializer": "zeros",
                    "bias_initializer": keras.initializers.Constant(
                        np.asarray(target_mean, np.float32).reshape(-1))}
  # float32 output: stable losses even if a mixed-precision policy is active.
  return keras.layers.Dense(spec.num_outputs, activation=activation,
                            kernel_regularizer=regularizer, dtype="float32", name="output",
                            **initializers)(x)


def _conv_block(x, filters: int, name: str):
  x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv")(x)
  # Pooling a 1x1 map is impossible; small maps keep their full resolution.
  if x.shape[1] >= 2 and x.shape[2] >= 2:
    x = keras.layers.MaxPooling2D(2, name=f"{name}_pool")(x)
  return x


def _dense_dropout(x, config: HeadConfig):
  x = keras.layers.Flatten(name="flatten")(x)
  x = keras.layers.Dense(config.dense_units, activation="relu", name="dense")(x)
  return keras.layers.Dropout(config.dropout, name="dropout")(x)


def _check_fits(head: str, kind: str, spec: DatasetSpec) -> None:
  """Raises ValueError when `head` (reading `kind` inputs) does not fit `spec`."""
  if head == "keypoints" and spec.task != "keypoints":
    raise ValueError(f"head 'keypoints' needs a keypoints dataset, {spec.data_dir!r} is "
                     f"{spec.task!r}")
  if kind == "image" and spec.image_size is None:
    raise ValueError(f"head 'scratch' needs an image dataset with image_size; {spec.data_dir!r} "
                     "has none")
  if kind == "map" and spec.feature_map_shape is None:
    raise ValueError(f"head {head!r} reads the feature map, but {spec.data_dir!r} stores none")
  if kind == "pooled" and spec.pooled_dim is None:
    raise ValueError(f"head {head!r} reads the pooled vector, but {spec.data_dir!r} stores none")


def build_head(head: str, spec: DatasetSpec, config: HeadConfig = HeadConfig(), *,
               target_mean: np.ndarray | None = None,
               input_stats: tuple[np.ndarray, np.ndarray] | None = None,
               linear_start: tuple[np.ndarray, np.ndarray] | None = None) -> keras.Model:
  """Builds an uncompiled head for `spec`'s task and input shape.

  Args:
    head: one of `HEADS`.
    spec: the dataset the head trains on.
    config: layer sizes and dropout.
    target_mean: keypoints only: `[2K]` mean training targets, the output layer's starting
      point (zero kernel, bias = mean).
    input_stats: pooled heads: (mean, variance) of the training features. The head then
      standardises its input first, as linear probes do: pooled backbone features have
      arbitrary per-channel scales, and a probe on them trains erratically (test accuracy
      0.47-0.76 over three seeds on the sample before, steady after).
    linear_start: keypoints only: `(kernel [D, 2K], bias [2K])` of a ridge fit on the
      flattened map. The head then adds its own path, starting at zero, to that frozen fit.

  Returns:
    A functional `keras.Model` named `head_<name>`.

  Raises:
    ValueError: unknown head, or a head that does not fit the dataset (e.g. `keypoints` on a
      classification dataset, a map head on pooled-only features).
  """
  kind = input_kind(head)
  _check_fits(head, kind, spec)
  inputs = keras.Input(input_shape(head, spec), name="features" if kind != "image" else "image")
  x = inputs
  if kind == "pooled" and input_stats is not None:
    x = keras.layers.Normalization(mean=input_stats[0], variance=input_stats[1],
                                   name="standardize")(x)
  x = _body(head, x, config)
  if linear_start is None:
    return keras.Model(inputs, _output(x, spec, config, target_mean), name=f"head_{head}")
  # A frozen linear path holding the ridge fit, plus the head's own path as a correction that
  # starts at zero: the head starts exactly at the ridge fit (see `heads.ridge.linear_start`).
  correction = _output(x, spec, config, np.zeros(spec.num_outputs, np.float32))
  start = keras.layers.Dense(spec.num_outputs, trainable=False, dtype="float32",
                             name="ridge_start")
  linear = start(keras.layers.Flatten(name="ridge_flatten")(inputs))
  start.set_weights([np.asarray(w, np.float32) for w in linear_start])
  outputs = keras.layers.Add(dtype="float32", name="start_plus_correction")([linear, correction])
  return keras.Model(inputs, outputs, name=f"head_{head}")


def _body(head: str, x, config: HeadConfig):
  """The head's layers between its (standardised) input and its output layer."""
  if head == "mlp":
    x = keras.layers.Dense(config.hidden_units, activation="relu", name="hidden")(x)
    x = keras.layers.Dropout(config.dropout, name="dropout")(x)
  elif head == "gap_dense":
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(config.gap_units, activation="relu", name="dense")(x)
  elif head == "conv":
    x = _dense_dropout(_conv_block(x, config.conv_filters, "block1"), config)
  elif head == "conv2":
    x = _conv_block(x, config.conv_filters, "block1")
    x = _conv_block(x, config.conv2_filters, "block2")
    x = _dense_dropout(x, config)
  elif head == "keypoints":
    # No pooling: the position of activations in the map is the signal.
    x = keras.layers.Conv2D(config.conv2_filters, 3, padding="same", activation="relu",
                            name="block1_conv")(x)
    x = _dense_dropout(x, config)
  elif head == "ridge":
    x = keras.layers.Flatten(name="flatten")(x)
  elif head == "scratch":
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(x)
    for index, filters in enumerate(config.scratch_filters):
      x = _conv_block(x, filters, f"block{index + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(config.dropout, name="dropout")(x)
  return x
