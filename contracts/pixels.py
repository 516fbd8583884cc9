"""Stored image -> model input: the one path every stage and the exported model take.

    image = pixels.decode(encoded)                         # uint8 [S, S, 3], as stored
    layers = pixels.resize_layers(image_size=300, input_size=224)   # [] when the sizes match
    x = pixels.to_input(images_uint8, input_size=224)     # float32 [B, 224, 224, 3] in [0, 255]

Extract computes features from exactly these pixels, the `scratch` head and fine-tuning train
on them, `headstart predict` feeds them to the exported model, and the exported model resizes
with the same layer, so a prediction sees the pixels its features were computed from.

`decode` is TensorFlow's JPEG decoder with libjpeg's accurate integer DCT (the pixels OpenCV's
default decode gives, bit for bit: measured on the sample data) or its PNG decoder; the resize
to a backbone's input size is `tf.image.resize` (area when shrinking, bilinear when enlarging),
as the Keras `Resizing` layer does it.
"""
from __future__ import annotations

import tensorflow as tf

RESIZE_NAMES = {"none": "none", "area": "tf_area", "bilinear": "tf_bilinear"}


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Stored JPEG/PNG bytes (a scalar string tensor or bytes) -> uint8 `[H, W, 3]`."""
  encoded = tf.convert_to_tensor(encoded, tf.string)
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_png(encoded, channels=3))


def interpolation(image_size: int, input_size: int) -> str:
  """`none`, `area` (shrinking: no aliasing) or `bilinear` (enlarging)."""
  if not image_size or image_size == input_size:
    return "none"
  return "area" if input_size < image_size else "bilinear"


def resize_name(image_size: int, input_size: int) -> str:
  """The resize's name in a feature dataset's cache key."""
  return RESIZE_NAMES[interpolation(image_size, input_size)]


def resize_layers(*, image_size: int, input_size: int) -> list:
  """Keras layers taking `[B, S, S, 3]` images to `[B, I, I, 3]` float32 ([] when S == I)."""
  import keras

  method = interpolation(image_size, input_size)
  if method == "none":
    return []
  return [keras.layers.Resizing(input_size, input_size, interpolation=method,
                                name=f"stored_to_input_{method}")]


def to_input(images: tf.Tensor, input_size: int) -> tf.Tensor:
  """uint8 or float `[B, S, S, 3]` -> float32 `[B, I, I, 3]` in [0, 255] (the layers' math)."""
  images = tf.cast(images, tf.float32)
  method = interpolation(int(images.shape[1] or 0), input_size)
  if method == "none":
    return images
  return tf.image.resize(images, (input_size, input_size), method=method)
