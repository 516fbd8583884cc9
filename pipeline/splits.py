"""Deterministic, group-aware train/validation/test assignment.

    assign_split("3fa2...", parse_splits("train=80,val=10,test=10"))  # -> "train"

A split depends only on the sha256 of the `id` (or of the group, so one person never lands in
two splits), mapped to one of 10,000 buckets: adding rows never moves existing rows, and every
machine computes the same split.
"""
from __future__ import annotations

import hashlib

from contracts import layout

_BUCKETS = 10_000


def parse_splits(spec: str) -> tuple[tuple[str, float], ...]:
  """Parses `train=80,val=10,test=10` into ((split, cumulative fraction), ...).

  Raises:
    ValueError: unknown split names, non-numeric or negative weights, or all weights zero.
  """
  weights: dict[str, float] = {}
  for part in spec.split(","):
    name, sep, value = part.partition("=")
    if not sep:
      raise ValueError(f"bad --splits entry {part!r}; expected NAME=WEIGHT, "
                       "e.g. train=80,val=10,test=10")
    split = layout.canonical_split(name)
    try:
      weight = float(value)
    except ValueError:
      raise ValueError(f"bad --splits weight {value!r} for {name!r}; expected a number") from None
    if weight < 0 or split in weights:
      raise ValueError(f"bad --splits entry {part!r}: weights must be >= 0 and splits unique")
    weights[split] = weight
  total = sum(weights.values())
  if total <= 0:
    raise ValueError(f"bad --splits {spec!r}: the weights sum to zero")
  cumulative, result = 0.0, []
  for split in layout.SPLITS:
    if split in weights:
      cumulative += weights[split] / total
      result.append((split, cumulative))
  return tuple(result)


def assign_split(key: str, splits: tuple[tuple[str, float], ...]) -> str:
  """Maps a stable key (id or group) to a split through a sha256 bucket."""
  bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) % _BUCKETS
  position = (bucket + 0.5) / _BUCKETS
  for split, upper in splits:
    if position < upper:
      return split
  return splits[-1][0]
