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


def batch_health(maps: np.ndarray, forward_seconds: float = 0.0) -> dict[str, float]:
  """Partial sums over one batch of stored maps (any float dtype, batch first)."""
  values = np.asarray(maps, np.float32)
  finite_mask = np.isfinite(values)
  finite = values[finite_mask].astype(np.float64)
  return {
      "values": float(values.size),
      "nan": float(np.isnan(values).sum()),
      "inf": float(np.isinf(values).sum()),
      "zeros": float((values == 0).sum()),
      "finite": float(finite.size),
      "sum": float(finite.sum()),
      "sum_squares": float(np.square(finite).sum()),
      "examples": float(values.shape[0]) if values.ndim else 0.0,
      "forward_seconds": float(forward_seconds),
  }


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
