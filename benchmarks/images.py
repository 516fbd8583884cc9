"""Synthetic photo-like JPEGs for the benchmarks (no downloads, same bytes in every ratio).

    python -m benchmarks --quick        # writes its images under a temporary folder

Smooth colour fields, anti-aliased shapes, a light blur and Gaussian noise, encoded by OpenCV
at quality 90 (4:2:0): about 1.9 bits per pixel, close to camera photos, so decode costs are
realistic (flat synthetic images decode several times faster than photos).
"""
from __future__ import annotations

import csv
import os
import pathlib
from collections.abc import Sequence

import cv2
import numpy as np

JPEG_QUALITY = 90
# Distinct images per source size; further rows hard-link to them (distinct paths give distinct
# ids, so ingest treats them as different images while the generation cost stays small).
DISTINCT_PER_SIZE = 4


def photo_like(width: int, height: int, seed: int) -> np.ndarray:
  """A BGR uint8 image with photo-like entropy: gradients, shapes, blur and sensor-like noise.

  Raises:
    ValueError: a side below 16 px.
  """
  if width < 16 or height < 16:
    raise ValueError(f"image size {width}x{height} is too small; both sides must be >= 16")
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3)).astype(np.uint8)
  image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
  for _ in range(12):
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
    radius = int(rng.integers(max(height // 20, 2), max(height // 4, 3)))
    if rng.random() < 0.5:
      cv2.circle(image, (x, y), radius, colour, -1, cv2.LINE_AA)
    else:
      cv2.rectangle(image, (x - radius, y - radius // 2), (x + radius, y + radius // 2), colour,
                    -1, cv2.LINE_AA)
  image = cv2.GaussianBlur(image, (0, 0), 1.5)
  # Sensor-like noise; cv2.randn is several times faster than NumPy on 3-Mpx images.
  cv2.setRNGSeed(seed)
  noise = np.empty(image.shape, np.int16)
  cv2.randn(noise, (0, 0, 0), (6, 6, 6))  # per channel (a scalar would only hit channel 0)
  return cv2.add(image.astype(np.int16), noise, dtype=cv2.CV_16S).clip(0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
  """BGR uint8 -> baseline JPEG bytes (4:2:0)."""
  ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
  if not ok:
    raise ValueError(f"OpenCV could not encode an image of shape {image.shape}")
  return buffer.tobytes()


def distinct_jpegs(sizes: Sequence[tuple[int, int]], per_size: int = DISTINCT_PER_SIZE,
                   seed: int = 0) -> list[bytes]:
  """`per_size` distinct JPEGs of every (width, height), interleaved by size."""
  if per_size <= 0:
    raise ValueError(f"per_size must be positive, got {per_size!r}")
  out = []
  for index in range(per_size):
    for size_index, (width, height) in enumerate(sizes):
      out.append(encode_jpeg(photo_like(width, height, seed + 1000 * size_index + index)))
  return out


def write_corpus(folder: pathlib.Path, jpegs: Sequence[bytes], count: int,
                 classes: Sequence[str] = ("a", "b")) -> pathlib.Path:
  """Writes a CSV manifest of `count` rows over the distinct `jpegs` (cycled) in `folder`.

  Row i uses `jpegs[i % len(jpegs)]` under its own file name (a hard link after the first copy),
  so every row is a distinct source for ingest.

  Returns:
    The manifest path (`image_url,label`, paths relative to the manifest).
  """
  if count <= 0:
    raise ValueError(f"count must be positive, got {count!r}")
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "img").mkdir(exist_ok=True)
  originals = []
  for index, data in enumerate(jpegs):
    path = folder / "img" / f"src{index:03d}.jpg"
    if not path.exists():
      path.write_bytes(data)
    originals.append(path)
  rows = []
  for index in range(count):
    name = f"img/{index:05d}.jpg"
    target = folder / name
    if not target.exists():
      try:
        os.link(originals[index % len(originals)], target)
      except OSError:  # file systems without hard links: a plain copy costs only disk
        target.write_bytes(jpegs[index % len(jpegs)])
    rows.append((name, classes[index % len(classes)]))
  manifest = folder / f"manifest_{count}.csv"
  with manifest.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image_url", "label"])
    writer.writerows(rows)
  return manifest
