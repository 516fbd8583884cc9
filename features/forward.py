"""Batched, compiled inference: uint8 image batch -> (float16 feature maps, float32 pooled).

    headstart extract ... --batch-size 64 --jit-compile --precision mixed_bfloat16

One `tf.function` per backbone with a batch-agnostic input signature (traced once); with
`jit_compile=True` XLA compiles it (the caller pads the last batch so one program serves all).
The cast to float32, the model call with training=False, the average pooling, the cast to
float16 for storage and the per-image health sums all run inside the compiled function.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from contracts import pixels
from features import backbones as backbones_lib
from features import health as health_lib
from features import weights as weights_lib


def compile_forward(model: Any, input_size: int, *, image_size: int | None = None,
                    jit_compile: bool = False) -> Callable:
  """Wraps an extraction model (float32 [0, 255] in) as a compiled batch function.

  Args:
    model: from `backbones.build_extractor`.
    input_size: square side of its input.
    image_size: square side of the stored images fed in (default `input_size`); they are
      resized to `input_size` inside, by `contracts.pixels.to_input`, as the exported model does.
    jit_compile: compile with XLA.

  Returns:
    f(uint8 tensor (B, S, S, 3)) -> (float16 (B, H, W, C) maps, float32 (B, C) pooled,
    float32 (B, 6) health sums of the stored maps, columns `health.PER_IMAGE_SUMS`).
  """
  import tensorflow as tf

  side = image_size or input_size

  @tf.function(input_signature=[tf.TensorSpec((None, side, side, 3), tf.uint8)],
               jit_compile=jit_compile)
  def forward(images):
    inputs = pixels.to_input(images, input_size)
    maps = tf.cast(model(inputs, training=False), tf.float32)
    if maps.shape.rank == 2:  # a vector-output model: store as a 1x1 map
      maps = maps[:, None, None, :]
    stored = tf.cast(maps, tf.float16)
    return stored, tf.reduce_mean(maps, axis=[1, 2]), health_lib.per_image_sums(stored)

  return forward


def load_forward(job: Any, *, jit_compile: bool = False) -> Callable:
  """Builds one job's model with its weights (found on this machine) and compiles it.

  Raises:
    ValueError: the weights cannot be found here or differ from the driver's.
  """
  weights_file = None
  if not job.model_path:
    weights_file = weights_lib.localize(job.weights, backbone=job.backbone,
                                        input_size=job.input_size, weights_dir=job.weights_dir)
  model = backbones_lib.build_extractor(
      job.backbone, input_size=job.input_size, layer=job.layer, weights_file=weights_file,
      model_path=job.model_path, preprocess=job.preprocess, precision=job.precision)
  return compile_forward(model, job.input_size, image_size=stored_size(job),
                         jit_compile=jit_compile)


def stored_size(job: Any) -> int:
  """The side of the stored images a job's forward is fed (its input size when unrecorded)."""
  return int(job.image_info.get("image_size") or job.input_size)
