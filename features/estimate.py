"""`headstart extract --estimate`: the bill of an extraction before running it.

    headstart extract --images DATA/images --out DATA/features --backbones vgg16,resnet50 \
        --estimate --price-per-hour 0.54 [--estimate-images 128]

Each requested backbone runs here, on this machine's device, on a small sample of the image
dataset (decoded like extract decodes it), at the call's batch size, precision and XLA setting.
The record count comes from the image manifest (no scan). Printed: images/s per backbone, the
worker rate of the whole call, worker-hours for the full dataset and, with a price per
worker-hour, the cost. The same figures go to `OUT/estimate.json`; a later real run of the same
call copies each backbone's block into its manifest, where `headstart compare`'s cost ledger
shows it beside the measured seconds.

Worker model: a worker is a machine like this one. Backbones run one after the other on each
batch; on a GPU the CPUs decode while it computes, so the slower of the two sets the pace; on a
CPU both share the cores, so their times add. Weights do not change the cost: backbones are
built with random weights here.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ESTIMATE_NAME = "estimate.json"
DEFAULT_SAMPLE = 128
_MIN_SECONDS = 2.0


def device_name() -> str:
  """This machine's compute device as extract would use it: the first GPU's model, else CPU."""
  import tensorflow as tf
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU {details.get('device_name', gpus[0].name)} (x{len(gpus)})"
  return f"CPU ({os.cpu_count()} cores)"


def sample_images(shards: Sequence[tuple[str, int]], count: int, job: Any) -> tuple[np.ndarray,
                                                                                 float]:
  """The first `count` usable images as stored (the forward resizes them), and decode seconds
  per image (one core), decoded as the job decodes them."""
  from features import records
  from pipeline import sharding
  image_schema, image_size = job.image_schema(), job.image_info.get("image_size")
  images, seconds = [], 0.0
  for path, total in shards:
    for serialized in sharding.read_range(path, 0, min(total, count - len(images)), total):
      start = time.perf_counter()
      try:
        fields = records.parse_image_example(serialized, image_schema)
        images.append(records.decode_stored(fields["image"], image_size))
      except records.RecordError:
        continue  # the real run dead-letters it; it costs nothing there either
      finally:
        seconds += time.perf_counter() - start
    if len(images) >= count:
      break
  if not images:
    raise ValueError("the image dataset has no usable image to estimate from")
  return np.stack(images), seconds / len(images)


def forward_rate(job: Any, images: np.ndarray, *, batch_size: int, jit_compile: bool) -> float:
  """Steady images/s of one backbone's compiled forward on this device (tracing excluded)."""
  import tensorflow as tf

  from features import backbones as backbones_lib
  from features import forward as forward_lib
  model = backbones_lib.build_extractor(
      job.backbone, input_size=job.input_size, layer=job.layer, seed=0,
      model_path=job.model_path, preprocess=job.preprocess, precision=job.precision)
  forward = forward_lib.compile_forward(model, job.input_size, image_size=images.shape[1],
                                       jit_compile=jit_compile)
  batch = tf.constant(np.resize(images, (batch_size, *images.shape[1:])))
  forward(batch)[0].numpy()  # trace (and compile) once
  done, start = 0, time.perf_counter()
  while done < 2 * batch_size or time.perf_counter() - start < _MIN_SECONDS:
    forward(batch)[0].numpy()
    done += batch_size
  return done / (time.perf_counter() - start)


def estimate(plan: Any, *, sample: int = DEFAULT_SAMPLE,
             price_per_hour: float | None = None) -> dict[str, Any]:
  """Measures every job of `plan` on a sample; returns the estimate of the whole call."""
  from contracts import layout
  config = plan.config
  total = sum(count for _, count in plan.shards)
  by_size: dict[int, list[Any]] = {}
  for job in plan.jobs:
    by_size.setdefault(job.input_size, []).append(job)
  device = device_name()
  backbones, seconds_per_image, decode_per_image = [], 0.0, 0.0
  for jobs in by_size.values():
    images, decode_seconds = sample_images(plan.shards, min(sample, total), jobs[0])
    decode_per_image += decode_seconds
    for job in jobs:
      rate = forward_rate(job, images, batch_size=config.batch_size,
                          jit_compile=config.jit_compile)
      seconds_per_image += 1.0 / rate
      backbones.append({"backbone": job.backbone, "cache_key": job.cache_key,
                        "forward_images_per_second": rate})
  cores = os.cpu_count() or 1
  decode_seconds = decode_per_image / cores  # every core decodes
  if device.startswith("GPU"):
    worker_seconds = max(seconds_per_image, decode_seconds)
  else:
    worker_seconds = seconds_per_image + decode_seconds
  # Train images also go through the backbones once per augmented view.
  train = sum(count for path, count in plan.shards if layout.split_of_shard(path) == "train")
  images_total = total + train * config.views
  hours = images_total * worker_seconds / 3600
  for entry in backbones:
    entry["worker_hours"] = images_total / entry["forward_images_per_second"] / 3600
  return {"device": device, "cores": cores, "sample_images": min(sample, total),
          "batch_size": config.batch_size, "precision": config.precision,
          "jit_compile": config.jit_compile, "images": images_total,
          "decode_images_per_second_per_core": 1.0 / decode_per_image,
          "images_per_second_per_worker": 1.0 / worker_seconds, "worker_hours": hours,
          "price_per_worker_hour": price_per_hour,
          "cost": hours * price_per_hour if price_per_hour is not None else None,
          "backbones": backbones, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime())}


def estimate_lines(result: Mapping[str, Any]) -> list[str]:
  """Human lines of an estimate."""
  lines = [f"estimate on {result['device']}, sample of {result['sample_images']} images, batch "
           f"{result['batch_size']}, {result['precision']}"
           f"{', XLA' if result['jit_compile'] else ''}:"]
  for entry in result["backbones"]:
    lines.append(f"  {entry['backbone']}: {entry['forward_images_per_second']:.1f} images/s "
                 f"forward ({entry['worker_hours']:.3g} worker-hours alone)")
  lines.append(f"  decode: {result['decode_images_per_second_per_core']:.0f} images/s per core, "
               f"{result['cores']} cores")
  cost = (f", cost {result['cost']:.4g} at {result['price_per_worker_hour']:g} per worker-hour"
          if result["cost"] is not None else "; pass --price-per-hour for the cost")
  lines.append(f"  all backbones: {result['images_per_second_per_worker']:.1f} images/s per "
               f"worker like this one; {result['images']} images -> "
               f"{result['worker_hours']:.3g} worker-hours{cost}")
  return lines


def write(out: str, result: Mapping[str, Any]) -> str:
  """Writes `OUT/estimate.json`; returns its path."""
  import tensorflow as tf

  from contracts import datasets
  tf.io.gfile.makedirs(out)
  path = f"{out.rstrip('/')}/{ESTIMATE_NAME}"
  datasets.write_json(path, result)
  return path


def for_job(out: str, cache_key: str) -> dict[str, Any] | None:
  """The manifest's `estimate` block for one backbone: its figures from `OUT/estimate.json` if an
  estimate of the same settings (same cache key) was made, else None."""
  import tensorflow as tf
  path = f"{out.rstrip('/')}/{ESTIMATE_NAME}"
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    result = json.load(f)
  for entry in result.get("backbones", []):
    if entry.get("cache_key") == cache_key:
      call = {key: result.get(key) for key in (
          "device", "sample_images", "batch_size", "precision", "images", "worker_hours",
          "images_per_second_per_worker", "price_per_worker_hour", "cost", "measured_at")}
      return {**call, "forward_images_per_second": entry["forward_images_per_second"],
              "forward_worker_hours": entry["worker_hours"]}
  return None
