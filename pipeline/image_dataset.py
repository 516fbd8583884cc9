"""The image dataset written by stage 1: its TFDS features, its manifest and its summary.

    features = image_dataset.tfds_features(cfg, class_names, num_keypoints=0)

`finalize()` runs once at the end of the ingest job: it checks `written + dead-lettered ==
input rows` and the error fraction, writes TFDS metadata and `manifest.json` (last), and always
writes `summary.json` (also for a failed job, so the user sees why).
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline import dataset_io

NAME = "images"
SUMMARY_NAME = "summary.json"


def tfds_features(image_size: int, image_format: str, class_names: Sequence[str] | None,
                  num_keypoints: int):
  """The TFDS `FeaturesDict` of one image record (see docs/CONTRACTS.md)."""
  import tensorflow_datasets as tfds  # slow import, needed only here

  features = {
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(image_size, image_size, 3), encoding_format=image_format),
      "source": tfds.features.Text(),
      "group": tfds.features.Text(),
      "content_sha256": tfds.features.Text(),
      "height": tfds.features.Scalar(dtype=np.int64),
      "width": tfds.features.Scalar(dtype=np.int64),
  }
  if class_names is not None:
    features["label"] = tfds.features.ClassLabel(names=list(class_names))
  if num_keypoints:
    features["targets"] = tfds.features.Tensor(shape=(num_keypoints, 2), dtype=np.float32)
  return tfds.features.FeaturesDict(features)


def task_of(class_names: Sequence[str] | None, num_keypoints: int) -> str:
  """`keypoints`, `binary`, `multiclass` or `unlabelled`."""
  if num_keypoints:
    return "keypoints"
  if class_names is None:
    return "unlabelled"
  return "binary" if len(class_names) == 2 else "multiclass"


def finalize(shards: Iterable[Mapping[str, Any]], *, out_dir: str, input_rows: int,
             dead_reasons: Iterable[tuple[str, int]], split_labels: Iterable[tuple[tuple, int]],
             class_names: Sequence[str] | None, num_keypoints: int, settings: Mapping[str, Any],
             max_error_fraction: float) -> dict[str, Any]:
  """Writes metadata + manifest (when the job is good) and the summary; returns the summary."""
  by_reason = dict(sorted(dead_reasons))
  dead = sum(by_reason.values())
  by_split: dict[str, int] = collections.Counter()
  by_class: dict[str, int] = collections.Counter()
  for (split, label), count in split_labels:
    by_split[split] += count
    if label is not None:
      by_class[label] += count
  grouped = dataset_io.group_shards(shards, out_dir)
  written = sum(s["num_examples"] for entries in grouped.values() for s in entries)
  summary = {
      "input_rows": input_rows, "written": written, "dead_lettered": dead,
      "balanced": written + dead == input_rows,
      "by_reason": by_reason, "by_split": dict(sorted(by_split.items())),
      "by_class": dict(sorted(by_class.items())),
      "error_fraction": dead / input_rows if input_rows else 0.0,
      "max_error_fraction": max_error_fraction,
  }
  problems = []
  if not summary["balanced"]:
    problems.append(f"written ({written}) + dead-lettered ({dead}) != input rows ({input_rows})")
  if summary["error_fraction"] > max_error_fraction:
    problems.append(f"{dead} of {input_rows} rows were dead-lettered "
                    f"({summary['error_fraction']:.0%}), above --max-error-fraction "
                    f"{max_error_fraction:g}")
  if written == 0:
    problems.append("no image was written")
  summary["status"] = "failed" if problems else "ok"
  summary["problems"] = problems
  if not problems:
    features = tfds_features(settings["image_size"], settings["format"], class_names, num_keypoints)
    manifest = dataset_io.finalize_dataset(out_dir, NAME, features, grouped, {
        "kind": "images",
        "task": task_of(class_names, num_keypoints),
        "class_names": list(class_names) if class_names is not None else None,
        "num_keypoints": num_keypoints,
        "fingerprint": dataset_io.fingerprint(grouped),
        "counts": summary,
        **settings,
    }, description="headstart image dataset")
    summary["fingerprint"] = manifest["fingerprint"]
  dataset_io.write_json(f"{out_dir}/{SUMMARY_NAME}", summary)
  return summary
