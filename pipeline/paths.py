"""Canonical forms of source paths: what ids and root checks are computed on.

    base = paths.real_path("data/sample")                  # '/home/me/repo/data/sample'
    location, canonical = paths.locate("img/a.png", base, roots=())
    # location: the real file to read; canonical: 'img/a.png' (hashed into the record id)

Local paths are resolved to real paths (absolute, `.`/`..` and symlinks resolved) before any
check, so the current directory, `./` prefixes and symlinked spellings of the manifest's folder
give the same ids, and a symlink inside an allowed root that points out of it is refused
(`outside_root`): the check is on the file that will be read, not on the text of its path.

The canonical source stays relative to the manifest's folder (or the tree's root), never
absolute, so ids and splits are the same on every clone and machine. Files under another
`--allow-root` get their path relative to the manifest's folder too (`../photos/a.jpg`), so two
roots with the same base name never give two files one id. gs:// has no symlinks: its paths are
normalised as text.
"""
from __future__ import annotations

import pathlib
import posixpath
import re
from collections.abc import Sequence

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# Characters Beam's file patterns treat as wildcards; there is no quoting, only `[x]` classes.
_GLOB_SPECIAL = re.compile(r"([\[*?])")


class PathRefused(ValueError):
  """A path that may not be read; `reason` is the dead-letter code."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def is_local(path: str) -> bool:
  """True for a plain filesystem path (no `scheme://`)."""
  return not _SCHEME.match(path)


def real_path(path: str) -> str:
  """The canonical form of a path: absolute and symlink-free (local), normalised (gs://).

  Raises:
    PathRefused: `unreadable` for a symlink loop.
  """
  if not is_local(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.normpath(rest).lstrip('/')}" if rest.strip("/") else path
  try:
    # pathlib rather than tf.io.gfile: symlinks exist only on local filesystems (guarded above),
    # and gfile has no notion of a real path.
    return str(pathlib.Path(path).resolve())
  except (RuntimeError, OSError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
    raise PathRefused("unreadable", f"cannot resolve {path!r}: {error}") from None


def is_under(path: str, root: str) -> bool:
  """True when `path` is `root` or inside it (both canonical)."""
  root = root.rstrip("/")
  return path == root or path.startswith(root + "/")


def _without_scheme(path: str) -> str:
  """`/bucket/dir/x` for `gs://bucket/dir/x`; local paths as they are (absolute)."""
  return "/" + (path.split("://", 1)[1] if not is_local(path) else path).lstrip("/")


def relative_to(path: str, base: str) -> str:
  """`path` relative to `base` (may start with `../`); both canonical, same scheme."""
  return posixpath.relpath(_without_scheme(path), _without_scheme(base))


def locate(entry: str, base: str, roots: Sequence[str] = ()) -> tuple[str, str]:
  """A manifest entry (relative to `base`, or absolute) -> (path to read, canonical source).

  `base` and `roots` must already be canonical (`real_path`). The entry must resolve, symlinks
  followed, under `base` or one of `roots`. The canonical source is the entry's normalised path
  relative to `base` as written (so a symlink inside the folder keeps its own id), or the real
  path's when only that lies under a root (an absolute entry through a symlinked spelling).

  Raises:
    PathRefused: `outside_root`, or `unreadable` for a symlink loop.
  """
  if is_local(base):
    lexical = posixpath.normpath(posixpath.join(base, entry))
    real = real_path(lexical)
  else:
    scheme, rest = base.split("://", 1)
    lexical = real = f"{scheme}://" + posixpath.normpath(posixpath.join(rest, entry)).lstrip("/")
  allowed = (base, *roots)
  if not any(is_under(real, root) for root in allowed):
    raise PathRefused("outside_root", f"path {entry!r} resolves outside the manifest's folder "
                      f"{base!r} (symlinks followed); pass --allow-root to allow another folder")
  shown = lexical if any(is_under(lexical, root) for root in allowed) else real
  return real, relative_to(shown, base)


def glob_escape(path: str) -> str:
  """`path` as a Beam file pattern matching only itself (wildcards as one-character classes)."""
  return _GLOB_SPECIAL.sub(r"[\1]", path)
