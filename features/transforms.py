"""Beam DoFns and composite PTransforms of stage 2: read image records, decode once, run every
backbone on the same batch, write one TFDS feature dataset per backbone.

    headstart extract --images out/images --out out/features --backbones vgg16,mobilenet_v2

Models are built in `DoFn.setup()` through a `Shared` handle (once per worker process, however
many threads), and run batched through a compiled `tf.function` (optionally XLA), never a
per-image `predict`.
"""
from __future__ import annotations

import concurrent.futures
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from contracts import layout, progress
from contracts import schema as schema_lib
from features import health as health_lib
from features import jobs as jobs_lib
from features import records
from features import views as views_lib
from pipeline import sinks


DEAD_LETTERS = "dead_letters"


class ReadShardFn(beam.DoFn):
  """(shard path, record count from the manifest) -> (shard file name, serialized image Example).

  A damaged shard is an infrastructure problem, not a data one: it fails the job, naming the
  file (and, for a CRC error, the offset), instead of silently dropping records.
  """

  def __init__(self):
    super().__init__()
    self._records = beam.metrics.Metrics.counter("extract", "image_records_read")

  def setup(self):
    import tensorflow as tf
    # tf_record_iterator is marked deprecated in favour of tf.data; it is chosen on purpose
    # (see `process`), so its one-time notice would only mislead the user. One filter object
    # for the process: addFilter ignores it when the logger already has it.
    tf.get_logger().addFilter(_RECORD_ITERATOR_NOTICE)

  def process(self, shard: tuple[str, int]) -> Iterator[tuple[str, bytes]]:
    import tensorflow as tf
    path, expected = shard
    name = path.rsplit("/", 1)[-1]
    count = 0
    try:
      # A plain record reader, not tf.data: a suspended tf.data iterator on this thread while
      # RunBackbonesFn's forward thread runs the backbone stalled the job for up to 35 s at a
      # time with idle cores (MobileNetV2@224 on 5000 images: 114 s; 70 s with this reader).
      for serialized in tf.compat.v1.io.tf_record_iterator(path):
        count += 1
        self._records.inc()
        yield name, serialized
    except tf.errors.DataLossError as error:
      # TF's message wraps "corrupted record at <offset>" in op-internal noise; keep the offset.
      found = re.search(r"corrupted record at \d+|truncated record at \d+", error.message)
      raise ValueError(f"image shard {path!r} is corrupt after {count} records "
                       f"({found.group(0) if found else error.message}); run `headstart verify` "
                       "on the image dataset or re-run ingest") from None
    if count != expected:
      raise ValueError(f"image shard {path!r} holds {count} records but its manifest says "
                       f"{expected}; the image dataset changed or is damaged (headstart verify)")


class ReadImageRecords(beam.PTransform):
  """(shard path, record count) from the image manifest (never a glob) -> (shard file name,
  serialized image Example).

  Shards, not records, are spread over workers: reading then fuses with decoding, inference and
  writing, so records stream through instead of being materialised between stages (Beam's
  ReadAllFromTFRecord reshuffles every record, which the local runner holds in memory).
  """

  def __init__(self, shards: Sequence[tuple[str, int]]):
    super().__init__()
    self._shards = [tuple(shard) for shard in shards]

  def expand(self, root):
    return (root
            | "ListShards" >> beam.Create(self._shards)
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadShards" >> beam.ParDo(ReadShardFn()))


def dead_letter(reason: str, row: Mapping[str, Any], message: str) -> dict[str, Any]:
  """One `errors.jsonl` entry of stage 2."""
  return {"stage": "extract", "reason": reason, "row": dict(row), "message": message}


class DecodeImageFn(beam.DoFn):
  """(shard file name, serialized image Example) -> ImageRecord at the input size, plus
  augmented views 1..K of train images; unusable records -> `dead_letters` (never raised)."""

  def __init__(self, image_schema: schema_lib.Schema, input_size: int, views: int, seed: int,
               image_size: int | None = None):
    super().__init__()
    self._image_schema = image_schema
    self._input_size = input_size
    self._image_size = image_size
    self._views = views
    self._seed = seed
    self._decoded = beam.metrics.Metrics.counter("extract", "images_decoded")
    self._augmented = beam.metrics.Metrics.counter("extract", "views_augmented")
    self._dead = beam.metrics.Metrics.counter("extract", "records_dead_lettered")

  def process(self, element: tuple[str, bytes]) -> Iterator[Any]:
    shard, serialized = element
    split = layout.split_of_shard(shard)
    record_id = None
    try:
      fields = records.parse_image_example(serialized, self._image_schema)
      record_id = fields["id"]
      image = records.decode_image(fields["image"], self._input_size, self._image_size)
    except records.RecordError as error:
      self._dead.inc()
      yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(
          error.reason, {"shard": shard, "split": split, "id": record_id}, str(error)))
    else:
      self._decoded.inc()
      yield from self._with_views(fields, split, image)

  def _with_views(self, fields: Mapping[str, Any], split: str,
                  image: np.ndarray) -> Iterator[records.ImageRecord]:
    yield records.ImageRecord(fields["id"], split, 0, image, fields["label"], fields["targets"])
    # Augmented views exist only for train (readers skip view > 0 elsewhere).
    for view in range(1, self._views + 1 if split == "train" else 1):
      targets = fields["targets"]
      if targets is not None:
        targets = views_lib.augment_targets(targets, fields["id"], view, self._seed)
      self._augmented.inc()
      yield records.ImageRecord(
          fields["id"], split, view,
          views_lib.augment_image(image, fields["id"], view, self._seed), fields["label"], targets)


class _LoadedBackbones:
  """The compiled forward functions of every job, built once per process (weak-referenceable,
  as `Shared` requires)."""

  def __init__(self, jobs: Sequence[jobs_lib.FeatureJob], jit_compile: bool, batch_size: int):
    import tensorflow as tf

    from features import forward as forward_lib
    self.forwards = {}
    # One tf.function per backbone, each traced once: TF's "N calls triggered retracing"
    # warning counts these as retraces of one function, so it is muted while warming up.
    retracing_filter = _DropTfWarnings("triggered tf.function retracing")
    tf.get_logger().addFilter(retracing_filter)
    try:
      for job in jobs:
        function = forward_lib.load_forward(job, jit_compile=jit_compile)
        # Trace (and XLA-compile, at the one padded batch shape) now, so per-batch timings and
        # the first bundle do not carry the one-off compilation.
        warmup = batch_size if jit_compile else 1
        function(tf.zeros((warmup, job.input_size, job.input_size, 3), tf.uint8))
        self.forwards[job.tag] = function
    finally:
      tf.get_logger().removeFilter(retracing_filter)


class _DropTfWarnings(logging.Filter):
  """Drops log records containing `fragment` (TensorFlow notices that do not apply here)."""

  def __init__(self, fragment: str):
    super().__init__()
    self._fragment = fragment

  def filter(self, record: logging.LogRecord) -> bool:
    return self._fragment not in record.getMessage()


_RECORD_ITERATOR_NOTICE = _DropTfWarnings("tf_record_iterator (from")


class RunBackbonesFn(beam.DoFn):
  """Batch of ImageRecords -> per backbone tag: (split, serialized feature Example), and
  `health_<tag>`: partial health sums of the batch.

  The forward of batch k runs on a background thread while this bundle's thread goes back to
  decoding the images of batch k+1 (TensorFlow and OpenCV both release the GIL); batch k's
  outputs are emitted when batch k+1 arrives, or at the end of the bundle. Without the overlap
  decoding and forward ran one after the other: MobileNetV2@96 extracted at 0.51 of its bare
  forward rate.
  """

  def __init__(self, jobs: Sequence[jobs_lib.FeatureJob], *, batch_size: int, jit_compile: bool,
               shared_handle: shared.Shared):
    super().__init__()
    self._jobs = list(jobs)
    self._batch_size = batch_size
    self._jit_compile = jit_compile
    self._shared_handle = shared_handle
    self._loaded = None
    self._batches = beam.metrics.Metrics.counter("extract", "batches")

  def setup(self):
    tag = "|".join(f"{job.tag}:{job.cache_key}" for job in self._jobs)
    self._loaded = self._shared_handle.acquire(
        lambda: _LoadedBackbones(self._jobs, self._jit_compile, self._batch_size), tag=tag)
    self._schemas = {job.tag: job.schema() for job in self._jobs}
    # One thread: forwards stay in batch order and at most one waits behind the running one.
    self._forward_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="forward")

  def start_bundle(self):
    self._pending = None  # (future of batch k's outputs, timestamp, windows)

  def process(self, batch: Sequence[records.ImageRecord], timestamp=beam.DoFn.TimestampParam,
              window=beam.DoFn.WindowParam) -> Iterator[Any]:
    self._batches.inc()
    progress.report("extract", advance=sum(record.view == 0 for record in batch), unit="img")
    previous = self._pending
    self._pending = (self._forward_pool.submit(self._run, list(batch)), timestamp, (window,))
    if previous is not None:
      yield from self._emit(*previous)

  def finish_bundle(self) -> Iterator[Any]:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      yield from self._emit(*pending)

  def teardown(self):
    self._forward_pool.shutdown(wait=True)

  @staticmethod
  def _emit(future: concurrent.futures.Future, timestamp, windows) -> Iterator[Any]:
    # Explicit windowed values: finish_bundle has no current element to take them from.
    for tag, value in future.result():
      yield beam.pvalue.TaggedOutput(tag, WindowedValue(value, timestamp, windows))

  def _run(self, batch: list[records.ImageRecord]) -> list[tuple[str, Any]]:
    """Forward of every backbone on one batch -> [(output tag, value)], on the forward thread."""
    import tensorflow as tf
    images = np.stack([record.image for record in batch])
    count = len(batch)
    if self._jit_compile and count < self._batch_size:
      # XLA compiles once per shape: pad the last batch instead of compiling a second program.
      images = np.concatenate([images, np.zeros((self._batch_size - count, *images.shape[1:]),
                                                images.dtype)])
    tensor = tf.constant(images)  # one host->device copy shared by every backbone
    outputs = []
    for job in self._jobs:
      start = time.perf_counter()
      maps, pooled, sums = self._loaded.forwards[job.tag](tensor)
      maps, pooled, sums = maps.numpy()[:count], pooled.numpy()[:count], sums.numpy()[:count]
      seconds = time.perf_counter() - start
      outputs.append((f"health_{job.tag}", health_lib.health_from_sums(
          sums, int(np.prod(maps.shape[1:])), seconds)))
      schema = self._schemas[job.tag]
      outputs.extend((job.tag, (record.split, records.encode_feature_record(
          schema, record, maps[index], pooled[index]))) for index, record in enumerate(batch))
    return outputs


class MergeHealthFn(beam.CombineFn):
  """Partial health sums -> one accumulator (exact and order-free: only sums)."""

  def create_accumulator(self) -> dict[str, float]:
    return health_lib.empty_health()

  def add_input(self, accumulator, element):
    return health_lib.merge_health(accumulator, element)

  def merge_accumulators(self, accumulators: Iterable[Mapping[str, float]]):
    total = health_lib.empty_health()
    for accumulator in accumulators:
      total = health_lib.merge_health(total, accumulator)
    return total

  def extract_output(self, accumulator):
    return accumulator


def _finalize(shards: list[dict[str, Any]], health: Mapping[str, float],
              dead_letters: list[dict[str, Any]], input_records: int,
              job: jobs_lib.FeatureJob) -> str:
  jobs_lib.finalize(shards, health, job, dead_letters=dead_letters, input_records=input_records)
  return job.out_dir


class WriteFeatureDataset(beam.PTransform):
  """((split, serialized feature Example), partial health sums, dead letters, input record
  count) -> the dataset directory, once its shards, `errors.jsonl`, TFDS metadata and (last)
  manifest are written."""

  def __init__(self, job: jobs_lib.FeatureJob):
    super().__init__()
    self._job = job

  def expand(self, pcolls):
    features, health, dead_letters, input_count = pcolls
    shards = features | "WriteSplits" >> sinks.WriteSplits(self._job.out_dir,
                                                                layout.FEATURES_NAME)
    merged = health | "MergeHealth" >> beam.CombineGlobally(MergeHealthFn())
    return (shards
            | "CollectShards" >> beam.combiners.ToList()
            | "WriteManifest" >> beam.Map(
                _finalize, health=beam.pvalue.AsSingleton(merged),
                dead_letters=beam.pvalue.AsSingleton(dead_letters),
                input_records=beam.pvalue.AsSingleton(input_count), job=self._job))


class ExtractFeatures(beam.PTransform):
  """(split, serialized image Example) -> one written feature dataset per job of one input size."""

  def __init__(self, jobs: Sequence[jobs_lib.FeatureJob], *, batch_size: int, views: int,
               seed: int, jit_compile: bool):
    super().__init__()
    self._jobs = list(jobs)
    self._batch_size = batch_size
    self._views = views
    self._seed = seed
    self._jit_compile = jit_compile

  def expand(self, image_records):
    input_size = self._jobs[0].input_size
    # Every job reads the same image dataset; its stored side (0 if unrecorded) is checked.
    image_size = self._jobs[0].image_info.get("image_size")
    tags = [job.tag for job in self._jobs]
    decoded = image_records | "DecodeImages" >> beam.ParDo(DecodeImageFn(
        self._jobs[0].image_schema(), input_size, self._views, self._seed, image_size)).with_outputs(
            DEAD_LETTERS, main="images")
    dead_letters = decoded[DEAD_LETTERS] | "CollectDeadLetters" >> beam.combiners.ToList()
    input_count = image_records | "CountRecords" >> beam.combiners.Count.Globally()
    outputs = (
        decoded["images"]
        | "BatchImages" >> beam.BatchElements(min_batch_size=self._batch_size,
                                              max_batch_size=self._batch_size)
        | "RunBackbones" >> beam.ParDo(RunBackbonesFn(
            self._jobs, batch_size=self._batch_size, jit_compile=self._jit_compile,
            shared_handle=shared.Shared())).with_outputs(*tags, *[f"health_{t}" for t in tags]))
    return [(outputs[job.tag], outputs[f"health_{job.tag}"], dead_letters, input_count)
            | f"WriteFeatures[{job.dir_name}]" >> WriteFeatureDataset(job) for job in self._jobs]
