"""tf.data input pipelines for heads: feature datasets (stage 2) and image datasets (stage 1).

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head linear --out runs/x

Shards come from the dataset's manifest (never a glob), are read with a parallel interleave,
parsed a batch at a time (`tf.io.parse_example` + `decode_raw` of the float16 bytes), then
cached, shuffled, batched and prefetched. Heads that only need the pooled vector never parse the
feature map. Records with `view > 0` (augmented copies) are dropped unless `views=True`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from contracts import datasets, layout, pixels
from contracts import schema as schema_lib

# Records parsed per `parse_example` call: big enough to amortise the op, small enough that a
# batch of 9x9x512 float16 maps (~80 KiB each) stays a few tens of MiB.
PARSE_BATCH = 256
# Memory the train shuffle buffer may hold (see `shuffle_buffer_size`).
SHUFFLE_BUFFER_BYTES = 32 << 20
# What tf.data's autotuned buffers (prefetch, parallel map, interleave) of one input may hold.
AUTOTUNE_RAM_BUDGET = 128 << 20
INPUT_KINDS = ("pooled", "map", "image")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a head needs to know about a dataset, read from its manifest."""
  data_dir: str
  kind: str                               # "features" or "images"
  task: str                               # binary, multiclass, keypoints
  class_names: tuple[str, ...]
  num_keypoints: int
  feature_map_shape: tuple[int, ...] | None
  pooled_dim: int | None
  image_size: int | None
  cache_key: str
  backbone: str
  weights_kind: str
  splits: tuple[str, ...]
  manifest: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)
  schema: schema_lib.Schema = dataclasses.field(repr=False, compare=False, default=None)

  @property
  def num_outputs(self) -> int:
    """Width of the head's output layer."""
    if self.task == "binary":
      return 1
    if self.task == "multiclass":
      return len(self.class_names)
    return 2 * self.num_keypoints

  @property
  def target_key(self) -> str:
    return "targets" if self.task == "keypoints" else "label"

  def num_examples(self, split: str, *, views: bool = True) -> int:
    """Records of a split from the manifest; `views=False` counts original images only.

    Stage 2 writes `1 + views` records per usable train image, so the originals are counted
    without reading a record.
    """
    count = int(self.manifest["splits"][split]["num_examples"])
    if views or self.kind != "features" or split != "train":
      return count
    return count // (1 + int(self.manifest.get("views") or 0))


def load_spec(data_dir: str) -> DatasetSpec:
  """Reads a feature or image dataset's manifest into a `DatasetSpec`.

  Raises:
    layout.DatasetError: no manifest (not a complete dataset).
    ValueError: the dataset is unlabelled or its task is unknown.
  """
  data_dir = data_dir.rstrip("/")
  manifest = datasets.read_manifest(data_dir)
  task = manifest.get("task")
  if task not in ("binary", "multiclass", "keypoints"):
    raise ValueError(f"dataset {data_dir!r} has task {task!r}; heads train on binary, "
                     "multiclass or keypoints datasets")
  kind = manifest.get("kind")
  if kind not in ("features", "images"):
    raise ValueError(f"dataset {data_dir!r} has kind {kind!r}, expected features or images")
  map_shape = manifest.get("feature_map_shape")
  if kind == "images":
    cache_key = manifest["fingerprint"]
  else:
    cache_key = manifest.get("cache_key") or ""
    if not cache_key:
      raise layout.DatasetError(f"feature dataset {data_dir!r} has no cache_key in its "
                                    "manifest, so a model trained on it could not be checked")
  return DatasetSpec(
      data_dir=data_dir, kind=kind, task=task,
      class_names=tuple(manifest.get("class_names") or ()),
      num_keypoints=int(manifest.get("num_keypoints") or 0),
      feature_map_shape=tuple(int(d) for d in map_shape) if map_shape else None,
      pooled_dim=int(manifest["pooled_dim"]) if manifest.get("pooled_dim") else None,
      image_size=int(manifest["image_size"]) if manifest.get("image_size") else None,
      cache_key=cache_key,
      backbone=manifest.get("backbone", "none (from scratch)" if kind == "images" else ""),
      weights_kind=manifest.get("weights_kind", "none" if kind == "images" else ""),
      splits=tuple(s for s in layout.SPLITS if s in manifest["splits"]),
      manifest=manifest, schema=schema_lib.from_manifest(manifest))


def check_cache_key(spec: DatasetSpec, expected: str, run_dir: str) -> None:
  """Refuses features that differ from the ones a run was trained on.

  Raises:
    layout.DatasetError: the keys differ.
  """
  if spec.cache_key != expected:
    raise layout.DatasetError(
        f"features {spec.data_dir!r} have cache key {spec.cache_key[:12]!r} but run "
        f"{run_dir!r} was trained on features with key {expected[:12]!r}; use a new run "
        "directory or the features the run was trained on")


# ---------------------------------------------------------------------------------------------
# Parsing


def decode_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
  """JPEG/PNG bytes of one stored image -> uint8 `[S, S, 3]` (cast to float32 per batch),
  decoded by `contracts.pixels.decode`, as extraction and the exported model decode it."""
  return tf.ensure_shape(pixels.decode(encoded), [image_size, image_size, 3])


def input_key(input_kind: str) -> str:
  """Record key a head of the given input kind reads."""
  if input_kind not in INPUT_KINDS:
    raise ValueError(f"unknown input kind {input_kind!r}; allowed: {', '.join(INPUT_KINDS)}")
  return {"pooled": "pooled", "map": "feature_map", "image": "image"}[input_kind]


def read_split(spec: DatasetSpec, split: str, *, input_kind: str | tuple[str, ...],
               views: bool = False, with_id: bool = False, extra_keys: tuple[str, ...] = (),
               as_stored: bool = False) -> tf.data.Dataset:
  """One split as a dataset of per-example dicts `{"x", "y"[, "id"]}` (no cache/shuffle/batch).

  `x` is float32 unless `as_stored`: then maps stay float16 and images uint8, as stored, for a
  cache half (or a quarter) the size; `make_for_train`/`make_for_eval` cast each batch. With a
  tuple of input kinds, each tensor comes under its kind's name (`pooled`, `map`) instead of `x`.

  Args:
    spec: the dataset, from `load_spec`.
    split: `train`, `validation` or `test`.
    input_kind: `pooled`, `map` (feature datasets) or `image` (image datasets), or several.
    views: keep augmented views (`view > 0`).
    with_id: also yield the record id.
    extra_keys: further record keys to yield under their own names (e.g. `height`).

  Raises:
    layout.DatasetError: the split is missing.
    ValueError: the dataset does not hold that input kind.
  """
  kinds = (input_kind,) if isinstance(input_kind, str) else tuple(input_kind)
  for kind in kinds:
    _check_input(spec, kind)
  files = datasets.shard_paths(spec.data_dir, spec.manifest, split)
  # Views only exist in feature datasets; image records have none.
  filter_views = spec.kind == "features" and not views
  tensor_keys = tuple(input_key(kind) for kind in kinds)
  keys = (*tensor_keys, spec.target_key, *(("id",) if with_id else ()), *extra_keys,
          *(("view",) if filter_views else ()))
  # parse_example handles the encoded image bytes; decoding is per image below.
  parse = spec.schema.batch_parser(keys, maps_as=tf.float16 if as_stored else tf.float32)
  autotune = tf.data.AUTOTUNE
  dataset = tf.data.Dataset.from_tensor_slices(files).interleave(
      tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
      num_parallel_calls=autotune, deterministic=True)
  counter = _read_counter(spec.data_dir, split)

  def parse_and_count(serialized):
    counter.assign_add(tf.cast(tf.size(serialized), tf.int64))
    return parse(serialized)

  dataset = dataset.batch(PARSE_BATCH).map(parse_and_count,
                                           num_parallel_calls=autotune).unbatch()
  if filter_views:
    dataset = dataset.filter(lambda record: tf.equal(record["view"], 0))
  if "image" in kinds:
    size, dtype = spec.image_size, tf.uint8 if as_stored else tf.float32
    dataset = dataset.map(
        lambda record: {**record, "image": tf.cast(decode_image(record["image"], size), dtype)},
        num_parallel_calls=autotune)
  names = ({tensor_keys[0]: "x"} if len(kinds) == 1 else dict(zip(tensor_keys, kinds)))
  names[spec.target_key] = "y"
  return dataset.map(
      lambda record: {names.get(k, k): v for k, v in record.items() if k != "view"},
      num_parallel_calls=autotune)


def _check_input(spec: DatasetSpec, input_kind: str) -> None:
  key = input_key(input_kind)
  if (input_kind == "image") != (spec.kind == "images"):
    raise ValueError(f"a head reading {input_kind!r} inputs cannot train on the {spec.kind} "
                     f"dataset {spec.data_dir!r}")
  store = spec.manifest.get("store", "both")
  if (key == "feature_map" and (spec.feature_map_shape is None or store == "pooled")) or (
      key == "pooled" and (spec.pooled_dim is None or store == "maps")):
    raise ValueError(f"feature dataset {spec.data_dir!r} does not store {key!r} "
                     f"(store={store!r}); pick a head that reads the other tensor")


def count_examples(spec: DatasetSpec, split: str, *, views: bool = False) -> int:
  """Examples `read_split` yields for a split, from the manifest (no record is read)."""
  return spec.num_examples(split, views=views)


# Records read from shards per (dataset, split) in this process: how tests and benchmarks count
# the passes a run or a grid makes over its data (a cached epoch reads none).
_READS: dict[tuple[str, str], tf.Variable] = {}
def _read_counter(data_dir: str, split: str) -> tf.Variable:
  key = (data_dir.rstrip("/"), split)
  if key not in _READS:
    with tf.init_scope():
      _READS[key] = tf.Variable(0, dtype=tf.int64, trainable=False)
  return _READS[key]


def records_read(data_dir: str, split: str) -> int:
  """Records this process has parsed from a split's shards so far."""
  counter = _READS.get((data_dir.rstrip("/"), split))
  return int(counter.numpy()) if counter is not None else 0


def cache_as(dataset: tf.data.Dataset, where: str | bool, cache_file: str | None
             ) -> tf.data.Dataset:
  """`dataset` cached in memory, in a `tf.data` file cache at `cache_file`, or not at all."""
  where = {True: "memory", False: "none"}.get(where, where)
  if where == "memory":
    return dataset.cache()
  if where == "file":
    if not cache_file:
      raise ValueError("a file cache needs its path")
    from heads import caching
    tf.io.gfile.makedirs(cache_file.rsplit("/", 1)[0])
    caching.clear_partial(cache_file)
    return dataset.cache(cache_file)
  if where != "none":
    raise ValueError(f"cache placement {where!r} is not one of memory, file, none")
  return dataset


def _as_pair(batch: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
  """A batch of per-example dicts -> float32 `(x, y)`."""
  x = batch["x"]
  return (x if x.dtype == tf.float32 else tf.cast(x, tf.float32)), batch["y"]


def _examples(dataset: tf.data.Dataset, *, cache: str | bool, cache_file: str | None,
              num_examples: int | None) -> tf.data.Dataset:
  """Per-example dicts with the declared cardinality, cached where told ("memory", "file" at
  `cache_file`, "none", or a bool: True is memory)."""
  if num_examples is not None:
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_examples))
  return cache_as(dataset, cache, cache_file)


def _batched(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Per-example dicts -> prefetched float32 `(x, y)` batches.

  The pairs are cut from whole batches: a per-example map was half the input cost of a cached
  epoch (0.30 -> 0.16 s for 16,000 pooled vectors), and the order is the same. The cast of
  stored float16 maps runs on tf.data's threads, several batches at once (0.36 ms per batch of
  64 MobileNetV2@96 maps here; the order stays deterministic).
  """
  return _bounded(dataset.batch(batch_size).map(_as_pair, num_parallel_calls=tf.data.AUTOTUNE)
                  .prefetch(tf.data.AUTOTUNE))


def make_for_train(dataset: tf.data.Dataset, *, batch_size: int, shuffle_buffer: int,
                   seed: int, cache: str | bool = True, cache_file: str | None = None,
                   num_examples: int | None = None,
                   epoch: tf.Variable | None = None) -> tf.data.Dataset:
  """Per-example dicts -> shuffled float32 `(x, y)` batches, cached where `cache` says.

  `num_examples` (from `count_examples`) declares the cardinality the view filter hides, so Keras
  knows the epoch length from the first epoch on. With `epoch` (an int64 variable the trainer
  sets at each epoch's start, see `fitting.EpochSeed`), epoch k's order is a function of
  (seed, k) alone, so a run resumed in a new process replays exactly the order an uninterrupted
  run would have used; without it, each new iterator draws the next order of this process.
  The shuffle sits after the cache and sees the same record sequence whether that sequence
  comes from memory, a file or the shards, so the order does not depend on the cache.
  """
  dataset = _examples(dataset, cache=cache, cache_file=cache_file, num_examples=num_examples)
  shuffle_buffer = shuffle_buffer_size(dataset.element_spec["x"], shuffle_buffer)
  if epoch is None:
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  else:
    cached = dataset

    def epoch_order(_):
      # With Keras' global seed 0, tf's get_seed compares the (tensor) op seed with 0 in
      # Python and fails; no graph-level seed inside this function sidesteps that, and the
      # order stays a function of (seed, epoch) alone.
      tf.compat.v1.get_default_graph().seed = None
      return cached.shuffle(shuffle_buffer, seed=seed * 1_000_003 + epoch.read_value(),
                            reshuffle_each_iteration=False)

    dataset = tf.data.Dataset.from_tensors(0).flat_map(epoch_order)
    if num_examples is not None:
      dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_examples))
  return _batched(dataset, batch_size)


def _bounded(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """`dataset` whose autotuned buffers (prefetch, parallel map and interleave) share at most
  `AUTOTUNE_RAM_BUDGET` bytes: tf.data's default budget is half the machine's RAM, so a stream
  that never fills a cache let those buffers grow with the dataset."""
  options = tf.data.Options()
  options.autotune.ram_budget = AUTOTUNE_RAM_BUDGET
  return dataset.with_options(options)


def shuffle_buffer_size(element: tf.TensorSpec, examples: int) -> int:
  """`examples`, capped so the shuffle buffer holds at most `SHUFFLE_BUFFER_BYTES` of inputs.

  The buffer is memory a run holds whatever its cache: a count alone (10,000 VGG16@300 maps are
  830 MB) would make peak memory grow with the example size. The cap depends on the examples
  only, never on the cache budget, so a run's order is the same wherever its cache lives.
  """
  per_example = max(1, element.shape.num_elements() or 1) * element.dtype.size
  return max(1, min(examples, SHUFFLE_BUFFER_BYTES // per_example))


def make_for_eval(dataset: tf.data.Dataset, *, batch_size: int, cache: str | bool = True,
                  cache_file: str | None = None,
                  num_examples: int | None = None) -> tf.data.Dataset:
  """Per-example dicts -> float32 `(x, y)` batches in record order."""
  return _batched(_examples(dataset, cache=cache, cache_file=cache_file,
                            num_examples=num_examples), batch_size)


def load_arrays(dataset: tf.data.Dataset, keys: tuple[str, ...] = ("x", "y")
                ) -> dict[str, np.ndarray]:
  """Materialises a per-example dataset into numpy arrays (for sweeps and metrics)."""
  columns: dict[str, list[np.ndarray]] = {key: [] for key in keys}
  for batch in dataset.batch(1024).as_numpy_iterator():
    for key in keys:
      columns[key].append(batch[key])
  return {key: np.concatenate(parts) if parts else np.zeros((0,)) for key, parts in columns.items()}


def source_sizes(image_dir: str, split: str) -> dict[bytes, tuple[int, int]] | None:
  """`id -> (height, width)` of the source images of one split of an image dataset.

  Parses only the three small keys (the image bytes are read from disk but never decoded).
  None when the image dataset or its split is unreachable.
  """
  if not image_dir or not datasets.has_manifest(image_dir):
    return None
  try:
    spec = load_spec(image_dir)
    files = datasets.shard_paths(image_dir, spec.manifest, split)
  except ValueError:
    return None
  parse = spec.schema.batch_parser(("id", "height", "width"))
  sizes = {}
  batches = tf.data.TFRecordDataset(files).batch(1024).map(
      parse, num_parallel_calls=tf.data.AUTOTUNE)
  for batch in batches.as_numpy_iterator():
    sizes.update(zip(batch["id"], zip(batch["height"], batch["width"])))
  return sizes


def load_split_images(image_dir: str, split: str = "test") -> dict[str, dict[str, Any]]:
  """`id -> {"image": uint8 HxWx3, "label" | "targets"}` for one split of an image dataset.

  Read through the manifest's shard list (like every reader here), decoded with TF; for the
  report's example grids, so the split is small enough to hold.

  Raises:
    ValueError: no manifest or no such split.
  """
  spec = load_spec(image_dir)
  if split not in spec.splits:
    raise ValueError(f"image dataset {image_dir!r} has no {split!r} split")
  files = datasets.shard_paths(image_dir, spec.manifest, split)
  parse = spec.schema.batch_parser(("id", "image", spec.target_key))
  examples = {}
  for batch in tf.data.TFRecordDataset(files).batch(256).map(parse).as_numpy_iterator():
    for index, identifier in enumerate(batch["id"]):
      image = pixels.decode(batch["image"][index])
      examples[identifier.decode()] = {"image": image.numpy(),
                                       spec.target_key: batch[spec.target_key][index]}
  return examples
