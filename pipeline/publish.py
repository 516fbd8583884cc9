"""Publishing an ingest job's dataset so that a re-run never destroys a good one.

    staging = publish.prepare("out/images")   # OUT/.staging, empty; an unfinished swap completed
    ...                                       # the job writes a whole dataset there, manifest last
    publish.swap_in(staging, "out/images")    # only once the staging manifest exists

While the job runs, the dataset already in OUT stays complete and loadable: nothing in OUT is
touched until the new `manifest.json` is complete in the staging folder, so a job that fails
(error fraction, an exception) or is interrupted leaves it as it was. The staging manifest is
the commit point. The swap then removes OUT's manifest, removes the old shards the new dataset
does not reuse by name, moves the new files in and moves the manifest last. Object stores have
no atomic folder rename, so the swap is a few file moves; if it is cut short, OUT has no
manifest (readers refuse it as incomplete, never read a mix) and the next ingest into OUT
finishes the swap before doing anything else (`prepare`), since the staging folder still holds
the complete new dataset. Files of OUT that are not part of a dataset (the download cache) are
left alone.
"""
from __future__ import annotations

import json

import tensorflow as tf

from contracts import datasets, layout

STAGING_NAME = ".staging"
# Dataset files besides the shards, in the order they are moved; the manifest goes last.
_METADATA = ("dataset_info.json", "features.json", layout.ERRORS_NAME, layout.SUMMARY_NAME)
# Files a failed job leaves for the user to read.
_REPORTS = (layout.ERRORS_NAME, layout.SUMMARY_NAME)


def staging_dir(out_dir: str) -> str:
  """Where a job into `out_dir` writes its dataset before it is swapped in."""
  return f"{out_dir.rstrip('/')}/{STAGING_NAME}"


def _shard_files(data_dir: str) -> set[str]:
  """File names of the shards listed by a dataset's manifest (empty without a readable one)."""
  try:
    with tf.io.gfile.GFile(f"{data_dir}/{layout.MANIFEST_NAME}") as f:
      manifest = json.load(f)
    return {s["file"] for entry in manifest["splits"].values() for s in entry["shards"]}
  except (tf.errors.NotFoundError, json.JSONDecodeError, KeyError, TypeError):
    return set()


def _remove(path: str) -> None:
  if tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


def prepare(out_dir: str) -> str:
  """Readies `out_dir` for a new job; returns the empty staging folder.

  A swap that was cut short (the staging folder holds a complete manifest) is finished first,
  so the dataset it was publishing is not lost.
  """
  staging = staging_dir(out_dir)
  tf.io.gfile.makedirs(out_dir)
  if tf.io.gfile.exists(f"{staging}/{layout.MANIFEST_NAME}"):
    swap_in(staging, out_dir)
  if tf.io.gfile.exists(staging):
    tf.io.gfile.rmtree(staging)
  tf.io.gfile.makedirs(staging)
  return staging


def swap_in(staging: str, out_dir: str) -> None:
  """Replaces the dataset in `out_dir` by the complete one in `staging` (see the module doc).

  Idempotent: run again after an interruption, it finishes the same swap.

  Raises:
    layout.DatasetError: `staging` holds no complete dataset.
  """
  if not tf.io.gfile.exists(f"{staging}/{layout.MANIFEST_NAME}"):
    raise layout.DatasetError(f"{staging!r} has no {layout.MANIFEST_NAME}: the job did "
                                  "not finish, nothing to publish")
  new_shards = _shard_files(staging)
  old_shards = _shard_files(out_dir) | {
      path.rsplit("/", 1)[-1] for path in tf.io.gfile.glob(f"{out_dir}/*.tfrecord-*")}
  _remove(f"{out_dir}/{layout.MANIFEST_NAME}")  # from here on, OUT is not a dataset
  for name in sorted(old_shards - new_shards):
    _remove(f"{out_dir}/{name}")
  for name in (*sorted(new_shards), *_METADATA, layout.MANIFEST_NAME):
    if tf.io.gfile.exists(f"{staging}/{name}"):  # absent: moved before an interruption
      tf.io.gfile.rename(f"{staging}/{name}", f"{out_dir}/{name}", overwrite=True)
  tf.io.gfile.rmtree(staging)


def keep_failed(staging: str, out_dir: str) -> str:
  """After a failed job: returns the folder holding its `errors.jsonl` and `summary.json`.

  When `out_dir` holds no dataset they are moved there (and the staging folder removed); when
  it holds one, they stay in the staging folder, so the dataset's own files are not replaced.
  """
  if datasets.has_manifest(out_dir):
    return staging
  for name in _REPORTS:
    if tf.io.gfile.exists(f"{staging}/{name}"):
      tf.io.gfile.rename(f"{staging}/{name}", f"{out_dir}/{name}", overwrite=True)
  tf.io.gfile.rmtree(staging)
  return out_dir
