"""R5 (caching pay-off) and R6 (head input efficiency).

    python -m benchmarks --quick        # R5/R6 lines

R5: one epoch of the same head trained end to end through the frozen backbone (images read by
`heads.reader`, backbone rebuilt by `features.backbones.load_backbone_for_features`) over one
epoch trained from the cached features (`heads.reader` -> `make_for_train`). Both are timed on
their second epoch (the first traces the graph and fills the cache); the end-to-end epoch runs
on a subset of the train split and is compared per example.
R6: head-training examples/s through the real tf.data pipeline over the same features
preloaded in memory (the faster of in-memory tensors through `from_tensor_slices` and Keras'
`fit(x, y)` on numpy arrays), from the second epoch on.
"""
from __future__ import annotations

import statistics
import time
from typing import Any


from benchmarks import measure

R5_HEADS = ("gap_dense", "conv")


class _EpochSeconds:
  """Keras callback factory: wall seconds per epoch (keras imported lazily)."""

  @staticmethod
  def make():
    """A new callback instance recording wall and CPU seconds per epoch."""
    import keras

    class EpochSeconds(keras.callbacks.Callback):
      """Wall and CPU seconds of every epoch."""

      def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = self._cpu = 0.0

      def on_epoch_begin(self, epoch, logs=None):
        self._start, self._cpu = time.perf_counter(), time.process_time()

      def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu_seconds.append(time.process_time() - self._cpu)

    return EpochSeconds()


def _compiled_head(head: str, spec: Any, *, backbone: Any = None) -> Any:
  """The zoo head (default config) compiled like `headstart train`; optionally after a backbone."""
  import keras

  from heads import config as config_lib
  from heads import training, zoo
  keras.utils.set_random_seed(0)
  model = zoo.build_head(head, spec, config_lib.HeadConfig())
  if backbone is not None:
    inputs = keras.Input(backbone.input_shape[1:], name="image")
    model = keras.Model(inputs, model(backbone(inputs, training=False)), name=f"e2e_{head}")
  training.compile_head(model, spec.task, keras.optimizers.Adam(1e-3))
  return model


def _fit_epoch_seconds(model: Any, dataset: Any, epochs: int, cpu: list[float] | None = None,
                       **fit_args) -> list[float]:
  """Wall seconds per epoch of `model.fit`; CPU seconds per epoch are appended to `cpu`."""
  timer = _EpochSeconds.make()
  fit_args.setdefault("shuffle", False)  # tf.data inputs shuffle themselves
  model.fit(dataset, epochs=epochs, verbose=0, callbacks=[timer], **fit_args)
  if cpu is not None:
    cpu.extend(timer.cpu_seconds)
  return timer.seconds


def reader_train_dataset(spec: Any, input_kind: str, batch_size: int, limit: int | None = None
                         ) -> tuple[Any, int]:
  """The real `headstart train` input: read_split -> (take) -> make_for_train; and its size."""
  from heads import reader
  records = reader.read_split(spec, "train", input_kind=input_kind)
  count = reader.count_examples(spec, "train")
  if limit is not None and limit < count:
    records, count = records.take(limit), limit
  return reader.make_for_train(records, batch_size=batch_size, shuffle_buffer=10_000, seed=0,
                               num_examples=count), count


def cached_epoch_seconds_per_example(feature_dir: str, head: str, batch_size: int,
                                     epochs: int) -> tuple[float, list[float], int]:
  """Median seconds per example of epochs 2.. training `head` from the cached features."""
  if epochs < 2:
    raise ValueError(f"epochs must be >= 2 (the first epoch fills the cache), got {epochs!r}")
  from heads import reader
  spec = reader.load_spec(feature_dir)
  dataset, count = reader_train_dataset(spec, "map", batch_size)
  seconds = _fit_epoch_seconds(_compiled_head(head, spec), dataset, epochs)
  return statistics.median(seconds[1:]) / count, seconds, count


def end_to_end_seconds_per_example(feature_dir: str, head: str, batch_size: int,
                                   images: int) -> tuple[float, list[float], int]:
  """Seconds per example of the second epoch training `head` through the frozen backbone."""
  from features import backbones
  from heads import reader
  spec = reader.load_spec(feature_dir)
  backbone = backbones.load_backbone_for_features(feature_dir, spec.manifest)
  backbone.trainable = False
  image_spec = reader.load_spec(spec.manifest["image_dataset"])
  dataset, count = reader_train_dataset(image_spec, "image", batch_size, limit=images)
  seconds = _fit_epoch_seconds(_compiled_head(head, spec, backbone=backbone), dataset, 2)
  return seconds[1] / count, seconds, count


def r5(feature_dir: str, *, batch_size: int, e2e_images: int, cached_epochs: int,
       input_size: int, quick: bool) -> measure.Ratio:
  """R5 judged on `gap_dense`; `conv` reported in details."""
  per_head = {}
  for head in R5_HEADS:
    e2e, e2e_epochs, e2e_count = end_to_end_seconds_per_example(feature_dir, head, batch_size,
                                                                e2e_images)
    cached, cached_epochs_s, cached_count = cached_epoch_seconds_per_example(
        feature_dir, head, batch_size, cached_epochs)
    per_head[head] = {"end_to_end_examples_per_second": 1 / e2e,
                      "cached_examples_per_second": 1 / cached, "ratio": e2e / cached,
                      "end_to_end_epoch_seconds": e2e_epochs, "end_to_end_examples": e2e_count,
                      "cached_epoch_seconds": cached_epochs_s, "cached_examples": cached_count}
  gap = per_head["gap_dense"]
  return measure.Ratio(
      "R5", "caching pay-off (VGG16, gap_dense)", gap["ratio"],
      measure.Figure(f"cached-feature epoch (VGG16@{input_size} maps)",
                     gap["cached_examples_per_second"], "ex/s"),
      measure.Figure("end-to-end epoch through frozen VGG16", gap["end_to_end_examples_per_second"],
                     "ex/s"),
      200.0, ">=", details=per_head,
      notes=("ratio of epoch times per example (second epochs); "
             + (f"--quick uses {input_size}px input (full run: 300px)" if quick else
                f"{input_size}px input")))


def in_memory_dataset(x: Any, y: Any, batch_size: int) -> Any:
  """The ideal input: tensors already in memory, shuffled every epoch, batched, prefetched."""
  import tensorflow as tf
  return (tf.data.Dataset.from_tensor_slices((x, y))
          .shuffle(len(x), seed=0, reshuffle_each_iteration=True)
          .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def r6(feature_dir: str, *, head: str, batch_size: int, epochs: int,
       passes: int = 1, rounds: int = 2) -> measure.Ratio:
  """R6: reader pipeline vs the same features preloaded in memory, same head, epochs 2..

  The in-memory side is the faster of `tf.data.Dataset.from_tensor_slices` over preloaded
  tensors and Keras' own `fit(x, y)` on numpy arrays; epoch 1 is reported in details. With
  `passes` > 1 each timed Keras epoch makes that many passes over the data (`repeat`), so a
  small dataset's epoch is long enough to time on a shared CPU; the reader's cache still
  fills during the first pass only. The three sides are measured `rounds` times, interleaved
  (reader, tensors, numpy, then again), each side's fastest round counting, as R8 does: with
  ~0.1 s epochs, this machine's drift between the reader's epochs and the in-memory ones moved
  the ratio by 0.2 (reader epochs 0.145 -> 0.088 s within one run).
  """
  if epochs < 2 or passes < 1 or rounds < 1:
    raise ValueError(f"need epochs >= 2, passes >= 1 and rounds >= 1, got {epochs!r}, "
                     f"{passes!r}, {rounds!r}")
  from heads import reader, zoo
  spec = reader.load_spec(feature_dir)
  kind = zoo.input_kind(head)
  dataset, count = reader_train_dataset(spec, kind, batch_size)
  dataset, count = dataset.repeat(passes), count * passes
  arrays = reader.load_arrays(reader.read_split(spec, "train", input_kind=kind))
  memory_count = len(arrays["x"]) * passes
  real, tensors, numpy_fit, real_cpu, tensors_cpu = [], [], [], [], []
  for _ in range(rounds):
    real_cpu.append([])
    real.append(_fit_epoch_seconds(_compiled_head(head, spec), dataset, epochs, real_cpu[-1]))
    tensors_cpu.append([])
    tensors.append(_fit_epoch_seconds(
        _compiled_head(head, spec),
        in_memory_dataset(arrays["x"], arrays["y"], batch_size).repeat(passes), epochs,
        tensors_cpu[-1]))
    # Keras' numpy path has no repeat; its epoch is one pass.
    numpy_fit.append(_fit_epoch_seconds(_compiled_head(head, spec), arrays["x"], epochs,
                                        y=arrays["y"], batch_size=batch_size, shuffle=True))

  def best(rounds_seconds: list[list[float]]) -> float:
    return min(statistics.median(seconds[1:]) for seconds in rounds_seconds)

  real_rate = count / best(real)
  tensor_rate = memory_count / best(tensors)
  numpy_rate = len(arrays["x"]) / best(numpy_fit)
  memory_rate = max(tensor_rate, numpy_rate)
  return measure.Ratio(
      "R6", f"head input efficiency ({head})", real_rate / memory_rate,
      measure.Figure("heads.reader pipeline", real_rate, "ex/s"),
      measure.Figure("features preloaded in memory", memory_rate, "ex/s"),
      0.95, ">=",
      details={"examples": count, "rounds": rounds, "epoch_seconds_reader": real,
               "epoch_seconds_in_memory_tensors": tensors,
               "epoch_seconds_keras_numpy_fit": numpy_fit,
               "in_memory_tensors_examples_per_second": tensor_rate,
               "keras_numpy_fit_examples_per_second": numpy_rate,
               "passes_per_epoch": passes,
               # The first round's first epochs: the reader fills its cache there.
               "epoch1_ratio": (count / real[0][0]) / (memory_count / tensors[0][0]),
               # CPU seconds per epoch (2..): less sensitive to other jobs on a shared CPU.
               "cpu_time_ratio_vs_tensors": (best(tensors_cpu) / memory_count)
               / (best(real_cpu) / count),
               "epoch_cpu_seconds_reader": real_cpu, "epoch_cpu_seconds_tensors": tensors_cpu,
               "feature_map_shape": list(spec.feature_map_shape or ())},
      notes=(f"median of epochs 2..{epochs} ({passes} passes each), batch {batch_size}, the "
             f"faster of {rounds} interleaved rounds per side; "
             "in-memory side: the faster of from_tensor_slices(tensors) and Keras fit(numpy)"))
