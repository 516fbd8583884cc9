"""Deterministic augmented views of train images (`headstart extract --views K`).

    headstart extract --images out/images --out out/features --backbones mobilenet_v2 --views 2

View 0 is the image itself. View 1 is its horizontal mirror. Views 2..K are crops keeping 80-100 %
of the side at a position drawn from a generator seeded by (seed, id, view), resized back to the
input size; odd views are also mirrored. The same (seed, id, view) always gives the same pixels,
so a re-run reproduces the cache byte for byte.

Keypoint targets (normalised to [0, 1] in stored-image coordinates) follow the pixels: a crop
maps x -> (x - x0) / side (points may leave [0, 1] and are kept), a mirror maps x -> 1 - x and
then swaps left and right points. For 68 points the standard iBUG 68-point permutation is used;
for any other number of points no permutation is known, so only x is mirrored and point i stays
point i (documented in features/README.md).
"""
from __future__ import annotations

import hashlib

import numpy as np

CROP_MIN_SIDE = 0.8

# Standard iBUG 300-W 68-point left/right correspondence: point i of a mirrored face is point
# IBUG_68_FLIP[i] of the original (jaw, brows, nose, eyes, outer and inner lips).
IBUG_68_FLIP = (
    tuple(range(16, -1, -1))                  # jaw 0-16
    + tuple(range(26, 16, -1))                # eyebrows 17-26
    + (27, 28, 29, 30)                        # nose bridge
    + (35, 34, 33, 32, 31)                    # nose base
    + (45, 44, 43, 42, 47, 46)                # eye 36-41 <-> eye 42-47
    + (39, 38, 37, 36, 41, 40)
    + (54, 53, 52, 51, 50, 49, 48)            # outer lip top
    + (59, 58, 57, 56, 55)                    # outer lip bottom
    + (64, 63, 62, 61, 60)                    # inner lip top
    + (67, 66, 65)                            # inner lip bottom
)


def flip_permutation(num_points: int) -> tuple[int, ...]:
  """Left/right point permutation for a mirror; identity when no convention is known."""
  if num_points == 68:
    return IBUG_68_FLIP
  return tuple(range(num_points))


def view_params(record_id: str, view: int, seed: int) -> tuple[bool, float, float, float]:
  """(mirror, x0, y0, side) of a view, as fractions of the image; view 0 is the identity.

  Raises:
    ValueError: negative view.
  """
  if view < 0:
    raise ValueError(f"view {view!r} must be >= 0")
  if view == 0:
    return False, 0.0, 0.0, 1.0
  if view == 1:
    return True, 0.0, 0.0, 1.0
  digest = hashlib.sha256(f"{seed}:{record_id}:{view}".encode()).digest()
  rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
  side = float(rng.uniform(CROP_MIN_SIDE, 1.0))
  x0, y0 = (float(v) for v in rng.uniform(0.0, 1.0 - side, size=2))
  return view % 2 == 1, x0, y0, side


def augment_image(image: np.ndarray, record_id: str, view: int, seed: int) -> np.ndarray:
  """The pixels of one view: crop (resized back to the same size) then mirror; uint8 HxWx3."""
  import cv2
  mirror, x0, y0, side = view_params(record_id, view, seed)
  height, width = image.shape[:2]
  out = image
  if side < 1.0:
    left, top = int(round(x0 * width)), int(round(y0 * height))
    crop_w, crop_h = max(1, int(round(side * width))), max(1, int(round(side * height)))
    out = cv2.resize(image[top:top + crop_h, left:left + crop_w], (width, height),
                     interpolation=cv2.INTER_LINEAR)
  if mirror:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def augment_targets(targets: np.ndarray, record_id: str, view: int, seed: int) -> np.ndarray:
  """Keypoints (K, 2) in [0, 1] moved with the pixels of the same view."""
  mirror, x0, y0, side = view_params(record_id, view, seed)
  points = np.asarray(targets, np.float32).reshape(-1, 2).copy()
  points[:, 0] = (points[:, 0] - x0) / side
  points[:, 1] = (points[:, 1] - y0) / side
  if mirror:
    points[:, 0] = 1.0 - points[:, 0]
    points = points[list(flip_permutation(len(points)))]
  return points.astype(np.float32)
