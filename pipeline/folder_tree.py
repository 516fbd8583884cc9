"""Folder-tree sources: `root/<class>/...` or `root/<split>/<class>/...` -> source rows.

    tree = folder_tree.inspect_tree("photos")        # the launcher: the top of the tree only
    patterns = folder_tree.class_patterns(tree)      # matched on workers (Beam fileio.MatchAll)
    row = folder_tree.row_of(path, tree)             # a worker: one matched file -> source row

The launcher lists only the split and class folder names and the few files lying beside them,
never the images: those are matched by Beam's `fileio.MatchAll` on the workers, one pattern per
class folder, so neither the launcher's memory nor the submitted job grows with the number of
images. The tree is a split tree when every top-level folder is a split name (train, val,
test...). Ids are sha256 of the path relative to the tree's root; local files are checked on
their real path (symlinks followed) and refused (`outside_root`) when that leaves the root and
every `--allow-root`. Beam's local listing does not descend into symlinked sub-folders.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow as tf

from contracts import layout
from pipeline import paths, sources


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  """The top of a folder tree (picklable, shipped to workers)."""
  root: str                      # canonical (paths.real_path)
  split_tree: bool
  class_dirs: tuple[str, ...]    # relative to root: "cat" or "train/cat"
  stray_files: tuple[str, ...]   # files beside the class folders, relative to root
  allow_roots: tuple[str, ...] = ()


def _entries(folder: str) -> tuple[list[str], list[str]]:
  """(sub-folder names, file names) of one folder, sorted."""
  names = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(folder))
  folders = [n for n in names if tf.io.gfile.isdir(f"{folder}/{n}")]
  return folders, [n for n in names if n not in folders]


def inspect_tree(root: str, allow_roots: Sequence[str] = ()) -> TreeSpec:
  """Reads the top of a tree (split and class folder names) before any work starts.

  Raises:
    ValueError: the folder does not exist or holds no class folders.
  """
  if not tf.io.gfile.isdir(root):
    raise ValueError(f"source {root!r} is neither a CSV manifest nor a folder")
  root = paths.real_path(root)
  top_dirs, stray = _entries(root)
  if not top_dirs:
    raise ValueError(f"folder {root!r} has no class sub-folders (expected root/<class>/image or "
                     "root/<split>/<class>/image)")
  split_tree = all(name.lower() in layout.SPLIT_ALIASES for name in top_dirs)
  class_dirs = top_dirs
  if split_tree:
    class_dirs = []
    for split in top_dirs:
      folders, files = _entries(f"{root}/{split}")
      class_dirs += [f"{split}/{name}" for name in folders]
      stray += [f"{split}/{name}" for name in files]
  return TreeSpec(root, split_tree, tuple(class_dirs), tuple(stray),
                  tuple(paths.real_path(r) for r in allow_roots))


def class_patterns(tree: TreeSpec) -> list[str]:
  """One Beam file pattern per class folder, matching every file below it."""
  return [f"{paths.glob_escape(tree.root)}/{paths.glob_escape(name)}/**"
          for name in tree.class_dirs]


def row_of(path: str, tree: TreeSpec) -> dict:
  """A listed file -> source row; a file that cannot be an input gets `error: (reason, text)`."""
  relative = path[len(tree.root):].lstrip("/")
  *parts, name = relative.split("/")
  row = {"id": sources.source_id(relative), "source": relative, "location": path,
         "label": None, "group": None, "split": None, "targets": None, "extra": {}}
  needed = 2 if tree.split_tree else 1
  if len(parts) < needed:
    row["error"] = ("not_in_class_folder", f"{relative!r} is not inside a class folder")
  elif not name.lower().endswith(sources.IMAGE_EXTENSIONS):
    row["error"] = ("not_an_image_name", f"{relative!r} does not have an image file extension")
  else:
    row["label"] = parts[needed - 1]
    if tree.split_tree:
      row["split"] = layout.canonical_split(parts[0])
  if paths.is_local(path) and "error" not in row:
    try:
      row["location"] = paths.real_path(path)
    except paths.PathRefused as error:
      row["error"] = (error.reason, str(error))
      return row
    if not any(paths.is_under(row["location"], r) for r in (tree.root, *tree.allow_roots)):
      row["error"] = ("outside_root", f"{relative!r} is a link that leaves the tree's root "
                      f"{tree.root!r}; pass --allow-root to allow its target's folder")
  return row
