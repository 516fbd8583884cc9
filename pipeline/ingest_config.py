"""The ingest job's settings and its dead-letter form, shared by every stage-1 DoFn.

    cfg = IngestConfig(image_size=224)
    line = dead_letter("not_found", row, "HTTP 404")     # one errors.jsonl line
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from pipeline import fetch, image_decode, redact

DEAD = "dead"    # the tagged output of dead letters
STATS = "stats"  # the tagged output of (split, label) counts


@dataclasses.dataclass(frozen=True)
class IngestConfig:
  """Everything the ingest transforms need (picklable, shipped to workers)."""
  image_size: int = 300
  resize: str = "stretch"
  image_format: str = "jpeg"
  splits: tuple[tuple[str, float], ...] = (("train", 0.8), ("validation", 0.9), ("test", 1.0))
  background: tuple[int, int, int] = (255, 255, 255)
  max_pixels: int = image_decode.DEFAULT_MAX_PIXELS
  min_side: int = image_decode.DEFAULT_MIN_SIDE
  fetch: fetch.FetchConfig = fetch.FetchConfig()
  fetch_threads: int = 16      # threads reading files (local, gs://) and a gs:// download cache
  # Rows being fetched at once per bundle (decoding ones aside). Little's law: a worker that
  # ingests ~3,000 small images/s needs 300 downloads under way to hide 100 ms per response;
  # 256 capped it at ~2,100 images/s (HTTP benchmark, 64 hosts: 2,129 vs 2,622 with 512).
  max_in_flight: int = 512
  # Bytes a worker process holds for rows in flight. 64 MiB: 512 rows of 10 KB photos or ~60
  # of 1 MB ones keep a worker busy; 256 MiB grew the quick R3 run's RSS by 211 MB (18 %) between
  # 200 and 1000 large photos before the cap bound.
  max_in_flight_mb: int = 64
  classes: tuple[str, ...] | None = None
  download_cache: str | None = None
  decode_timeout: float = 30.0  # 0 decodes in-process (no crash/hang isolation)
  decode_processes: int = 2
  decode_memory_mb: int = 4096  # address-space limit of each decoder process; 0: none
  decoder: Callable[[dict, bytes, image_decode.DecodeSettings], dict] = image_decode.prepare_record

  @property
  def decode_settings(self) -> image_decode.DecodeSettings:
    return image_decode.DecodeSettings(self.image_size, self.resize, self.image_format,
                                       self.max_pixels, self.min_side, self.background)


def dead_letter(reason: str, row, message: str, stage: str = "ingest") -> str:
  """One `errors.jsonl` line; credentials and signed-URL secrets are redacted from the row and
  message (the fetched location and any encoded image bytes are left out)."""
  if isinstance(row, dict):
    row = {k: v for k, v in row.items() if k not in ("location", "error", "image")}
  text = json.dumps({"stage": stage, "reason": reason, "row": row, "message": message},
                    sort_keys=True, default=str)
  return redact.redact(text)


class DeadLetteringDoFn(beam.DoFn):
  """Base: counters per reason, created lazily in the worker (never module globals)."""

  def __init__(self):
    super().__init__()
    self._counters = {}

  def _dead(self, reason: str, row, message: str):
    if reason not in self._counters:
      self._counters[reason] = Metrics.counter("ingest_dead_letters", reason)
    self._counters[reason].inc()
    return pvalue.TaggedOutput(DEAD, dead_letter(reason, row, message))
