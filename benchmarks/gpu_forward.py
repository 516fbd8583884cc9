"""Device-side ceiling of stage 2 on one accelerator: the frozen backbones' batched forward.

    KERAS_BACKEND=jax python benchmarks/gpu_forward.py --out gpu_forward.json

Runs the same `keras.applications` architectures that `headstart extract` runs, built the way it
builds them (uint8 batch in, preprocessing and the forward compiled together, feature map and
pooled vector out and copied back to the host), at several batch sizes, in float32 and
mixed_bfloat16, and records images/s and the device's peak memory for each. It also measures
how fast this machine's CPU cores decode the stored JPEGs that feed the forward, since a worker
cannot extract faster than it decodes.

It is standalone (no headstart import) and backend-agnostic (any Keras 3 backend), because the
GPU machines lent to this project carry no TensorFlow build: the figures are the GPU's ceiling
for these models, not a run of `headstart extract` (see benchmarks/README.md, "GPU").
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

# Preprocessing as keras.applications does it ("caffe" mode: BGR, ImageNet means subtracted;
# "tf" mode: scaled to [-1, 1]).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
BACKBONES = {
    "vgg16": ("VGG16", "caffe"),
    "resnet50": ("ResNet50", "caffe"),
    "mobilenet_v2": ("MobileNetV2", "tf"),
}


def _build(name: str, size: int):
  """uint8 (B, size, size, 3) RGB -> (feature map, pooled vector), as stage 2 computes them."""
  import keras

  cls, mode = BACKBONES[name]
  backbone = getattr(keras.applications, cls)(include_top=False, weights=None,
                                               input_shape=(size, size, 3))
  images = keras.Input((size, size, 3), dtype="uint8")
  x = keras.ops.cast(images, "float32")
  if mode == "caffe":
    x = keras.ops.flip(x, axis=-1) - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR)
  else:
    x = x / 127.5 - 1.0
  fmap = backbone(x, training=False)
  pooled = keras.layers.GlobalAveragePooling2D(dtype="float32")(fmap)
  return keras.Model(images, [keras.ops.cast(fmap, "float16"), pooled])


def _peak_device_bytes() -> int | None:
  backend = os.environ.get("KERAS_BACKEND", "tensorflow")
  try:
    if backend == "jax":
      import jax
      return jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    if backend == "torch":
      import torch
      return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] if gpus else None
  except Exception:  # noqa: BLE001 (a figure we can go without)
    return None


def measure_one(name: str, size: int, precision: str, batches: list[int],
                seconds: float) -> list[dict]:
  """Images/s and device peak memory of one backbone at each batch size (ascending)."""
  import numpy as np
  import keras

  keras.mixed_precision.set_global_policy(precision)
  model = _build(name, size)
  rng = np.random.default_rng(0)
  rows = []
  for batch in batches:
    x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    start = time.perf_counter()
    fmap, pooled = model.predict_on_batch(x)  # compiles
    compile_s = time.perf_counter() - start
    model.predict_on_batch(x)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 3 * batch:
      fmap, pooled = model.predict_on_batch(x)  # host -> device -> host, as extract does
      done += batch
    elapsed = time.perf_counter() - start
    rows.append({"backbone": name, "input_size": size, "precision": precision, "batch": batch,
                 "images_per_s": round(done / elapsed, 1), "compile_s": round(compile_s, 2),
                 "map_shape": list(np.asarray(fmap).shape[1:]),
                 "peak_device_mib": (lambda b: None if b is None else round(b / 2**20))(
                     _peak_device_bytes())})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _decode_worker(args: tuple[bytes, int]) -> int:
  import cv2
  import numpy as np

  data, count = args
  cv2.setNumThreads(1)
  buf = np.frombuffer(data, np.uint8)
  for _ in range(count):
    cv2.imdecode(buf, cv2.IMREAD_COLOR)
  return count


def measure_decode(size: int, processes: int, per_process: int = 1500) -> dict:
  """JPEG q95 decodes/s of a stored `size`-px image on `processes` cores."""
  import cv2
  import numpy as np

  rng = np.random.default_rng(0)
  # Photo-like content (smooth gradients + noise) so the JPEG has a realistic size.
  yy, xx = np.mgrid[0:size, 0:size]
  image = np.stack([(xx * 255 // size), (yy * 255 // size), ((xx + yy) * 127 // size)], -1)
  image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
  data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
  with multiprocessing.get_context("spawn").Pool(processes) as pool:
    pool.map(_decode_worker, [(data, 50)] * processes)  # warm
    start = time.perf_counter()
    total = sum(pool.map(_decode_worker, [(data, per_process)] * processes))
    elapsed = time.perf_counter() - start
  return {"input_size": size, "jpeg_bytes": len(data), "processes": processes,
          "decodes_per_s": round(total / elapsed, 1)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--batches", default="64,256,512")
  parser.add_argument("--precisions", default="float32,mixed_bfloat16")
  parser.add_argument("--configs", default="vgg16@300,resnet50@224,mobilenet_v2@224")
  parser.add_argument("--seconds", type=float, default=2.0)
  parser.add_argument("--one", help=argparse.SUPPRESS)  # child: NAME@SIZE:PRECISION
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  if args.one:
    config, precision = args.one.split(":")
    name, size = config.split("@")
    rows = measure_one(name, int(size), precision, batches, args.seconds)
    with open(args.out, "w") as f:
      json.dump(rows, f)
    return
  result = {"backend": os.environ.get("KERAS_BACKEND", "tensorflow"), "forward": [],
            "decode": [], "errors": []}
  try:
    result["gpu"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30).stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    result["gpu"] = None
  result["cpu_cores"] = os.cpu_count()

  def save():
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)

  for config in args.configs.split(","):
    for precision in args.precisions.split(","):
      # One process per model and precision, so each peak-memory figure is its own.
      part = f"{args.out}.part"
      child = subprocess.run([sys.executable, __file__, "--out", part, "--one",
                              f"{config}:{precision}", "--batches", args.batches,
                              "--seconds", str(args.seconds)], capture_output=True, text=True)
      if child.returncode == 0:
        with open(part) as f:
          result["forward"].extend(json.load(f))
      else:
        result["errors"].append({"config": config, "precision": precision,
                                 "tail": child.stderr[-1500:]})
        print(child.stderr[-1500:], flush=True)
      save()
  for size in (224, 300):
    result["decode"].append(measure_decode(size, os.cpu_count() or 1))
    print(json.dumps(result["decode"][-1]), flush=True)
  save()


if __name__ == "__main__":
  main()
