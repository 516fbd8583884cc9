"""Where a worker's backbones live: one copy per SDK process, or one per machine shared by all of
its SDK processes (`headstart extract --share-models machine`, for GPU workers).

    models = model_host.acquire(jobs, jit_compile=False, batch_size=64, sharing="machine",
                                tag="headstart-extract-<run>", handle=shared.Shared())
    copy_id, outputs = models.forward(images_uint8, count)

Dataflow starts one SDK process per vCPU (8 on an n1-standard-8). Per process, 8 processes would
each load every backbone onto the VM's one GPU. With `machine`, the first process to reach
`setup()` builds the models and serves them through Beam's `MultiProcessShared` (what
RunInference's `large_model=True` uses); the others send it their uint8 batches over a local
socket and get the float16 maps back. Decoding, Example encoding and writing stay spread over
every process; one lock makes the shared copy run one batch at a time, so GPU memory holds one
batch's activations, not one per process.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

SHARING_CHOICES = ("process", "machine")
_TAG_PREFIX = "headstart-extract-"


def worker_id() -> str:
  """`host:pid` of this SDK process (the manifest counts records per worker)."""
  return f"{socket.gethostname()}:{os.getpid()}"


def new_run_tag() -> str:
  """A tag unique to one pipeline run: its processes share copies by it, and a later run never
  meets a stale server of an earlier one."""
  return f"{_TAG_PREFIX}{uuid.uuid4().hex[:16]}"


def remove_rendezvous_files(run_tag: str) -> None:
  """Deletes the `.lock`/`.address` files `MultiProcessShared` left in the temp folder for
  this run (local runners share it with the driver; on Dataflow they die with the VM)."""
  # Local files by nature (MultiProcessShared's own rendezvous), hence not tf.io.gfile.
  for path in pathlib.Path(tempfile.gettempdir()).glob(f"{run_tag}*"):
    with contextlib.suppress(OSError):
      path.unlink()


def enable_gpu_memory_growth() -> None:
  """Lets TensorFlow take GPU memory as it needs it instead of all of it at start.

  Without it the first process to touch the GPU reserves nearly all of its memory and any other
  TensorFlow context on the VM fails to allocate. Must run before the first GPU op of the
  process; a process whose GPUs are already initialised keeps its setting.
  """
  os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
  import tensorflow as tf
  for gpu in tf.config.list_physical_devices("GPU"):
    try:
      tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # already initialised in this process
      logging.getLogger(__name__).info("GPU %s already initialised; memory growth unchanged", gpu)


class _DropTfWarnings(logging.Filter):
  """Drops log records containing `fragment` (TensorFlow notices that do not apply here)."""

  def __init__(self, fragment: str):
    super().__init__()
    self._fragment = fragment

  def filter(self, record: logging.LogRecord) -> bool:
    return self._fragment not in record.getMessage()


class LoadedBackbones:
  """The compiled forward of every job, built once (weak-referenceable, as `Shared` requires).

  Attributes:
    copy_id: `host:pid:object` of this copy; the manifest counts distinct copies that ran.
  """

  def __init__(self, jobs: Sequence[Any], jit_compile: bool, batch_size: int):
    import tensorflow as tf

    from features import forward as forward_lib
    enable_gpu_memory_growth()
    self._jobs = list(jobs)
    self._lock = threading.Lock()
    self.forwards = {}
    # One tf.function per backbone, each traced once: TF's "N calls triggered retracing"
    # warning counts these as retraces of one function, so it is muted while warming up.
    retracing_filter = _DropTfWarnings("triggered tf.function retracing")
    tf.get_logger().addFilter(retracing_filter)
    try:
      for job in self._jobs:
        function = forward_lib.load_forward(job, jit_compile=jit_compile)
        # Trace (and XLA-compile, at the one padded batch shape) now, so per-batch timings and
        # the first bundle do not carry the one-off compilation.
        warmup = batch_size if jit_compile else 1
        side = forward_lib.stored_size(job)
        function(tf.zeros((warmup, side, side, 3), tf.uint8))
        self.forwards[job.tag] = function
    finally:
      tf.get_logger().removeFilter(retracing_filter)
    self.copy_id = f"{worker_id()}:{id(self):x}"

  def forward(self, images: np.ndarray, count: int) -> tuple[str, dict[str, tuple]]:
    """Every backbone on one uint8 batch (rows past `count` are XLA padding, dropped).

    Returns:
      (copy_id, {job tag: (float16 maps, float32 pooled, health sums, forward seconds)}).
    """
    import tensorflow as tf
    outputs = {}
    with self._lock:  # one batch at a time on the device, whichever process sent it
      tensor = tf.constant(images)  # one host->device copy shared by every backbone
      for job in self._jobs:
        start = time.perf_counter()
        maps, pooled, sums = self.forwards[job.tag](tensor)
        outputs[job.tag] = (maps.numpy()[:count], pooled.numpy()[:count], sums.numpy()[:count],
                            time.perf_counter() - start)
    return self.copy_id, outputs


def acquire(jobs: Sequence[Any], *, jit_compile: bool, batch_size: int, sharing: str, tag: str,
            handle: Any) -> Any:
  """This process's handle on the backbones: built here, or reached in the process serving them.

  Args:
    jobs: the `FeatureJob`s of one input size.
    sharing: `process` (a copy per SDK process, through the `Shared` `handle`) or `machine`
      (one copy per machine through `MultiProcessShared`, reached over a local socket).
    tag: unique per pipeline run and job set: processes with the same tag share one copy.

  Raises:
    ValueError: unknown `sharing`, or a backbone cannot be built here (e.g. missing weights).
  """
  if sharing not in SHARING_CHOICES:
    raise ValueError(f"--share-models {sharing!r} is not one of {', '.join(SHARING_CHOICES)}")

  def build() -> LoadedBackbones:
    return LoadedBackbones(jobs, jit_compile, batch_size)

  if sharing == "process":
    return handle.acquire(build, tag=tag)
  from apache_beam.utils import multi_process_shared
  # always_proxy: the hosting process calls through the socket too, so every caller gets the
  # same locking and the object never runs on a Beam bundle thread directly (as large_model).
  return multi_process_shared.MultiProcessShared(build, tag=tag, always_proxy=True).acquire()
