"""The download cache: fetched remote bytes kept by content, so a re-run fetches only new sources.

    cache = download_cache.DownloadCache("out/images/download_cache")
    cache.put(row_id, data); cache.get(row_id)   # bytes, or None
"""
from __future__ import annotations

import hashlib
import uuid

import tensorflow as tf


class DownloadCache:
  """Content-addressed store of fetched remote bytes, so a re-run fetches only new sources.

  `refs/<source id>` holds the sha256 of the bytes that source returned; `blobs/<sha256>` holds
  the bytes (identical content from many URLs is stored once). Entries are written to a
  temporary name unique to the writer and renamed, so an interrupted job never leaves a half
  blob behind and two writers of the same blob (mirrored images fetched at once by two threads,
  processes or retried bundles) never share a temporary file: whichever rename lands last
  installs identical bytes.
  """

  def __init__(self, root: str):
    self._root = root.rstrip("/")

  def _blob(self, digest: str) -> str:
    return f"{self._root}/blobs/{digest[:2]}/{digest}"

  def get(self, source_id: str) -> bytes | None:
    """The cached bytes of a source, or None (missing or failing its checksum)."""
    ref = f"{self._root}/refs/{source_id}"
    if not tf.io.gfile.exists(ref):
      return None
    with tf.io.gfile.GFile(ref, "r") as f:
      digest = f.read().strip()
    blob = self._blob(digest)
    if not tf.io.gfile.exists(blob):
      return None
    with tf.io.gfile.GFile(blob, "rb") as f:
      data = f.read()
    return data if hashlib.sha256(data).hexdigest() == digest else None

  def put(self, source_id: str, data: bytes) -> None:
    """Stores the bytes a source returned."""
    digest = hashlib.sha256(data).hexdigest()
    blob = self._blob(digest)
    if not tf.io.gfile.exists(blob):
      self._write(blob, data)
    self._write(f"{self._root}/refs/{source_id}", digest.encode())

  @staticmethod
  def _write(path: str, data: bytes) -> None:
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    # Unique per writer (process, thread, attempt): a name derived from the content collided
    # when two URLs served identical bytes at the same moment, and one rename then failed.
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
      with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
      tf.io.gfile.rename(tmp, path, overwrite=True)
    finally:
      if tf.io.gfile.exists(tmp):
        tf.io.gfile.remove(tmp)
