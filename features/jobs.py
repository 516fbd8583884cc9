"""What one `headstart extract` call has to do: a job per backbone, its cache key and directory,
whether the cache already holds it, and the manifest/index written when it is done.

    headstart extract --images out/images --out out/features --backbones vgg16,mobilenet_v2

Planning touches only JSON manifests and weight-file hashes, so a cache hit is decided before
any model is built or Beam pipeline constructed. Only the jobs that miss are prepared (stale
directory removed, random weights saved, output shape probed) and sent to the pipeline.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from contracts import datasets, layout, pixels
from contracts import schema as schema_lib
from features import backbones as backbones_lib
from features import cache_key as cache_key_lib
from features import health as health_lib
from features import records
from features import weights as weights_lib

RANDOM_WEIGHTS_NAME = layout.RANDOM_WEIGHTS_NAME
# Work items (record ranges) a job is cut into at most: enough for as many busy workers, while a
# range never holds less than one batch.
MAX_RANGES = 1024


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  """Parsed `headstart extract` flags (Beam flags excluded)."""
  images: str
  out: str
  backbones: tuple[str, ...]
  layer: str | None = None
  input_size: int | None = None
  weights: str = "imagenet"
  weights_dir: str | None = None
  batch_size: int = 64
  store: str = "both"
  views: int = 0
  force: bool = False
  seed: int = 0
  precision: str = "float32"
  jit_compile: bool = False
  max_error_fraction: float = 0.5
  share_models: str = "process"
  estimate: bool = False
  estimate_images: int = 128
  price_per_hour: float | None = None


@dataclasses.dataclass(frozen=True)
class FeatureJob:
  """One backbone's extraction: everything a worker needs to rebuild the model and write."""
  backbone: str
  tag: str
  out_dir: str
  cache_key: str
  cache_key_fields: Mapping[str, Any]
  weights: weights_lib.WeightsChoice
  input_size: int
  layer: str | None
  preprocess: str
  precision: str
  seed: int
  store: str
  views: int
  image_info: Mapping[str, Any]
  model_path: str | None = None
  weights_dir: str | None = None
  hit: bool = False
  map_shape: tuple[int, ...] = ()
  pooled_dim: int = 0
  start_time: float = 0.0
  max_error_fraction: float = 0.5
  estimate: Mapping[str, Any] | None = None  # from `--estimate`, kept beside the measured figures

  @property
  def dir_name(self) -> str:
    return self.out_dir.rstrip("/").rsplit("/", 1)[-1]

  def schema(self) -> schema_lib.Schema:
    """The feature records this job writes (known once `prepare` probed the output shape)."""
    info = self.image_info
    return schema_lib.feature_schema(
        class_names=info["class_names"], num_keypoints=info["num_keypoints"],
        map_shape=self.map_shape, pooled_dim=self.pooled_dim, store=self.store)

  def image_schema(self) -> schema_lib.Schema:
    """The image records this job reads."""
    info = self.image_info
    return schema_lib.image_schema(
        image_size=info["image_size"], image_format=info["image_format"] or "jpeg",
        class_names=info["class_names"], num_keypoints=info["num_keypoints"] or 0)


@dataclasses.dataclass(frozen=True)
class ExtractPlan:
  """The image dataset's shards (path, record count) and the jobs of one call."""
  config: ExtractConfig
  shards: tuple[tuple[str, int], ...]
  jobs: tuple[FeatureJob, ...]

  @property
  def records_per_range(self) -> int:
    """Records per work item: at least a batch, at most 1/MAX_RANGES of the image records."""
    total = sum(count for _, count in self.shards)
    return max(self.config.batch_size, -(-total // MAX_RANGES))


def _image_fingerprint(manifest: Mapping[str, Any]) -> str:
  # Older image manifests may lack `fingerprint`; recompute it the same way from shard hashes.
  if manifest.get("fingerprint"):
    return manifest["fingerprint"]
  return datasets.fingerprint(
      {split: entry["shards"] for split, entry in manifest["splits"].items()})


def _image_info(config: ExtractConfig, image_manifest: Mapping[str, Any]) -> dict[str, Any]:
  """What every job needs to know of the image dataset (copied into the feature manifests)."""
  if image_manifest.get("kind", "images") != "images":
    raise ValueError(f"--images {config.images!r} is a {image_manifest.get('kind')!r} dataset; "
                     "pass the image dataset written by `headstart ingest`")
  return {
      "image_dataset": _absolute(config.images),
      "image_size": int(image_manifest.get("image_size") or 0),
      "image_format": image_manifest.get("format"),
      "resize": image_manifest.get("resize", "stretch"),
      "task": image_manifest.get("task", "unlabelled"),
      "class_names": image_manifest.get("class_names"),
      "num_keypoints": image_manifest.get("num_keypoints"),
      "image_fingerprint": _image_fingerprint(image_manifest),
  }


def _backbone_choice(entry: str, config: ExtractConfig, input_size: int
                     ) -> tuple[str, str, str | None, str | None, weights_lib.WeightsChoice]:
  """(name, preprocess mode, model path, model sha256, weights) of one `--backbones` entry."""
  if backbones_lib.is_custom_model(entry):
    if not tf.io.gfile.exists(entry):
      raise ValueError(f"backbone model {entry!r} does not exist; pass a .keras file or a "
                       "SavedModel directory")
    sha = weights_lib.file_sha256(entry)
    choice = weights_lib.WeightsChoice("file", "model", entry, entry.rsplit("/", 1)[-1], sha)
    return backbones_lib.custom_model_name(entry), "none", entry, sha, choice
  spec = backbones_lib.BACKBONES[entry]
  if input_size < spec.min_size:
    raise ValueError(f"--input-size {input_size!r} is too small for {entry}; it needs at "
                     f"least {spec.min_size}")
  choice = weights_lib.resolve(entry, config.weights, input_size=input_size,
                               weights_dir=config.weights_dir)
  return entry, spec.preprocess, None, None, choice


def _job(index: int, entry: str, config: ExtractConfig, image_info: Mapping[str, Any],
         input_size: int) -> FeatureJob:
  """One backbone's job: its cache key, directory and whether a complete dataset holds it."""
  name, preprocess, model_path, model_sha, choice = _backbone_choice(entry, config, input_size)
  fields = cache_key_lib.cache_key_fields(
      image_fingerprint=image_info["image_fingerprint"], backbone=name,
      weights_kind=choice.kind, weights_sha256=choice.sha256, seed=config.seed,
      layer=config.layer, input_size=input_size, resize=image_info["resize"],
      input_resize=pixels.resize_name(image_info["image_size"] or input_size, input_size),
      preprocess=preprocess, dtype=config.precision, store=config.store, views=config.views,
      model_sha256=model_sha)
  key = cache_key_lib.cache_key(fields)
  out_dir = f"{config.out.rstrip('/')}/{cache_key_lib.dataset_dir_name(name, choice.kind, key)}"
  return FeatureJob(
      backbone=name, tag=f"b{index}", out_dir=out_dir, cache_key=key, cache_key_fields=fields,
      weights=choice, input_size=input_size, layer=config.layer, preprocess=preprocess,
      precision=config.precision, seed=config.seed, store=config.store, views=config.views,
      image_info=image_info, model_path=model_path,
      weights_dir=weights_lib.weights_dir_from(config.weights_dir),
      hit=not config.force and _is_complete(out_dir, key),
      max_error_fraction=config.max_error_fraction)


def plan(config: ExtractConfig) -> ExtractPlan:
  """Computes every backbone's cache key and whether a complete dataset already holds it.

  Raises:
    ValueError: the image dataset is missing/incomplete, or a flag value is invalid.
  """
  image_manifest = datasets.read_manifest(config.images)
  image_info = _image_info(config, image_manifest)
  input_size = config.input_size or image_info["image_size"]
  if not input_size:
    raise ValueError(f"{config.images!r} records no image_size; pass --input-size")
  registered = [b for b in config.backbones if not backbones_lib.is_custom_model(b)]
  if config.weights not in ("imagenet", "none") and len(registered) > 1:
    raise ValueError(f"--weights {config.weights!r} is one file but {len(registered)} backbones "
                     "were given; extract one backbone per weights file")
  jobs = tuple(_job(index, entry, config, image_info, input_size)
               for index, entry in enumerate(config.backbones))
  shards = tuple(
      (path, int(entry["num_examples"]))
      for split in image_manifest["splits"]
      for path, entry in zip(datasets.shard_paths(config.images, image_manifest, split),
                             image_manifest["splits"][split]["shards"]))
  return ExtractPlan(config, shards, jobs)


def _absolute(path: str) -> str:
  # Readers of the manifest (reports, finetune) may run from another working directory.
  if "://" in path:
    return path
  return str(pathlib.Path(path).resolve())


def _is_complete(out_dir: str, key: str) -> bool:
  if not datasets.has_manifest(out_dir):
    return False
  try:
    return datasets.read_manifest(out_dir).get("cache_key") == key
  except layout.DatasetError:
    return False


def prepare(job: FeatureJob) -> FeatureJob:
  """Readies a missed job on the driver: clean directory, random weights saved, shape probed.

  A directory without a complete manifest (an interrupted run, or `--force`) is removed first,
  so no stale shard can end up next to new ones.

  Raises:
    ValueError: unknown `--layer`, or a user model whose input size differs from --input-size.
  """
  if tf.io.gfile.exists(job.out_dir):
    tf.io.gfile.rmtree(job.out_dir)
  tf.io.gfile.makedirs(job.out_dir)
  weights = job.weights
  if job.model_path:
    model = backbones_lib.load_user_model(job.model_path)
    fixed = backbones_lib.user_model_input_size(model)
    if fixed is not None and fixed != job.input_size:
      raise ValueError(f"backbone model {job.model_path!r} takes {fixed}x{fixed} images but "
                       f"--input-size is {job.input_size}; pass --input-size {fixed}")
    model = backbones_lib.build_extractor(job.backbone, input_size=job.input_size,
                                          layer=job.layer, model_path=job.model_path)
    shape = tuple(model.output.shape[1:])
  else:
    seed = job.seed if weights.kind == "none" else None
    base = backbones_lib.build_base(job.backbone, job.input_size, seed=seed)
    if weights.kind == "none":
      weights = _save_random_weights(base, job.out_dir)
    if job.layer:
      names = [layer.name for layer in base.layers]
      if job.layer not in names:
        raise ValueError(f"{job.backbone} has no layer {job.layer!r}; its last layers: "
                         f"{', '.join(names[-6:])}")
      shape = tuple(base.get_layer(job.layer).output.shape[1:])
    else:
      shape = tuple(base.output.shape[1:])
  if len(shape) == 1:  # a vector output is stored as a 1x1 map
    shape = (1, 1, shape[0])
  if len(shape) != 3:
    raise ValueError(f"{job.backbone} output has shape {shape!r}; expected HxWxC or C")
  return dataclasses.replace(job, weights=weights, map_shape=tuple(int(d) for d in shape),
                             pooled_dim=int(shape[-1]))


def _save_random_weights(base: Any, out_dir: str) -> weights_lib.WeightsChoice:
  # Keras writes only local files; write there, then copy through gfile (out_dir may be gs://).
  import tempfile
  target = f"{out_dir}/{RANDOM_WEIGHTS_NAME}"
  # The local directory goes too (mkdtemp left one empty directory in /tmp per job).
  with tempfile.TemporaryDirectory(prefix="headstart-random-") as local_dir:
    local = f"{local_dir}/{RANDOM_WEIGHTS_NAME}"
    base.save_weights(local)
    tf.io.gfile.copy(local, target, overwrite=True)
  return weights_lib.WeightsChoice("none", "random", target, RANDOM_WEIGHTS_NAME,
                                   weights_lib.file_sha256(target))


def write_errors(out_dir: str, dead_letters: Sequence[Mapping[str, Any]]) -> None:
  """Writes `errors.jsonl` (one JSON object a line, sorted so re-runs are identical)."""
  lines = sorted(json.dumps(entry, sort_keys=True) for entry in dead_letters)
  with tf.io.gfile.GFile(f"{out_dir}/{layout.ERRORS_NAME}", "w") as f:
    f.write("".join(f"{line}\n" for line in lines))


def finalize(shards: Sequence[Mapping[str, Any]], health: Mapping[str, float],
             job: FeatureJob, *, dead_letters: Sequence[Mapping[str, Any]] = (),
             input_records: int | None = None,
             usage: Mapping[str, Any] | None = None,
             statistics: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
  """Writes one feature dataset's `errors.jsonl`, TFDS metadata and, last, its manifest.

  `usage` (`model_sharing`, `model_copies`, `workers`: records per SDK process) says how the
  job was spread; it goes into the manifest as is, and so do the per-split `statistics` heads
  read instead of passing over the data (`contracts.statistics`).

  Returns:
    The manifest, or None when more than `max_error_fraction` of the image records were
    dead-lettered: then no manifest is written and the driver reports the failure.
  """
  write_errors(job.out_dir, dead_letters)
  if input_records and len(dead_letters) / input_records > job.max_error_fraction:
    return None
  grouped = datasets.group_shards(shards, job.out_dir)
  fingerprint = datasets.fingerprint(grouped)
  info = job.image_info
  extra = {
      "kind": "features", "backbone": job.backbone, **job.weights.to_manifest(),
      "seed": job.seed if job.weights.kind == "none" else None, "model_path": job.model_path,
      "layer": job.layer, "input_size": job.input_size, "resize": info["resize"],
      "input_resize": job.cache_key_fields["input_resize"], "preprocess": job.preprocess,
      "dtype": job.precision, "cache_key": job.cache_key,
      "cache_key_fields": dict(job.cache_key_fields), "feature_map_shape": list(job.map_shape),
      "feature_map_dtype": "float16", "pooled_dim": job.pooled_dim, "pooled_dtype": "float32",
      "store": job.store, "views": job.views,
      **{key: info[key] for key in ("image_dataset", "image_size", "image_format",
                                    "image_fingerprint", "task", "class_names",
                                    "num_keypoints")},
      "fingerprint": fingerprint,
      "statistics": {**statistics, "fingerprint": fingerprint} if statistics else None,
      "health": health_lib.summarize_health(health),
      "counts": _counts(grouped, job, dead_letters, input_records),
      **_timings(grouped, health, job),
      "backbone_weights_file": RANDOM_WEIGHTS_NAME if job.weights.kind == "none" else None,
      "estimate": dict(job.estimate) if job.estimate else None,
      **(usage or {}),
  }
  return datasets.finalize_dataset(
      job.out_dir, layout.FEATURES_NAME, job.schema().tfds_features(), grouped, extra,
      description=f"{job.backbone} features ({job.weights.kind} weights) of "
                  f"{info['image_dataset']}")


def _counts(grouped: Mapping[str, Sequence[Mapping[str, Any]]], job: FeatureJob,
            dead_letters: Sequence[Mapping[str, Any]], input_records: int | None
            ) -> dict[str, Any]:
  """The manifest's `counts`: image records in, images written, dead letters by reason."""
  by_reason: dict[str, int] = {}
  for entry in dead_letters:
    by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + 1
  # Each usable image gives one view-0 record, plus `views` more in train.
  images_written = sum(
      sum(s["num_examples"] for s in entries) // (1 + job.views if split == "train" else 1)
      for split, entries in grouped.items())
  dead = len(dead_letters)
  return {"input_records": input_records, "written": images_written, "dead_lettered": dead,
          "by_reason": by_reason,
          "examples": sum(s["num_examples"] for entries in grouped.values() for s in entries),
          "balanced": input_records is None or images_written + dead == input_records}


def _timings(grouped: Mapping[str, Sequence[Mapping[str, Any]]], health: Mapping[str, float],
             job: FeatureJob) -> dict[str, Any]:
  """Extraction seconds and rates (end to end, and of the forward alone) for the manifest."""
  seconds = max(time.time() - job.start_time, 1e-9)
  examples = sum(s["num_examples"] for entries in grouped.values() for s in entries)
  forward_seconds = health.get("forward_seconds", 0.0)
  return {"extraction_seconds": round(seconds, 3),
          "images_per_second": round(examples / seconds, 3),
          "forward_seconds": round(forward_seconds, 3),
          "forward_images_per_second": (round(health.get("examples", 0) / forward_seconds, 3)
                                        if forward_seconds else None)}


def write_index(out: str, jobs: Sequence[FeatureJob]) -> dict[str, Any]:
  """Updates `out/index.json`: every complete feature dataset under `out`, this call's first."""
  return datasets.write_index(out, [
      {"dir": job.dir_name, "backbone": job.backbone, "weights_kind": job.weights.kind,
       "cache_key": job.cache_key} for job in jobs])


def summary_lines(job: FeatureJob, manifest: Mapping[str, Any]) -> list[str]:
  """Human summary of one finished dataset, plus a WARNING line when its features look broken."""
  splits = ", ".join(f"{s} {v['num_examples']}" for s, v in manifest["splits"].items())
  health = manifest["health"]
  shape = "x".join(str(d) for d in manifest["feature_map_shape"])
  lines = [
      f"{job.out_dir}: {job.backbone} ({manifest['weights_kind']} weights from "
      f"{manifest['weights_source']}, sha256 {str(manifest['weights_sha256'])[:12]}), map {shape}, "
      f"pooled {manifest['pooled_dim']}; {splits}; {manifest['images_per_second']:.2f} images/s "
      f"end to end, forward {manifest['forward_images_per_second'] or 0:.2f} images/s; health: "
      f"mean {health['mean'] or 0:.4g}, std {health['std'] or 0:.4g}, zeros "
      f"{(health['zero_fraction'] or 0):.1%}, NaN {health['nan_count']}, Inf {health['inf_count']}"]
  counts = manifest.get("counts", {})
  if counts.get("dead_lettered"):
    lines.append(f"  {counts['dead_lettered']} of {counts['input_records']} image records "
                 f"dead-lettered ({counts['by_reason']}); see {job.out_dir}/errors.jsonl")
  if not health["ok"]:
    lines.append(f"WARNING: {job.backbone} features look broken: {'; '.join(health['warnings'])}")
  return lines
