"""Where a head's parsed input lives between epochs: in memory, in a local file, or nowhere.

    plan = caching.plan_cache(spec, "map", ("train", "validation"), budget=512 << 20,
                              cache_dir="runs/x/cache")
    plan.where   # "memory" | "file" | "none", and plan.reason says why

The reader parses each record once per epoch unless its tensors are cached. In memory, tensors
stay as stored (float16 maps, float32 pooled vectors, uint8 images) and are cast to float32 per
batch, so a dataset stored as 8 GB of float16 needs 8 GB, not 16. When the splits a run reads
do not fit the budget (`--cache-budget`, default a quarter of the memory available), a
`tf.data` file cache on local disk is used where the disk has room (under `--cache-dir`, or the
run directory when it is local); else nothing is cached and every epoch streams from the shards.
Peak memory then no longer grows with the dataset. The order of examples is the same in all
three modes (the cache sits before the shuffle), so a run's metrics do not depend on where its
cache lives.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from heads import compiled, reader

WHERE = ("memory", "file", "none")
DEFAULT_BUDGET_FRACTION = 0.25
# A file cache needs its size on disk plus TFRecord-like framing; keep some room besides.
_DISK_HEADROOM = 1.2
_LABEL_BYTES = 16


def default_budget() -> int:
  """A quarter of the memory available now (psutil), or 1 GiB when it cannot be read."""
  try:
    import psutil
    return int(psutil.virtual_memory().available * DEFAULT_BUDGET_FRACTION)
  except (ImportError, OSError):
    return 1 << 30


def bytes_per_example(spec: Any, input_kind: str) -> int:
  """Bytes one cached example takes as stored: float16 map, float32 pooled or uint8 image."""
  if input_kind == "map":
    size = 2 * _product(spec.feature_map_shape)
  elif input_kind == "pooled":
    size = 4 * int(spec.pooled_dim)
  else:
    size = 3 * int(spec.image_size) ** 2
  return size + _LABEL_BYTES + 8 * spec.num_keypoints


def _product(shape: Sequence[int]) -> int:
  total = 1
  for dim in shape:
    total *= int(dim)
  return total


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """The chosen cache placement of one run's input, and why."""
  where: str
  reason: str
  bytes_needed: int
  budget: int
  directory: str | None = None

  def file_prefix(self, split: str, key: str) -> str | None:
    """The `tf.data` file-cache prefix of one split (None unless `where == "file"`)."""
    if self.where != "file":
      return None
    return f"{self.directory}/{key}-{split}"

  def to_dict(self) -> dict[str, Any]:
    return {"where": self.where, "reason": self.reason, "bytes_needed": self.bytes_needed,
            "budget": self.budget, "directory": self.directory}


def _is_local(path: str) -> bool:
  return "://" not in path


def _free_bytes(directory: str) -> int:
  probe = directory
  while not tf.io.gfile.exists(probe) and "/" in probe.rstrip("/"):
    probe = probe.rstrip("/").rsplit("/", 1)[0] or "/"
  try:
    return shutil.disk_usage(probe if tf.io.gfile.exists(probe) else ".").free
  except OSError:
    return 0


def plan_cache(spec: Any, input_kind: str | Sequence[str], splits: Sequence[str], *,
               budget: int | None,
               cache_dir: str | None, run_dir: str | None = None,
               views: bool = False) -> CachePlan:
  """Chooses memory, file or no cache for the splits a run reads every epoch.

  Args:
    spec: the dataset (`reader.DatasetSpec`).
    input_kind: `pooled`, `map` or `image`, or the several kinds cached together.
    splits: the splits read each epoch (train, and validation when present).
    budget: bytes allowed in memory (None: `default_budget()`).
    cache_dir: where a file cache may go (None: `run_dir/cache` when local, else a local
      temporary folder).
    run_dir: the run directory.
    views: augmented views are read too (they multiply the train split).
  """
  budget = default_budget() if budget is None else int(budget)
  kinds = (input_kind,) if isinstance(input_kind, str) else tuple(input_kind)
  per_example = sum(bytes_per_example(spec, kind) for kind in kinds)
  examples = sum(spec.num_examples(split) if (views or split != "train")
                 else spec.num_examples(split, views=False) for split in splits)
  needed = examples * per_example
  if needed <= budget:
    return CachePlan("memory", f"{_mib(needed)} of parsed input fits the {_mib(budget)} "
                     "memory budget", needed, budget)
  directory = (cache_dir or (f"{run_dir.rstrip('/')}/cache" if run_dir and _is_local(run_dir)
                             else f"{tempfile.gettempdir()}/headstart-cache")).rstrip("/")
  if not _is_local(directory):
    return CachePlan("none", f"{_mib(needed)} exceeds the {_mib(budget)} memory budget and "
                     f"--cache-dir {directory!r} is not on local disk: streaming from the "
                     "shards every epoch", needed, budget)
  free = _free_bytes(directory)
  if free >= needed * _DISK_HEADROOM:
    return CachePlan("file", f"{_mib(needed)} exceeds the {_mib(budget)} memory budget; "
                     f"cached on local disk in {directory} ({_mib(free)} free)", needed, budget,
                     directory)
  return CachePlan("none", f"{_mib(needed)} exceeds the {_mib(budget)} memory budget and the "
                   f"{_mib(free)} free in {directory}: streaming from the shards every epoch",
                   needed, budget)


def cache_key(spec: Any, input_kinds: Sequence[str], views: bool) -> str:
  """Names a file cache by what it holds, so runs on the same data share it and no other."""
  # `ids=eval`: cached train splits hold no ids (older file caches did, and are not reused).
  text = f"{spec.cache_key}|{','.join(input_kinds)}|views={views}|ids=eval"
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def clear_partial(prefix: str) -> None:
  """Removes an unfinished file cache (a crashed run's lock file and shards, no index)."""
  if tf.io.gfile.exists(f"{prefix}.index"):
    return
  for path in tf.io.gfile.glob(f"{prefix}*"):
    tf.io.gfile.remove(path)


def _mib(size: int) -> str:
  return f"{size / 2**20:,.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Cached splits shared by every run of this process on the same data (a compare grid's cells)

_SHARED: dict[tuple, tf.data.Dataset] = {}
# Input kinds a grid will read from a dataset: one cache then holds them all (one read).
_SHARED_KINDS: dict[str, tuple[str, ...]] = {}


def share_inputs(data_dir: str, input_kinds: Sequence[str]) -> None:
  """Announces that runs of this process will read these kinds from a dataset, so the first
  run caches all of them together and the dataset is read once (a grid with pooled and map
  heads on the same features)."""
  _SHARED_KINDS[data_dir.rstrip("/")] = tuple(sorted(set(input_kinds)))


def shared_kinds(spec: reader.DatasetSpec, input_kind: str) -> tuple[str, ...]:
  """The kinds cached together with `input_kind` for this dataset (at least itself)."""
  kinds = _SHARED_KINDS.get(spec.data_dir, ())
  return kinds if input_kind in kinds else (input_kind,)


def cached_split(spec: reader.DatasetSpec, split: str, *, input_kind: str, views: bool = False,
                 where: str = "memory", cache_file: str | None = None) -> tf.data.Dataset:
  """Per-example dicts `{x (as stored), y[, id]}` of a split (ids for the evaluated splits only),
  cached where told, shared in-process.

  Every run of this process that asks for the same split and placement gets the same cached
  dataset (holding every kind announced with `share_inputs`), so the first run's pass fills the
  cache and later runs read it: a compare grid reads its data once. The declared cardinality is
  the manifest's count; a shard that yields another number fails the pass (see `training` for
  how it is named).
  """
  kinds = shared_kinds(spec, input_kind)
  key = (spec.data_dir, spec.cache_key, split, kinds, views, where, cache_file)
  if key not in _SHARED:
    # Only evaluated splits need ids (predictions) and source sizes (keypoint errors); the
    # train split's 64-character ids were half the cost of each cached epoch's input.
    evaluated = split != "train"
    extra = (("height", "width") if evaluated and spec.task == "keypoints"
             and spec.kind == "images" else ())
    records = reader.read_split(spec, split, input_kind=kinds if len(kinds) > 1 else kinds[0],
                         views=views, with_id=evaluated, extra_keys=extra,
                         as_stored=True).apply(
        tf.data.experimental.assert_cardinality(reader.count_examples(spec, split, views=views)))
    _SHARED[key] = reader.cache_as(records, where, cache_file)
  if len(kinds) == 1:
    return _SHARED[key]
  return _SHARED[key].map(
      lambda record: {("x" if k == input_kind else k): v for k, v in record.items()
                      if k == input_kind or k not in kinds},
      num_parallel_calls=tf.data.AUTOTUNE)


def release_shared() -> None:
  """Drops what this process's runs share: the parsed caches, and the compiled heads that hold
  the dataset's statistics (a grid moving to its next dataset frees the last one's memory)."""
  compiled.release()
  _SHARED.clear()
  _SHARED_KINDS.clear()
