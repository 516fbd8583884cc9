"""Beam DoFns and composite PTransforms of stage 2: read image records, decode once, run every
backbone on the same batch, write one TFDS feature dataset per backbone.

    headstart extract --images out/images --out out/features --backbones vgg16,mobilenet_v2

Work is spread by record ranges of the image shards, not whole shards, so more workers than
shards have work. Models are built in `DoFn.setup()` once per worker process, or once per
machine with `--share-models machine` (`features/model_host.py`), and run batched through a
compiled `tf.function` (optionally XLA), never a per-image `predict`.
"""
from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from contracts import layout, progress, statistics
from contracts import schema as schema_lib
from features import health as health_lib
from features import jobs as jobs_lib
from features import model_host, records
from features import views as views_lib
from pipeline import sharding, sinks


DEAD_LETTERS = "dead_letters"


class ReadRangeFn(beam.DoFn):
  """(shard path, start, stop, records in the shard) -> (shard file name, serialized image
  Example) for records [start, stop).

  A damaged shard is an infrastructure problem, not a data one: it fails the job, naming the
  file and the byte offset, instead of silently dropping records.
  """

  def __init__(self):
    super().__init__()
    self._records = beam.metrics.Metrics.counter("extract", "image_records_read")

  def process(self, record_range: tuple[str, int, int, int]) -> Iterator[tuple[str, bytes]]:
    path, start, stop, expected = record_range
    name = path.rsplit("/", 1)[-1]
    for serialized in sharding.read_range(path, start, stop, expected):
      self._records.inc()
      yield name, serialized


class ReadImageRecords(beam.PTransform):
  """(shard path, record count) from the image manifest (never a glob) -> (shard file name,
  serialized image Example).

  Each shard is cut into record ranges of at most `records_per_range` and the ranges, not the
  records, are spread over workers (a Reshuffle of a few small tuples): N workers have work with
  fewer than N shards, while reading still fuses with decoding, inference and writing, so
  records stream through instead of being materialised between stages.
  """

  def __init__(self, shards: Sequence[tuple[str, int]], records_per_range: int):
    super().__init__()
    self._ranges = sharding.record_ranges([tuple(shard) for shard in shards], records_per_range)

  def expand(self, root):
    return (root
            | "ListRanges" >> beam.Create(self._ranges)
            | "SpreadRanges" >> beam.Reshuffle()
            | "ReadRanges" >> beam.ParDo(ReadRangeFn()))


def dead_letter(reason: str, row: Mapping[str, Any], message: str) -> dict[str, Any]:
  """One `errors.jsonl` entry of stage 2."""
  return {"stage": "extract", "reason": reason, "row": dict(row), "message": message}


class DecodeImageFn(beam.DoFn):
  """(shard file name, serialized image Example) -> ImageRecord at the stored size (the forward
  resizes it to the input size), plus augmented views 1..K of train images; unusable records ->
  `dead_letters` (never raised)."""

  def __init__(self, image_schema: schema_lib.Schema, views: int, seed: int,
               image_size: int | None = None):
    super().__init__()
    self._image_schema = image_schema
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
      image = records.decode_stored(fields["image"], self._image_size)
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


USAGE = "usage"


class RunBackbonesFn(beam.DoFn):
  """Batch of ImageRecords -> per backbone tag: (split, serialized feature Example);
  `health_<tag>`: partial health sums of the batch; `usage`: (worker, model copy, records).

  The forward of batch k runs on a background thread while this bundle's thread goes back to
  decoding the images of batch k+1 (TensorFlow and OpenCV both release the GIL); batch k's
  outputs are emitted when batch k+1 arrives, or at the end of the bundle. Without the overlap
  decoding and forward ran one after the other: MobileNetV2@96 extracted at 0.51 of its bare
  forward rate.
  """

  def __init__(self, jobs: Sequence[jobs_lib.FeatureJob], *, batch_size: int, jit_compile: bool,
               sharing: str, tag: str, shared_handle: shared.Shared):
    super().__init__()
    self._jobs = list(jobs)
    self._batch_size = batch_size
    self._jit_compile = jit_compile
    self._sharing = sharing
    self._tag = tag
    self._shared_handle = shared_handle
    self._models = None
    self._batches = beam.metrics.Metrics.counter("extract", "batches")

  def setup(self):
    # Before any TensorFlow op of this process: the GPU is shared with the VM's other processes.
    model_host.enable_gpu_memory_growth()
    # Builds (or reaches) the backbones before any image is read: missing weights fail here.
    self._models = model_host.acquire(
        self._jobs, jit_compile=self._jit_compile, batch_size=self._batch_size,
        sharing=self._sharing, tag=self._tag, handle=self._shared_handle)
    self._worker = model_host.worker_id()
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
    images = np.stack([record.image for record in batch])
    count = len(batch)
    if self._jit_compile and count < self._batch_size:
      # XLA compiles once per shape: pad the last batch instead of compiling a second program.
      images = np.concatenate([images, np.zeros((self._batch_size - count, *images.shape[1:]),
                                                images.dtype)])
    started = time.time()  # wall clock: spans are compared across processes and machines
    copy_id, results = self._models.forward(images, count)
    outputs: list[tuple[str, Any]] = []
    for job in self._jobs:
      maps, pooled, sums, seconds = results[job.tag]
      outputs.append((f"health_{job.tag}", health_lib.health_from_sums(
          sums, int(np.prod(maps.shape[1:])), seconds)))
      outputs.extend((f"stats_{job.tag}", partial)
                     for partial in statistics_partials(batch, pooled[:count]))
      schema = self._schemas[job.tag]
      outputs.extend((job.tag, (record.split, records.encode_feature_record(
          schema, record, maps[index], pooled[index]))) for index, record in enumerate(batch))
    outputs.append((USAGE, (self._worker, copy_id, count, started, time.time())))
    return outputs


def statistics_partials(batch: Sequence[records.ImageRecord], pooled: np.ndarray
                        ) -> list[tuple[str, statistics.Accumulator]]:
  """(split, partial statistics) of one batch: what heads need before `fit` (see
  `contracts.statistics`), accumulated while the features are extracted."""
  partials = []
  for split in sorted({record.split for record in batch}):
    rows = [index for index, record in enumerate(batch) if record.split == split]
    labels = [batch[i].label for i in rows]
    targets = [batch[i].targets for i in rows]
    partials.append((split, statistics.Accumulator.empty().add(
        pooled=pooled[rows],
        labels=None if any(label is None for label in labels) else np.asarray(labels),
        targets=None if any(t is None for t in targets) else np.stack(targets),
        views=np.asarray([batch[i].view for i in rows]))))
  return partials


class MergeStatisticsFn(beam.CombineFn):
  """(split, partial statistics) -> the `statistics` block of the feature manifest."""

  def create_accumulator(self) -> dict[str, statistics.Accumulator]:
    return {}

  def add_input(self, accumulator, element):
    split, partial = element
    return {**accumulator, split: accumulator.get(split, statistics.Accumulator.empty()).merge(
        partial)}

  def merge_accumulators(self, accumulators):
    total: dict[str, statistics.Accumulator] = {}
    for accumulator in accumulators:
      for split, partial in accumulator.items():
        total = self.add_input(total, (split, partial))
    return total

  def extract_output(self, accumulator) -> dict[str, Any]:
    return statistics.finish(accumulator)


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


class SummarizeUsageFn(beam.CombineFn):
  """(worker, model copy, records, batch start, batch end) per batch -> for the manifest:
  `workers` ({worker: records}), `model_copies` (distinct backbone copies that ran),
  `model_sharing`, and `processing_seconds`, from the first batch's forward to the last batch's
  outputs over all workers (worker start-up and model builds excluded)."""

  def __init__(self, sharing: str):
    super().__init__()
    self._sharing = sharing

  def create_accumulator(self) -> tuple[dict[str, int], set[str], float, float]:
    return {}, set(), float("inf"), float("-inf")

  def add_input(self, accumulator, element):
    return self.merge_accumulators([accumulator, ({element[0]: element[2]}, {element[1]},
                                                  element[3], element[4])])

  def merge_accumulators(self, accumulators):
    workers, copies, first, last = self.create_accumulator()
    for other_workers, other_copies, other_first, other_last in accumulators:
      for worker, count in other_workers.items():
        workers[worker] = workers.get(worker, 0) + count
      copies |= other_copies
      first, last = min(first, other_first), max(last, other_last)
    return workers, copies, first, last

  def extract_output(self, accumulator) -> dict[str, Any]:
    workers, copies, first, last = accumulator
    return {"model_sharing": self._sharing, "model_copies": len(copies),
            "workers": dict(sorted(workers.items())),
            "processing_seconds": round(last - first, 3) if copies else None}


def _finalize(shards: list[dict[str, Any]], health: Mapping[str, float],
              dead_letters: list[dict[str, Any]], input_records: int, usage: Mapping[str, Any],
              stats: Mapping[str, Any], job: jobs_lib.FeatureJob) -> str:
  jobs_lib.finalize(shards, health, job, dead_letters=dead_letters, input_records=input_records,
                    usage=usage, statistics=stats)
  return job.out_dir


class WriteFeatureDataset(beam.PTransform):
  """((split, serialized feature Example), partial health sums, partial statistics, dead
  letters, input record count, usage summary) -> the dataset directory, once its shards, `errors.jsonl`, TFDS metadata
  and (last) manifest are written. Shards follow the image shards' size rule."""

  def __init__(self, job: jobs_lib.FeatureJob):
    super().__init__()
    self._job = job

  def expand(self, pcolls):
    features, health, stats, dead_letters, input_count, usage = pcolls
    shards = features | "WriteSplits" >> sinks.WriteSplits(self._job.out_dir,
                                                           layout.FEATURES_NAME)
    merged = health | "MergeHealth" >> beam.CombineGlobally(MergeHealthFn())
    merged_stats = stats | "MergeStatistics" >> beam.CombineGlobally(MergeStatisticsFn())
    return (shards
            | "CollectShards" >> beam.combiners.ToList()
            | "WriteManifest" >> beam.Map(
                _finalize, health=beam.pvalue.AsSingleton(merged),
                dead_letters=beam.pvalue.AsSingleton(dead_letters),
                input_records=beam.pvalue.AsSingleton(input_count),
                usage=beam.pvalue.AsSingleton(usage),
                stats=beam.pvalue.AsSingleton(merged_stats), job=self._job))


class ExtractFeatures(beam.PTransform):
  """(split, serialized image Example) -> one written feature dataset per job of one input size."""

  def __init__(self, jobs: Sequence[jobs_lib.FeatureJob], *, batch_size: int, views: int,
               seed: int, jit_compile: bool, share_models: str = "process",
               tag: str | None = None):
    super().__init__()
    self._jobs = list(jobs)
    self._batch_size = batch_size
    self._views = views
    self._seed = seed
    self._jit_compile = jit_compile
    self._share_models = share_models
    # Processes of one run share a copy by this tag; a new run never meets a stale server.
    self._tag = tag or model_host.new_run_tag()

  def expand(self, image_records):
    # Every job reads the same image dataset; its stored side (0 if unrecorded) is checked.
    image_size = self._jobs[0].image_info.get("image_size")
    tags = [job.tag for job in self._jobs]
    decoded = image_records | "DecodeImages" >> beam.ParDo(DecodeImageFn(
        self._jobs[0].image_schema(), self._views, self._seed, image_size)).with_outputs(
            DEAD_LETTERS, main="images")
    dead_letters = decoded[DEAD_LETTERS] | "CollectDeadLetters" >> beam.combiners.ToList()
    input_count = image_records | "CountRecords" >> beam.combiners.Count.Globally()
    outputs = (
        decoded["images"]
        | "BatchImages" >> beam.BatchElements(min_batch_size=self._batch_size,
                                              max_batch_size=self._batch_size)
        | "RunBackbones" >> beam.ParDo(RunBackbonesFn(
            self._jobs, batch_size=self._batch_size, jit_compile=self._jit_compile,
            sharing=self._share_models, tag=self._tag,
            shared_handle=shared.Shared())).with_outputs(
                USAGE, *tags, *[f"health_{t}" for t in tags], *[f"stats_{t}" for t in tags]))
    usage = outputs[USAGE] | "SummarizeUsage" >> beam.CombineGlobally(
        SummarizeUsageFn(self._share_models))
    return [(outputs[job.tag], outputs[f"health_{job.tag}"], outputs[f"stats_{job.tag}"],
             dead_letters, input_count, usage)
            | f"WriteFeatures[{job.dir_name}]" >> WriteFeatureDataset(job) for job in self._jobs]
