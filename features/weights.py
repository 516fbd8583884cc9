"""Where a backbone's weights come from: ImageNet files, a user's file, or seeded random init.

    headstart weights list          # where each backbone's ImageNet weights would come from now

`--weights imagenet` is resolved in this order (first hit wins):

1. `--weights-dir DIR` or `$HEADSTART_WEIGHTS_DIR` (pre-staged files; Dataflow workers have no
   internet): the file name Keras downloads, or the name of the file shipped in this package;
2. the Keras cache, `$KERAS_HOME/models` (default `~/.keras/models`), under the name Keras itself
   downloads;
3. the weights shipped with this package (`features/weights/`, MobileNet v1 only);
4. a download by Keras' own `get_file` into the Keras cache (with Keras' hash check).

The chosen source and the file's sha256 go into the feature manifest and the cache key. The
driver resolves once; workers call `localize()` to find the very same bytes on their machine
(checked by sha256), so a Dataflow job fails loudly instead of mixing weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from features.backbones import BACKBONES, BackboneSpec

WEIGHTS_DIR_ENV = "HEADSTART_WEIGHTS_DIR"
WEIGHTS_KINDS = ("imagenet", "none", "file")
SOURCES = ("dir", "cache", "shipped", "download", "file", "random", "model")
# Shipped files live next to this module so setup.py's package_data carries them to workers.
SHIPPED_DIR = str(pathlib.Path(__file__).resolve().parent / "weights")
_HASH_CHUNK_BYTES = 8 << 20
_LOCAL_COPIES: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class WeightsChoice:
  """The weights one backbone is extracted with.

  Attributes:
    kind: `imagenet`, `none` (seeded random init) or `file` (a user's weights or model file).
    source: `dir`, `cache`, `shipped`, `download`, `file`, `random` or `model`.
    path: where the driver found the file (None for random weights before they are saved).
    file_name: the file's base name, used to find it again on a worker.
    sha256: hex sha256 of the file (None for random weights before they are saved).
  """
  kind: str
  source: str
  path: str | None
  file_name: str | None
  sha256: str | None

  def to_manifest(self) -> dict[str, Any]:
    """The manifest fields describing these weights."""
    return {"weights_kind": self.kind, "weights_source": self.source,
            "weights_path": self.path, "weights_file": self.file_name,
            "weights_sha256": self.sha256}

  @classmethod
  def from_manifest(cls, manifest: Mapping[str, Any]) -> WeightsChoice:
    """Inverse of `to_manifest`."""
    return cls(manifest["weights_kind"], manifest["weights_source"], manifest.get("weights_path"),
               manifest.get("weights_file"), manifest.get("weights_sha256"))


def file_sha256(path: str) -> str:
  """Hex sha256 of a file, or of every file under a directory (SavedModel) in sorted order."""
  import tensorflow as tf
  digest = hashlib.sha256()
  if tf.io.gfile.isdir(path):
    files = sorted(f"{root}/{name}" for root, _, names in tf.io.gfile.walk(path) for name in names)
  else:
    files = [path]
  for file_path in files:
    if len(files) > 1:
      digest.update(file_path[len(path):].encode())
    with tf.io.gfile.GFile(file_path, "rb") as f:
      while chunk := f.read(_HASH_CHUNK_BYTES):
        digest.update(chunk)
  return digest.hexdigest()


def keras_home() -> str:
  """Keras' cache root: `$KERAS_HOME`, else `~/.keras` (read now, not at Keras import)."""
  return os.environ.get("KERAS_HOME") or str(pathlib.Path.home() / ".keras")


def weights_dir_from(flag_value: str | None) -> str | None:
  """The pre-staged weights folder: `--weights-dir`, else `$HEADSTART_WEIGHTS_DIR`, else None."""
  return flag_value or os.environ.get(WEIGHTS_DIR_ENV) or None


def imagenet_candidates(spec: BackboneSpec, input_size: int,
                        weights_dir: str | None) -> list[tuple[str, str]]:
  """Every place ImageNet weights for `spec` are looked for, in resolution order.

  Returns:
    (source, path or URL) pairs; the last one is the download URL.
  """
  names = [spec.keras_file_name(input_size)]
  if spec.shipped_file:
    names.append(spec.shipped_file)
  candidates = []
  if weights_dir:
    candidates += [("dir", f"{weights_dir.rstrip('/')}/{name}") for name in names]
  candidates.append(("cache", f"{keras_home()}/models/{spec.keras_file_name(input_size)}"))
  if spec.shipped_file:
    candidates.append(("shipped", f"{SHIPPED_DIR}/{spec.shipped_file}"))
  candidates.append(("download", spec.keras_url(input_size)))
  return candidates


def find_imagenet(spec: BackboneSpec, input_size: int,
                  weights_dir: str | None) -> tuple[str, str] | None:
  """The first existing local/staged ImageNet file for `spec`, as (source, path); None if none."""
  import tensorflow as tf
  for source, path in imagenet_candidates(spec, input_size, weights_dir):
    if source != "download" and tf.io.gfile.exists(path):
      return source, path
  return None


def download_imagenet(spec: BackboneSpec, input_size: int) -> str:
  """Downloads with Keras' own `get_file` into the Keras cache; returns the local path.

  Raises:
    ValueError: the download failed (offline, proxy...), in one sentence naming the alternatives.
  """
  from keras.utils import get_file
  try:
    return get_file(spec.keras_file_name(input_size), spec.keras_url(input_size),
                    cache_subdir="models", cache_dir=keras_home(), file_hash=spec.keras_md5)
  except Exception as error:  # get_file wraps network errors in plain Exception
    # Keras' message repeats the URL; keep only the cause ("Name or service not known"...).
    reason = str(error).splitlines()[0].rsplit("-- ", 1)[-1] if str(error) else \
        type(error).__name__
    raise ValueError(
        f"ImageNet weights for {spec.name!r} are not available offline and the download of "
        f"{spec.keras_url(input_size)} failed ({reason}); pass --weights-dir DIR (or set "
        f"{WEIGHTS_DIR_ENV}) with files staged by `headstart weights stage`, put "
        f"{spec.keras_file_name(input_size)} in {keras_home()}/models, use --weights PATH to a "
        "weights file, or --weights none for seeded random weights") from error


def resolve(backbone: str, weights: str, *, input_size: int, weights_dir: str | None = None,
            allow_download: bool = True) -> WeightsChoice:
  """Decides which weights a registered backbone is extracted with (on the driver).

  Args:
    backbone: registry name.
    weights: `imagenet`, `none` or a path (local or gs://) to a weights file.
    input_size: square input side (MobileNet files depend on it).
    weights_dir: `--weights-dir` value (the env var is consulted when None).
    allow_download: False only for `weights list`, which must not download.

  Returns:
    The choice; for `none`, path and sha256 are filled in once the random weights are saved.

  Raises:
    ValueError: unknown backbone, missing file, or ImageNet weights unavailable.
  """
  import tensorflow as tf
  spec = BACKBONES.get(backbone)
  if spec is None:
    raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
  if weights == "none":
    return WeightsChoice("none", "random", None, None, None)
  if weights != "imagenet":
    if not tf.io.gfile.exists(weights):
      raise ValueError(f"--weights {weights!r} is not a file; allowed: imagenet, none or the "
                       "path of a weights file (local or gs://)")
    return WeightsChoice("file", "file", weights, weights.rstrip("/").rsplit("/", 1)[-1],
                         file_sha256(weights))
  found = find_imagenet(spec, input_size, weights_dir_from(weights_dir))
  if found is None:
    if not allow_download:
      return WeightsChoice("imagenet", "download", spec.keras_url(input_size),
                           spec.keras_file_name(input_size), None)
    found = ("download", download_imagenet(spec, input_size))
  source, path = found
  return WeightsChoice("imagenet", source, path, path.rsplit("/", 1)[-1], file_sha256(path))


def local_copy(path: str) -> str:
  """A local path for `path`: itself when local, else a copy (file or directory) in a temp dir.

  Keras and h5py read only local files; copies are kept for the life of the process.
  """
  import tensorflow as tf
  if "://" not in path:
    return path
  if path in _LOCAL_COPIES:
    return _LOCAL_COPIES[path]
  target_root = tempfile.mkdtemp(prefix="headstart-weights-")
  name = path.rstrip("/").rsplit("/", 1)[-1]
  target = f"{target_root}/{name}"
  if tf.io.gfile.isdir(path):
    for root, _, names in tf.io.gfile.walk(path):
      relative = root[len(path.rstrip("/")):].lstrip("/")
      tf.io.gfile.makedirs(f"{target}/{relative}")
      for file_name in names:
        tf.io.gfile.copy(f"{root}/{file_name}", f"{target}/{relative}/{file_name}", overwrite=True)
  else:
    tf.io.gfile.copy(path, target, overwrite=True)
  _LOCAL_COPIES[path] = target
  return target


def check_for_remote_workers(choices: Sequence[tuple[str, WeightsChoice]],
                             weights_dir: str | None) -> None:
  """Checks, on the driver, that remote workers will find every backbone's weights.

  Workers of a remote runner see the weights dir and the package, not this machine's Keras
  cache or disk, so every ImageNet backbone must come from the dir (or the package) and a
  `--weights` file must be on shared storage.

  Raises:
    ValueError: one sentence naming the backbones to stage and the command that stages them.
  """
  staged = weights_dir_from(weights_dir)
  missing = [backbone for backbone, choice in choices
             if choice.kind == "imagenet" and choice.source not in ("dir", "shipped")]
  if missing:
    where = f"--weights-dir {staged}" if staged else "a --weights-dir"
    raise ValueError(
        f"remote workers would not find the ImageNet weights of {', '.join(missing)}: they are "
        f"not in {where}; run `headstart weights stage --backbones {','.join(missing)} --to "
        f"{staged or 'gs://BUCKET/weights'}` and pass --weights-dir with that folder")
  local_files = [choice.path for _, choice in choices
                 if choice.kind == "file" and choice.source == "file" and "://" not in
                 str(choice.path)]
  if local_files:
    raise ValueError(f"--weights {local_files[0]!r} is a local file remote workers cannot "
                     "read; copy it to gs:// and pass that path")


def missing_on_worker(backbone: str, file_name: str, weights_dir: str) -> str:
  """The one sentence a worker fails with when a backbone's staged weights are not there."""
  return (f"weights for backbone {backbone!r} are missing on this worker: {file_name} is not in "
          f"--weights-dir {weights_dir} (nor in the Keras cache or the package); stage them with "
          f"`headstart weights stage --backbones {backbone} --to {weights_dir}`")


def localize(choice: WeightsChoice, *, backbone: str, input_size: int,
             weights_dir: str | None = None) -> str | None:
  """Finds the chosen weights on this machine (a worker) and returns a local file path.

  The driver's path is used when this machine sees it; otherwise the file is looked up by name
  in `--weights-dir`/the env var, the Keras cache and the package. Without a weights dir it is
  downloaded; with one, staged weights were meant, so a missing file fails here (a worker's
  `setup()`, before any image is read) instead of each worker downloading. Whatever is found
  must have the driver's sha256.

  Raises:
    ValueError: the file cannot be found, or it differs from what the driver resolved.
  """
  import tensorflow as tf
  if choice.kind == "none" and choice.path is None:
    return None
  if choice.path and tf.io.gfile.exists(choice.path):
    path = choice.path
  elif choice.kind == "imagenet":
    spec = BACKBONES[backbone]
    staged = weights_dir_from(weights_dir)
    found = find_imagenet(spec, input_size, staged)
    if found:
      path = found[1]
    elif staged:
      raise ValueError(missing_on_worker(backbone, spec.keras_file_name(input_size), staged))
    else:
      path = download_imagenet(spec, input_size)
  else:
    raise ValueError(f"weights file {choice.path!r} is not readable on this machine")
  # Verified even at the driver's own path: another machine may hold other bytes there.
  if choice.sha256 and file_sha256(path) != choice.sha256:
    raise ValueError(f"weights {path!r} on this worker differ from the driver's "
                     f"(sha256 {choice.sha256[:12]}...); stage the same file with --weights-dir")
  return local_copy(path)
