"""The one stored-image -> model-input path (contracts.pixels): extract, the heads that read
images, predict and the exported model all see the same pixels."""
from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from contracts import pixels


def _photo(size: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size]
  image = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1)
  return np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("extension,params", [(".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]),
                                              (".png", [])])
def test_decode_gives_opencvs_pixels(extension, params):
  """The decoder extraction used before this path existed, bit for bit (so features of existing
  datasets at their stored size stay valid)."""
  bgr = _photo(80)
  encoded = cv2.imencode(extension, bgr, params)[1].tobytes()
  expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR),
                          cv2.COLOR_BGR2RGB)
  np.testing.assert_array_equal(pixels.decode(encoded).numpy(), expected)
  mapped = next(iter(tf.data.Dataset.from_tensors(encoded).map(pixels.decode)))
  np.testing.assert_array_equal(mapped.numpy(), expected)


@pytest.mark.parametrize("image_size,input_size,method", [(96, 64, "area"), (64, 96, "bilinear"),
                                                          (50, 37, "area"), (64, 64, "none")])
def test_the_exported_models_resize_layer_is_extractions_resize(image_size, input_size, method):
  images = np.stack([_photo(image_size, seed) for seed in range(3)])
  assert pixels.interpolation(image_size, input_size) == method
  layers = pixels.resize_layers(image_size=image_size, input_size=input_size)
  assert len(layers) == (method != "none")
  inputs = keras.Input((image_size, image_size, 3))
  x = inputs
  for layer in layers:
    x = layer(x)
  exported = keras.Model(inputs, x).predict(images.astype(np.float32), verbose=0)
  extracted = pixels.to_input(tf.constant(images), input_size).numpy()
  assert exported.shape == extracted.shape == (3, input_size, input_size, 3)
  np.testing.assert_allclose(exported, extracted, atol=1e-4)
  assert pixels.resize_name(image_size, input_size) == {"none": "none", "area": "tf_area",
                                                        "bilinear": "tf_bilinear"}[method]
