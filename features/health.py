"""Feature health: is a backbone's output usable, or dead (all zeros), constant or overflowing?

    headstart extract ... --backbones vgg16     # health is printed per backbone at the end

Statistics are taken on the float16 maps as stored, so float16 overflow (|x| > 65504 -> inf)
shows up. Partial sums are merged across batches and workers (sums, not means, so the merge is
exact and order-free).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# Above this fraction of exact zeros the maps carry almost nothing (dead ReLUs, black images).
MAX_ZERO_FRACTION = 0.99
_SUM_KEYS = ("values", "nan", "inf", "zeros", "finite", "sum", "sum_squares", "examples",
             "forward_seconds")


def empty_health() -> dict[str, float]:
  """Accumulator with nothing counted."""
  return {key: 0.0 for key in _SUM_KEYS}


# Columns of `per_image_sums`, computed inside the compiled forward (features/forward.py).
PER_IMAGE_SUMS = ("nan", "inf", "zeros", "finite", "sum", "sum_squares")


def per_image_sums(stored: Any) -> Any:
  """TensorFlow: float16 maps (B, H, W, C) as stored -> (B, 6) float32 sums, `PER_IMAGE_SUMS`.

  Runs inside the backbone's tf.function, where TF's multi-threaded reductions cost a small
  fraction of the same sums in NumPy on the host (0.75 ms per MobileNetV2@224 image there,
  serial with the forward). Per image, so the caller can drop the padding rows of an XLA batch.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel (health stays NumPy-only)
  values = tf.cast(stored, tf.float32)
  finite = tf.math.is_finite(values)
  safe = tf.where(finite, values, tf.zeros_like(values))
  axes = list(range(1, len(values.shape)))

  def count(mask):
    return tf.reduce_sum(tf.cast(mask, tf.float32), axis=axes)

  return tf.stack([count(tf.math.is_nan(values)), count(tf.math.is_inf(values)),
                   count(tf.equal(values, 0.0)), count(finite),
                   tf.reduce_sum(safe, axis=axes), tf.reduce_sum(tf.square(safe), axis=axes)],
                  axis=1)


def health_from_sums(sums: np.ndarray, values_per_image: int,
                     forward_seconds: float = 0.0) -> dict[str, float]:
  """Partial health sums of a batch from `per_image_sums` rows (padding rows already dropped);
  exact up to float32 rounding of the per-image sums."""
  totals = np.asarray(sums, np.float64).sum(axis=0)
  result = empty_health()
  result.update({key: float(value) for key, value in zip(PER_IMAGE_SUMS, totals)})
  result["values"] = float(values_per_image * len(sums))
  result["examples"] = float(len(sums))
  result["forward_seconds"] = float(forward_seconds)
  return result


def merge_health(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
  """Sum of two accumulators."""
  return {key: float(a.get(key, 0.0)) + float(b.get(key, 0.0)) for key in _SUM_KEYS}


def summarize_health(acc: Mapping[str, float]) -> dict[str, Any]:
  """Manifest block: counts, mean/std of finite values, zero fraction and warnings."""
  finite = acc.get("finite", 0.0)
  mean = acc["sum"] / finite if finite else float("nan")
  variance = max(acc["sum_squares"] / finite - mean * mean, 0.0) if finite else float("nan")
  zero_fraction = acc["zeros"] / acc["values"] if acc.get("values") else float("nan")
  warnings = []
  if acc.get("nan"):
    warnings.append(f"{int(acc['nan'])} NaN values")
  if acc.get("inf"):
    warnings.append(f"{int(acc['inf'])} Inf values (float16 overflow or a broken model)")
  if acc.get("values") and zero_fraction > MAX_ZERO_FRACTION:
    warnings.append(f"{zero_fraction:.1%} of values are exactly zero")
  if finite and variance == 0.0:
    warnings.append("every value is the same (std 0)")
  return {
      "values": int(acc.get("values", 0)),
      "nan_count": int(acc.get("nan", 0)),
      "inf_count": int(acc.get("inf", 0)),
      "zero_fraction": None if math.isnan(zero_fraction) else round(zero_fraction, 6),
      "mean": None if math.isnan(mean) else mean,
      "std": None if math.isnan(variance) else math.sqrt(variance),
      "ok": not warnings,
      "warnings": warnings,
  }
