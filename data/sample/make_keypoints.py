#!/usr/bin/env python3
"""Generates data/sample/keypoints/*.png and data/sample/keypoints.csv (synthetic faces).

Usage:  python data/sample/make_keypoints.py [--out data/sample] [--count 48] [--seed 0]

Each image is a drawn face-like shape (skin-coloured ellipse with two eyes, a nose and a mouth)
at a random position, scale and in-plane rotation on a noisy, randomly coloured background.
The landmark coordinates are the exact points the shapes were drawn at, in pixels of the
written image: x to the right, y down, OpenCV's pixel-centre convention (the pixel in column i,
row j has its centre at (i, j)). Image sizes vary (96, 112 or 128 px
square) so consumers must scale coordinates with the image.

Points (K = 7), in CSV column order; "left"/"right" mean the image's left/right side (smaller/
larger x for an upright face), not the drawn person's:
  0 eye_left     centre of the eye on the image's left
  1 eye_right    centre of the eye on the image's right
  2 nose_tip
  3 mouth_left   mouth corner on the image's left
  4 mouth_right  mouth corner on the image's right
  5 mouth_center midpoint of the mouth arc
  6 chin         bottom of the face ellipse
Horizontal flip permutation (new index i takes old point FLIP_PERMUTATION[i], x -> W - 1 - x):
  [1, 0, 2, 4, 3, 5, 6]

Deterministic: numpy Generator with a fixed seed; PNG output is lossless.
"""

import argparse
import csv
import math
import os

import cv2
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
POINT_NAMES = ["eye_left", "eye_right", "nose_tip", "mouth_left", "mouth_right",
               "mouth_center", "chin"]
FLIP_PERMUTATION = [1, 0, 2, 4, 3, 5, 6]
SIZES = (96, 112, 128)
MOUTH_CURVE = 0.12  # smile depth (face half-widths); mouth_center is the arc's midpoint
SHIFT = 4  # sub-pixel drawing precision for cv2 (coordinates * 2**SHIFT)


def _fp(pt):
  return (int(round(pt[0] * (1 << SHIFT))), int(round(pt[1] * (1 << SHIFT))))


def draw_face(rng):
  size = int(rng.choice(SIZES))
  bg = rng.integers(30, 226, size=3).astype(np.float32)
  img = np.clip(bg + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)

  # Face geometry in a local frame (unit = face half-width), then rotate/scale/translate.
  a = size * rng.uniform(0.22, 0.32)          # half-width in px
  b = a * rng.uniform(1.15, 1.4)              # half-height
  angle = rng.uniform(-25, 25)                # degrees, in-plane rotation
  theta = math.radians(angle)
  margin = b * 1.05 + 2
  cx = rng.uniform(margin, size - 1 - margin)
  cy = rng.uniform(margin, size - 1 - margin)
  cos, sin = math.cos(theta), math.sin(theta)

  def to_img(u, v):  # local (u right, v down, in units of a) -> image px
    x, y = u * a, v * a
    return (cx + x * cos - y * sin, cy + x * sin + y * cos)

  eye_dx = rng.uniform(0.35, 0.5)
  eye_y = -rng.uniform(0.25, 0.45)
  nose_y = rng.uniform(0.1, 0.3)
  mouth_y = rng.uniform(0.55, 0.75)
  mouth_w = rng.uniform(0.3, 0.5)
  pts = [to_img(-eye_dx, eye_y), to_img(eye_dx, eye_y), to_img(0.0, nose_y),
         to_img(-mouth_w, mouth_y), to_img(mouth_w, mouth_y), to_img(0.0, mouth_y + MOUTH_CURVE),
         to_img(0.0, b / a)]

  skin = tuple(int(c) for c in rng.integers(90, 250, size=3))
  dark = tuple(int(c) for c in rng.integers(0, 70, size=3))
  lip = (int(rng.integers(20, 90)), int(rng.integers(20, 90)), int(rng.integers(140, 230)))
  cv2.ellipse(img, _fp((cx, cy)), _fp((a, b)), angle, 0, 360, skin, -1, cv2.LINE_AA, SHIFT)
  cv2.ellipse(img, _fp((cx, cy)), _fp((a, b)), angle, 0, 360, dark, 1, cv2.LINE_AA, SHIFT)
  eye_r = a * rng.uniform(0.1, 0.16)
  for p in pts[:2]:
    cv2.ellipse(img, _fp(p), _fp((eye_r * 1.5, eye_r)), angle, 0, 360, (245, 245, 245), -1,
                cv2.LINE_AA, SHIFT)
    cv2.circle(img, _fp(p), int(round(eye_r * 0.7 * (1 << SHIFT))), dark, -1, cv2.LINE_AA, SHIFT)
  # Nose: a small triangle whose lower vertex is the nose tip.
  n0, n1 = to_img(0.0, nose_y - 0.3), to_img(-0.12, nose_y)
  n2 = to_img(0.12, nose_y)
  tri = np.array([_fp(n0), _fp(n1), _fp(pts[2]), _fp(n2)], np.int32)
  cv2.fillPoly(img, [tri], tuple(int(c * 0.75) for c in skin), cv2.LINE_AA, SHIFT)
  # Mouth: an arc through the two corners, thickness a few px.
  mouth = np.array([_fp(to_img(-mouth_w + 2 * mouth_w * t,
                               mouth_y + MOUTH_CURVE * (1 - (2 * t - 1) ** 2)))
                    for t in np.linspace(0, 1, 15)], np.int32)
  cv2.polylines(img, [mouth], False, lip, max(1, int(round(a * 0.08))), cv2.LINE_AA, SHIFT)
  img = cv2.GaussianBlur(img, (3, 3), 0.6)
  return img, pts


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default=HERE)
  p.add_argument("--count", type=int, default=48)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  rng = np.random.default_rng(args.seed)
  img_dir = os.path.join(args.out, "keypoints")
  os.makedirs(img_dir, exist_ok=True)
  for name in os.listdir(img_dir):
    if name.startswith("face_") and name.endswith(".png"):
      os.remove(os.path.join(img_dir, name))
  header = ["image_url"] + [f"{n}_{c}" for n in POINT_NAMES for c in ("x", "y")]
  with open(os.path.join(args.out, "keypoints.csv"), "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(header)
    for i in range(args.count):
      img, pts = draw_face(rng)
      name = f"keypoints/face_{i:03d}.png"
      if not cv2.imwrite(os.path.join(args.out, name), img, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise RuntimeError(f"could not write {name}")
      w.writerow([name] + [f"{v:.2f}" for pt in pts for v in pt])
  print(f"wrote {args.count} images to {img_dir} and keypoints.csv ({len(POINT_NAMES)} points)")


if __name__ == "__main__":
  main()
