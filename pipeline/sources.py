"""CSV manifests, the main input of the ingest job -> source rows (folder trees: `folder_tree`).

    spec = sources.inspect_csv("data/sample/gender.csv", label_column="gender")
    row = sources.parse_csv_line(line, spec)   # a dict, or raises RowError(reason, message)

A source row is a plain dict (cheap to pickle between Beam workers):
`id` (sha256 of the canonical source), `source` (as written), `location` (what to fetch),
`label`, `group`, `split`, `targets` (flat source-pixel coordinates or None), `row` (the input
row as read, credentials redacted: it goes into dead letters) and `extra` (other columns).

The canonical source is the URL exactly as written for remote sources and the path relative to
the manifest's folder (or the tree's root) for local files, never an absolute path, so ids and
splits are identical on every machine and for every spelling of the manifest's path (see
`paths`). The stored `source` is the canonical source with secrets redacted (see `redact`).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import posixpath
import urllib.parse
from collections.abc import Sequence

import tensorflow as tf

from contracts import layout
from pipeline import paths, redact

REMOTE_SCHEMES = ("http", "https")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


class RowError(ValueError):
  """A manifest row that cannot become an image; `reason` is the dead-letter code."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def source_id(canonical_source: str) -> str:
  """The record id: sha256 hex of the canonical source string."""
  return hashlib.sha256(canonical_source.encode("utf-8")).hexdigest()


def resolve_location(source: str, base_dir: str, allow_roots: Sequence[str] = (),
                     allow_buckets: Sequence[str] = ()) -> tuple[str, str]:
  """Resolves a manifest entry to (location to fetch, canonical source for the id).

  `base_dir` and `allow_roots` are canonical (`paths.real_path`, as `inspect_csv` makes them).
  gs:// sources must be in the manifest's own bucket or in `allow_buckets`: workers run with
  cloud credentials that may read far more than the user meant to ingest.

  Raises:
    RowError: `unsupported_scheme`, `outside_root`, `bucket_not_allowed`, `bad_url` or
      `unreadable` (a symlink loop).
  """
  parsed = urllib.parse.urlsplit(source)
  scheme = parsed.scheme.lower()
  if scheme in REMOTE_SCHEMES:
    if not parsed.hostname:
      raise RowError("bad_url", f"URL {redact.redact(source)!r} has no host")
    return source, source
  if scheme == "gs":
    own = (urllib.parse.urlsplit(base_dir).netloc,) if base_dir.startswith("gs://") else ()
    if parsed.netloc not in (*own, *allow_buckets):
      raise RowError("bucket_not_allowed", f"bucket {parsed.netloc!r} is not the manifest's "
                     "bucket nor named by --allow-bucket")
    return source, source
  if scheme == "file":
    source = urllib.parse.unquote(parsed.path)
  elif scheme and len(scheme) > 1:  # one letter would be a Windows drive, not a scheme
    raise RowError("unsupported_scheme", f"scheme {scheme!r} of {redact.redact(source)!r} is not "
                   "allowed; allowed: http, https, gs, local paths")
  try:
    return paths.locate(source, base_dir, allow_roots)
  except paths.PathRefused as error:
    raise RowError(error.reason, str(error)) from None


# ---------------------------------------------------------------------------------------------
# CSV manifests


@dataclasses.dataclass(frozen=True)
class CsvSpec:
  """Where each field lives in a manifest's rows (checked against the header before any work)."""
  path: str
  base_dir: str
  header: tuple[str, ...]
  url_index: int
  label_index: int | None
  group_index: int | None
  split_index: int | None
  target_indices: tuple[int, ...]
  allow_roots: tuple[str, ...] = ()
  allow_buckets: tuple[str, ...] = ()


def _column(header: Sequence[str], name: str | None, flag: str) -> int | None:
  if name is None:
    return None
  if name not in header:
    raise ValueError(f"{flag} {name!r} is not a column of the manifest; columns: "
                     f"{', '.join(header)}")
  return header.index(name)


def _target_indices(header: Sequence[str], spec: str | None, used: set[int]) -> tuple[int, ...]:
  if not spec:
    return ()
  if spec == "all":
    indices = tuple(i for i in range(len(header)) if i not in used)
  elif "," in spec:
    indices = tuple(_column(header, name.strip(), "--target-columns") for name in spec.split(","))
  else:
    indices = tuple(i for i, name in enumerate(header) if name.startswith(spec) and i not in used)
  if not indices or len(indices) % 2:
    raise ValueError(f"--target-columns {spec!r} selects {len(indices)} columns; expected a "
                     "non-zero even number (x0,y0,x1,y1,...)")
  return indices


def inspect_csv(path: str, *, url_column: str = "image_url", label_column: str | None = "label",
                group_column: str | None = None, split_column: str | None = None,
                target_columns: str | None = None, allow_roots: Sequence[str] = (),
                allow_buckets: Sequence[str] = ()) -> CsvSpec:
  """Reads and checks a manifest's header (and that it has rows) before any work starts.

  With `target_columns` set and the default label column absent, the manifest is a keypoint
  manifest without labels.

  Raises:
    ValueError: missing file, empty manifest, or a named column that is not in the header.
  """
  if not tf.io.gfile.exists(path):
    raise ValueError(f"manifest {path!r} does not exist")
  with tf.io.gfile.GFile(path, "r") as f:
    lines = [line for line, _ in zip(f, range(2))]
  if not lines or not lines[0].strip():
    raise ValueError(f"manifest {path!r} is empty: expected a header row such as "
                     f"'{url_column},label' and at least one row")
  header = tuple(name.strip() for name in next(csv.reader([lines[0].lstrip("\ufeff")])))
  if len(lines) < 2 or not lines[1].strip():
    raise ValueError(f"manifest {path!r} has a header but no rows")
  url_index = _column(header, url_column, "--url-column")
  if label_column == "label" and "label" not in header and target_columns:
    label_column = None
  label_index = _column(header, label_column, "--label-column")
  group_index = _column(header, group_column, "--group-column")
  split_index = _column(header, split_column, "--split-column")
  used = {i for i in (url_index, label_index, group_index, split_index) if i is not None}
  # Canonical once, here: ids must not depend on the current folder or the path's spelling.
  base_dir = paths.real_path(posixpath.dirname(path) or ".")
  return CsvSpec(path, base_dir, header, url_index, label_index, group_index, split_index,
                 _target_indices(header, target_columns, used),
                 tuple(paths.real_path(root) for root in allow_roots), tuple(allow_buckets))


def _parse_targets(fields: Sequence[str], indices: Sequence[int]) -> list[float] | None:
  if not indices:
    return None
  try:
    values = [float(fields[i]) for i in indices]
  except ValueError:
    raise RowError("bad_targets", "a target column is empty or not a number") from None
  if not all(math.isfinite(v) for v in values):
    raise RowError("bad_targets", "a target value is missing (NaN) or infinite")
  return values


def parse_csv_line(line: str, spec: CsvSpec) -> dict:
  """One manifest line -> a source row.

  Raises:
    RowError: malformed row, missing url/label, bad split or targets, disallowed source.
  """
  try:
    fields = next(csv.reader([line]))
  except (csv.Error, StopIteration) as error:
    raise RowError("malformed_row", f"unparseable CSV line: {error}") from None
  if len(fields) != len(spec.header):
    raise RowError("malformed_row", f"row has {len(fields)} fields; the header has "
                   f"{len(spec.header)}")
  source = fields[spec.url_index].strip()
  if not source:
    raise RowError("missing_url", "the url column is empty")
  label = fields[spec.label_index].strip() if spec.label_index is not None else None
  if spec.label_index is not None and not label:
    raise RowError("missing_label", "the label column is empty")
  split = None
  if spec.split_index is not None:
    try:
      split = layout.canonical_split(fields[spec.split_index])
    except ValueError as error:
      raise RowError("bad_split", str(error)) from None
  targets = _parse_targets(fields, spec.target_indices)
  location, canonical = resolve_location(source, spec.base_dir, spec.allow_roots,
                                         spec.allow_buckets)
  special = {spec.url_index, spec.label_index, spec.group_index, spec.split_index,
             *spec.target_indices}
  return {
      "id": source_id(canonical),
      "source": redact.redact(canonical),
      "location": location,
      "label": label,
      "group": fields[spec.group_index].strip() if spec.group_index is not None else None,
      "split": split,
      "targets": targets,
      "extra": {spec.header[i]: v for i, v in enumerate(fields) if i not in special},
  }
