"""The command-line contract every `headstart` command keeps, and the parts they share.

    parser = cli.Parser(prog="headstart ingest", description=...)
    parser.add_argument("--image-size", type=cli.positive_int, default=300)
    args, beam_args = parser.parse_known_args(argv)
    options = PipelineOptions(cli.with_default_runner(beam_args))  # FnApiRunner by default

A bad or missing argument is one line naming the value and what is allowed, exit 2: `Parser`
raises `UsageError` (a `ValueError`) instead of printing argparse's usage block, and the
`headstart` entry point prints any `ValueError` as one line. Each stage's thin entry module
builds its flags on this parser, so the rule holds for every command.
"""
from __future__ import annotations

import argparse
import re

# Beam 2.77's default DirectRunner first tries to download the Prism runner binary, which fails
# or changes behaviour offline; the Python direct runner is what local runs mean here.
DEFAULT_LOCAL_RUNNER = "FnApiRunner"
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class UsageError(ValueError):
  """A bad or missing command-line argument (printed as one line, exit status 2)."""


class Parser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` whose errors are one-line `UsageError`s, not a usage dump."""

  def error(self, message: str):
    raise UsageError(message)


def _number(text: str, kind: type):
  try:
    return kind(text)
  except ValueError:
    what = "an integer" if kind is int else "a number"
    raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _at_least(kind: type, low: float, *, strict: bool):
  """An argparse type: a number of `kind` above `low` (or equal to it unless `strict`)."""
  what = ("a positive " if strict and low == 0 else "") + ("integer" if kind is int else "number")

  def parse(text: str):
    value = _number(text, kind)
    if value < low or (strict and value == low):
      raise argparse.ArgumentTypeError(f"{text!r} must be {what if strict else f'>= {low:g}'}")
    return value

  parse.__name__ = f"{'positive' if strict else 'non_negative'}_{kind.__name__}"
  return parse


positive_int = _at_least(int, 0, strict=True)
non_negative_int = _at_least(int, 0, strict=False)
positive_float = _at_least(float, 0, strict=True)
non_negative_float = _at_least(float, 0, strict=False)


def fraction(text: str) -> float:
  """A number between 0 and 1."""
  value = _number(text, float)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
  return value


def size_bytes(text: str) -> int:
  """A size: plain bytes or with a unit (`512MB`, `2GiB`, `1.5gb`); decimal and binary units."""
  found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
  unit = found.group(2).lower() if found else ""
  if not found or unit not in _SIZE_UNITS:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a size; use bytes or a unit such as 512MB, 2GiB")
  return int(float(found.group(1)) * _SIZE_UNITS[unit])


def comma_list(text: str) -> list[str]:
  """`a, b,c` -> `["a", "b", "c"]` (empty items dropped)."""
  return [part.strip() for part in text.split(",") if part.strip()]


def with_default_runner(beam_args: list[str]) -> list[str]:
  """Beam flags with `--runner=FnApiRunner` first unless the user chose a runner."""
  if any(arg == "--runner" or arg.startswith("--runner=") for arg in beam_args):
    return list(beam_args)
  return [f"--runner={DEFAULT_LOCAL_RUNNER}", *beam_args]

