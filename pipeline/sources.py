"""Input sources of the ingest job: CSV manifests and folder trees -> source rows.

    spec = sources.inspect_csv("data/sample/gender.csv", label_column="gender")
    row = sources.parse_csv_line(line, spec)   # a dict, or raises RowError(reason, message)

A source row is a plain dict (cheap to pickle between Beam workers):
`id` (sha256 of the canonical source), `source` (as written), `location` (what to fetch),
`label`, `group`, `split`, `targets` (flat source-pixel coordinates or None), `row` (the input
row as read, credentials redacted: it goes into dead letters) and `extra` (other columns).

The canonical source is the URL exactly as written for remote sources and the path relative to
the manifest's folder (or the tree's root) for local files, never an absolute path, so ids and
splits are identical on every machine.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import posixpath
import re
import urllib.parse
from collections.abc import Iterator, Sequence

import tensorflow as tf

from contracts import layout

REMOTE_SCHEMES = ("http", "https")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


class RowError(ValueError):
  """A manifest row that cannot become an image; `reason` is the dead-letter code."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def redact(text: str) -> str:
  """Removes `user:password@` from every URL in `text` (dead letters and logs never hold them)."""
  return _CREDENTIALS.sub(r"\g<scheme>***@", text)


def source_id(canonical_source: str) -> str:
  """The record id: sha256 hex of the canonical source string."""
  return hashlib.sha256(canonical_source.encode("utf-8")).hexdigest()


def _is_under(path: str, root: str) -> bool:
  root = root.rstrip("/")
  return path == root or path.startswith(root + "/")


def resolve_location(source: str, base_dir: str, allow_roots: Sequence[str] = (),
                     allow_buckets: Sequence[str] = ()) -> tuple[str, str]:
  """Resolves a manifest entry to (location to fetch, canonical source for the id).

  gs:// sources must be in the manifest's own bucket or in `allow_buckets`: workers run with
  cloud credentials that may read far more than the user meant to ingest.

  Raises:
    RowError: `unsupported_scheme`, `outside_root`, `bucket_not_allowed` or `bad_url`.
  """
  parsed = urllib.parse.urlsplit(source)
  scheme = parsed.scheme.lower()
  if scheme in REMOTE_SCHEMES:
    if not parsed.hostname:
      raise RowError("bad_url", f"URL {redact(source)!r} has no host")
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
    raise RowError("unsupported_scheme", f"scheme {scheme!r} of {redact(source)!r} is not allowed;"
                   " allowed: http, https, gs, local paths")
  base_dir = base_dir.rstrip("/")
  if source.startswith("/"):
    location = posixpath.normpath(source)
  elif base_dir.startswith("gs://"):
    location = "gs://" + posixpath.normpath(posixpath.join(base_dir[5:], source))
  else:
    location = posixpath.normpath(posixpath.join(base_dir, source))
  for root in (base_dir, *allow_roots):
    root = posixpath.normpath(root) if not root.startswith("gs://") else root.rstrip("/")
    if _is_under(location, root):
      relative = location[len(root):].lstrip("/")
      return location, relative if root == base_dir else f"{posixpath.basename(root)}/{relative}"
  raise RowError("outside_root", f"path {source!r} resolves outside the manifest's folder "
                 f"{base_dir!r}; pass --allow-root to allow another folder")


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
  base_dir = posixpath.dirname(path) or "."
  return CsvSpec(path, base_dir, header, url_index, label_index, group_index, split_index,
                 _target_indices(header, target_columns, used), tuple(allow_roots),
                 tuple(allow_buckets))


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
      "source": redact(canonical),
      "location": location,
      "label": label,
      "group": fields[spec.group_index].strip() if spec.group_index is not None else None,
      "split": split,
      "targets": targets,
      "extra": {spec.header[i]: v for i, v in enumerate(fields) if i not in special},
  }


# ---------------------------------------------------------------------------------------------
# Folder trees


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def list_folder_tree(root: str) -> Iterator[dict]:
  """Yields source rows of a `root/<class>/...` or `root/<split>/<class>/...` tree.

  The tree is a split tree when every top-level folder is a split name (train, val, test...).

  Raises:
    ValueError: the folder does not exist or holds no class folders.
  """
  root = root.rstrip("/")
  if not tf.io.gfile.isdir(root):
    raise ValueError(f"source {root!r} is neither a CSV manifest nor a folder")
  top = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(root)
               if tf.io.gfile.isdir(f"{root}/{name.rstrip('/')}"))
  if not top:
    raise ValueError(f"folder {root!r} has no class sub-folders (expected root/<class>/image or "
                     "root/<split>/<class>/image)")
  split_tree = all(name.lower() in layout.SPLIT_ALIASES for name in top)
  for directory, _, files in tf.io.gfile.walk(root):
    relative_dir = directory[len(root):].strip("/")
    parts = relative_dir.split("/") if relative_dir else []
    for name in sorted(files):
      relative = f"{relative_dir}/{name}" if relative_dir else name
      row = {"id": source_id(relative), "source": relative, "location": f"{root}/{relative}",
             "label": None, "group": None, "split": None, "targets": None, "extra": {}}
      needed = 2 if split_tree else 1
      if len(parts) < needed or not _is_image_name(name):
        row["error"] = ("not_in_class_folder" if len(parts) < needed else "not_an_image_name")
      else:
        row["label"] = parts[needed - 1]
        if split_tree:
          row["split"] = layout.canonical_split(parts[0])
      yield row
