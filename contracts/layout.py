"""Names and versions of headstart's on-disk layout (docs/CONTRACTS.md), and its one error type.

    path = f"{data_dir}/{layout.MANIFEST_NAME}"
    split = layout.canonical_split("val")   # "validation"
"""
from __future__ import annotations

SCHEMA_VERSION = 1
CODE_VERSION = "0.1.0"

# Files of a dataset directory (stages 1 and 2).
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
SUMMARY_NAME = "summary.json"
IMAGES_NAME = "images"        # dataset name in stage-1 shard file names
FEATURES_NAME = "features"    # dataset name in stage-2 shard file names
RANDOM_WEIGHTS_NAME = "backbone.weights.h5"
# The folder `headstart extract --out` writes: one directory per feature dataset + this index.
INDEX_NAME = "index.json"
# `{name}-{split}.tfrecord-{SSSSS}-of-{NNNNN}`: Beam replaces the S/N runs with the shard index
# and count; TFDS' template says the same.
SHARD_NAME_TEMPLATE = ".tfrecord-SSSSS-of-NNNNN"
TFDS_FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation",
                 "train": "train", "validation": "validation", "test": "test"}
RESIZE_MODES = ("stretch", "pad", "crop")
STORE_CHOICES = ("both", "maps", "pooled")
TASKS = ("binary", "multiclass", "keypoints", "unlabelled")


class DatasetError(ValueError):
  """A dataset or run directory is missing, incomplete or not what the caller expects."""


def canonical_split(name: str) -> str:
  """Maps a split name or alias (`val`, `valid`, `dev`) to TFDS's `train`/`validation`/`test`.

  Raises:
    ValueError: the name is not a known split.
  """
  key = name.strip().lower()
  if key not in SPLIT_ALIASES:
    raise ValueError(f"unknown split {name!r}; allowed: train, validation (val, valid, dev), test")
  return SPLIT_ALIASES[key]


def shard_prefix(out_dir: str, name: str, split: str) -> str:
  """Path prefix a shard writer appends `.tfrecord-SSSSS-of-NNNNN` to."""
  return f"{out_dir.rstrip('/')}/{name}-{split}"


def shard_file_name(name: str, split: str, index: int, count: int) -> str:
  """`{name}-{split}.tfrecord-{index:05d}-of-{count:05d}` (what the template above names)."""
  return f"{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def split_of_shard(file_name: str) -> str:
  """`.../images-train.tfrecord-00000-of-00002` -> `train`."""
  base = file_name.rstrip("/").rsplit("/", 1)[-1]
  return base.split(".tfrecord", 1)[0].rsplit("-", 1)[-1]


def shard_index(file_name: str) -> int:
  """`...tfrecord-00003-of-00008` -> 3."""
  return int(file_name.rsplit("-", 3)[-3])


def task_of(class_names, num_keypoints: int) -> str:
  """`keypoints`, `binary`, `multiclass` or `unlabelled`."""
  if num_keypoints:
    return "keypoints"
  if class_names is None:
    return "unlabelled"
  return "binary" if len(class_names) == 2 else "multiclass"
