"""The end of stage 1: the image dataset's manifest (when the job is good) and its summary.

    summary = image_dataset.finalize(shards, out_dir=out, input_rows=n, ...)

`finalize()` runs once at the end of the ingest job: it checks `written + dead-lettered ==
input rows` and the error fraction, writes TFDS metadata and `manifest.json` (last), and always
writes `summary.json` (also for a failed job, so the user sees why).
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from contracts import datasets, layout
from contracts import schema as schema_lib


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
  grouped = datasets.group_shards(shards, out_dir)
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
    features = schema_lib.image_schema(
        image_size=settings["image_size"], image_format=settings["format"],
        class_names=class_names, num_keypoints=num_keypoints).tfds_features()
    manifest = datasets.finalize_dataset(out_dir, layout.IMAGES_NAME, features, grouped, {
        "kind": "images",
        "task": layout.task_of(class_names, num_keypoints),
        "class_names": list(class_names) if class_names is not None else None,
        "num_keypoints": num_keypoints,
        "fingerprint": datasets.fingerprint(grouped),
        "counts": summary,
        **settings,
    }, description="headstart image dataset")
    summary["fingerprint"] = manifest["fingerprint"]
  datasets.write_json(f"{out_dir}/{layout.SUMMARY_NAME}", summary)
  return summary
