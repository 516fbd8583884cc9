"""Cache keys of feature datasets: what makes two extractions interchangeable.

    headstart extract --images out/images --out out/features --backbones vgg16   # twice: cache hit

The key is the sha256 of the canonical JSON of every field that changes a stored number: the
image dataset's fingerprint, backbone, weights (kind, sha256, seed for random weights), layer,
input size, resizing, preprocessing, compute precision and what is stored (maps/pooled, views).
Execution options that do not change the features (batch size, XLA, runner, workers) are not
part of it. `FEATURE_FORMAT` is bumped whenever the record layout or extraction code changes
what is written, so old caches stop matching.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

FEATURE_FORMAT = 1
KEY_FIELDS = ("feature_format", "image_fingerprint", "backbone", "model_sha256", "weights_kind",
              "weights_sha256", "seed", "layer", "input_size", "resize", "input_resize",
              "preprocess", "dtype", "store", "views")


def cache_key_fields(*, image_fingerprint: str, backbone: str, weights_kind: str,
                     weights_sha256: str | None, seed: int | None, layer: str | None,
                     input_size: int, resize: str, input_resize: str, preprocess: str,
                     dtype: str, store: str, views: int,
                     model_sha256: str | None = None) -> dict[str, Any]:
  """The fields a feature dataset's cache key is computed from (stored in its manifest).

  Args:
    image_fingerprint: the image dataset's `fingerprint` (sha256 over its shard sha256s).
    backbone: registry name or a user model's name.
    weights_kind: `imagenet`, `none` or `file`.
    weights_sha256: sha256 of the weights file (None for random weights: the seed defines them).
    seed: `--seed`; kept only where it changes the numbers (random weights, augmented views).
    layer: output layer, None for the default (last conv block).
    input_size: square side the backbone sees.
    resize: how the image dataset was resized (`stretch`, `pad`, `crop`).
    input_resize: how stored images are resized to `input_size` (`none` when equal).
    preprocess: preprocess mode (`caffe`, `tf`, `none`).
    dtype: compute precision (`float32`, `mixed_float16`, `mixed_bfloat16`).
    store: `both`, `maps` or `pooled`.
    views: number of augmented views per train image.
    model_sha256: sha256 of a user's model file (None for registered backbones).

  Raises:
    ValueError: the image fingerprint is missing.
  """
  if not image_fingerprint:
    raise ValueError(f"image dataset fingerprint {image_fingerprint!r} is empty")
  uses_seed = weights_kind == "none" or views > 0
  return {
      "feature_format": FEATURE_FORMAT,
      "image_fingerprint": image_fingerprint,
      "backbone": backbone,
      "model_sha256": model_sha256,
      "weights_kind": weights_kind,
      "weights_sha256": None if weights_kind == "none" else weights_sha256,
      "seed": seed if uses_seed else None,
      "layer": layer or None,
      "input_size": int(input_size),
      "resize": resize,
      "input_resize": input_resize,
      "preprocess": preprocess,
      "dtype": dtype,
      "store": store,
      "views": int(views),
  }


def cache_key(fields: Mapping[str, Any]) -> str:
  """Hex sha256 of the canonical JSON of `fields` (sorted keys, no whitespace).

  Raises:
    ValueError: a field is missing or unexpected (a typo would silently split the cache).
  """
  if set(fields) != set(KEY_FIELDS):
    raise ValueError(f"cache key fields {sorted(fields)!r} differ from {sorted(KEY_FIELDS)!r}")
  canonical = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def dataset_dir_name(backbone: str, weights_kind: str, key: str) -> str:
  """`<backbone>-<weights kind>-<first 8 hex of the key>`, e.g. `vgg16-imagenet-3fa2c1d0`."""
  safe = re.sub(r"[^a-z0-9_]+", "_", backbone.lower())
  return f"{safe}-{weights_kind}-{key[:8]}"
