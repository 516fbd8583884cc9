"""argparse value types shared by the stage entry points (`type=flags.positive_int`, ...).

Each raises `argparse.ArgumentTypeError` naming the bad value, which argparse turns into a
one-line error.
"""
from __future__ import annotations

import argparse


def _number(text: str, kind: type):
  try:
    return kind(text)
  except ValueError:
    what = "an integer" if kind is int else "a number"
    raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
  """An integer > 0."""
  value = _number(text, int)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
  return value


def non_negative_int(text: str) -> int:
  """An integer >= 0."""
  value = _number(text, int)
  if value < 0:
    raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
  return value


def fraction(text: str) -> float:
  """A number between 0 and 1."""
  value = _number(text, float)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
  return value
