"""The per-split statistics of a dataset, read from its manifest or made once and kept.

    stats = dataset_stats.load(spec)       # counts, class histogram, pooled mean/variance, ...

Stage 2 writes `statistics` into every feature manifest as it extracts. A dataset without them
(written by an older headstart, or an image dataset for the `scratch` head) gets one streaming
pass here, in bounded memory, whose result is saved as `statistics.json` beside the dataset (or,
when that folder cannot be written, in the local cache folder) and reused by every later run,
so a grid of many cells pays for it once.
"""
from __future__ import annotations

import json
import logging
import tempfile
from typing import Any

import tensorflow as tf

from contracts import datasets
from contracts import statistics as stats_lib

# Records per parse call of the streaming pass (pooled vectors and labels only: small).
_BATCH = 1024


def _sidecar_paths(spec: Any) -> list[str]:
  name = f"{spec.cache_key[:16]}-{stats_lib.STATISTICS_NAME}"
  return [f"{spec.data_dir}/{stats_lib.STATISTICS_NAME}",
          f"{tempfile.gettempdir()}/headstart-cache/{name}"]


def _matches(stats: dict[str, Any], spec: Any) -> bool:
  return (stats.get("format") == stats_lib.FORMAT
          and stats.get("fingerprint") == spec.manifest.get("fingerprint"))


def compute(spec: Any) -> dict[str, Any]:
  """One streaming pass over every split: what stage 2 would have written."""
  keys = [key for key in ("pooled", "label", "targets", "view") if key in spec.schema.names]
  parse = spec.schema.batch_parser(keys)
  by_split = {}
  for split in spec.splits:
    files = datasets.shard_paths(spec.data_dir, spec.manifest, split)
    acc = stats_lib.Accumulator.empty()
    for batch in tf.data.TFRecordDataset(files).batch(_BATCH).map(parse).as_numpy_iterator():
      acc = acc.add(pooled=batch.get("pooled"), labels=batch.get("label"),
                    targets=batch.get("targets"), views=batch.get("view"))
    by_split[split] = acc
  return {**stats_lib.finish(by_split), "fingerprint": spec.manifest.get("fingerprint")}


def load(spec: Any) -> dict[str, Any]:
  """The dataset's statistics: from its manifest, a saved `statistics.json`, or one pass."""
  if spec.manifest.get("statistics"):
    return spec.manifest["statistics"]
  for path in _sidecar_paths(spec):
    if tf.io.gfile.exists(path):
      try:
        saved = datasets.read_json(path)
      except ValueError:
        continue
      if _matches(saved, spec):
        return saved
  logging.getLogger("headstart").info(
      "%s has no statistics (written before headstart computed them in stage 2): one pass "
      "now, saved for later runs", spec.data_dir)
  stats = compute(spec)
  for path in _sidecar_paths(spec):
    try:
      tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
      datasets.write_json(path, stats)
      break
    except (tf.errors.OpError, OSError):
      continue   # a read-only dataset folder: keep it in the local cache folder instead
  return json.loads(json.dumps(stats))
