"""Per-split statistics a head needs before it trains, computed while records stream past.

    acc = statistics.Accumulator.empty()
    acc = acc.add(pooled=vectors, labels=labels, targets=None, views=views)   # any batch size
    stats = statistics.finish({"train": acc, ...})      # what the manifest's `statistics` holds

Stage 2 accumulates them as it extracts (one more output of the same pass) and writes them into
the feature manifest; for datasets written before that, stage 3 makes one streaming pass and
saves the result as `statistics.json` beside the dataset (or in its cache folder) for every
later run. They replace the full passes heads used to make before `fit`: counting records,
loading every pooled vector into memory for standardisation, class weights and keypoint means.

Only original images count (view 0): augmented views are copies, and a head standardises and
weights by the data, not by its augmentations. Means and variances merge exactly (Chan's
parallel update in float64), so the order and batching of records do not matter.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

STATISTICS_NAME = "statistics.json"
FORMAT = 1
# Channels constant on the train split would give a zero variance; a floor keeps the
# standardisation finite (the value heads used before statistics were precomputed).
MIN_VARIANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class Accumulator:
  """Running count, class histogram, and mean/M2 of the pooled vector and of the targets."""
  count: int
  class_counts: tuple[int, ...]
  pooled_mean: np.ndarray | None
  pooled_m2: np.ndarray | None
  targets_sum: np.ndarray | None

  @classmethod
  def empty(cls) -> "Accumulator":
    return cls(0, (), None, None, None)

  def add(self, *, pooled: np.ndarray | None = None, labels: np.ndarray | None = None,
          targets: np.ndarray | None = None, views: np.ndarray | None = None) -> "Accumulator":
    """Adds a batch (rows with `views > 0` are skipped)."""
    keep = None if views is None else np.asarray(views) == 0
    pick = (lambda a: None if a is None else (np.asarray(a) if keep is None
                                              else np.asarray(a)[keep]))
    pooled, labels, targets = pick(pooled), pick(labels), pick(targets)
    count = next((len(a) for a in (pooled, labels, targets) if a is not None), 0)
    batch = Accumulator(count, _histogram(labels), *_moments(pooled),
                        None if targets is None else
                        np.asarray(targets, np.float64).reshape(count, -1).sum(axis=0))
    return self.merge(batch)

  def merge(self, other: "Accumulator") -> "Accumulator":
    """The accumulator of both inputs (associative and commutative)."""
    if not other.count:
      return self
    if not self.count:
      return other
    count = self.count + other.count
    width = max(len(self.class_counts), len(other.class_counts))
    counts = tuple(a + b for a, b in zip(_pad(self.class_counts, width),
                                         _pad(other.class_counts, width)))
    mean = m2 = None
    if self.pooled_mean is not None and other.pooled_mean is not None:
      delta = other.pooled_mean - self.pooled_mean
      mean = self.pooled_mean + delta * (other.count / count)
      m2 = self.pooled_m2 + other.pooled_m2 + delta ** 2 * (self.count * other.count / count)
    targets = (None if self.targets_sum is None or other.targets_sum is None
               else self.targets_sum + other.targets_sum)
    return Accumulator(count, counts, mean, m2, targets)

  def to_dict(self) -> dict[str, Any]:
    """The JSON form of one split's statistics."""
    result: dict[str, Any] = {"examples": self.count, "class_counts": list(self.class_counts)}
    if self.pooled_mean is not None and self.count:
      result["pooled_mean"] = self.pooled_mean.tolist()
      result["pooled_variance"] = (self.pooled_m2 / self.count).tolist()
    if self.targets_sum is not None and self.count:
      result["targets_mean"] = (self.targets_sum / self.count).tolist()
    return result


def _pad(counts: tuple[int, ...], width: int) -> tuple[int, ...]:
  return counts + (0,) * (width - len(counts))


def _histogram(labels: np.ndarray | None) -> tuple[int, ...]:
  if labels is None or not len(labels):
    return ()
  return tuple(int(c) for c in np.bincount(np.asarray(labels, np.int64).ravel()))


def _moments(pooled: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
  if pooled is None or not len(pooled):
    return None, None
  values = np.asarray(pooled, np.float64).reshape(len(pooled), -1)
  mean = values.mean(axis=0)
  return mean, ((values - mean) ** 2).sum(axis=0)


def finish(by_split: Mapping[str, Accumulator]) -> dict[str, Any]:
  """The `statistics` document: format version and one block per split."""
  return {"format": FORMAT, "splits": {split: acc.to_dict() for split, acc in by_split.items()}}


def standardisation(stats: Mapping[str, Any], split: str = "train"
                    ) -> tuple[np.ndarray, np.ndarray] | None:
  """(mean, variance) of a split's pooled vectors as float32, variance floored; None if absent."""
  block = stats.get("splits", {}).get(split, {})
  if "pooled_mean" not in block:
    return None
  return (np.asarray(block["pooled_mean"], np.float32),
          np.maximum(np.asarray(block["pooled_variance"], np.float32), MIN_VARIANCE))


def class_weights(stats: Mapping[str, Any], num_classes: int,
                  split: str = "train") -> dict[int, float]:
  """`balanced` weights n / (num_classes * count) from a split's class histogram."""
  counts = _pad(tuple(stats["splits"][split]["class_counts"]), num_classes)
  total = sum(counts)
  return {index: float(total / (num_classes * count)) if count else 0.0
          for index, count in enumerate(counts)}


def targets_mean(stats: Mapping[str, Any], split: str = "train") -> np.ndarray | None:
  """Mean flattened keypoint target `[2K]` of a split, or None."""
  block = stats.get("splits", {}).get(split, {})
  return np.asarray(block["targets_mean"], np.float32) if "targets_mean" in block else None
