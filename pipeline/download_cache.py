"""The download cache: fetched remote bytes kept per source, so a re-run fetches only new sources.

    cache = download_cache.DownloadCache("out/images/download_cache")
    cache.put(row_id, data); cache.get(row_id)   # bytes, or None
"""
from __future__ import annotations

import hashlib
import sqlite3
import threading
import time

import tensorflow as tf

# A local cache is one SQLite database in the cache folder; a remote one (gs://) keeps one object
# per source under `sources/`. Earlier local layouts (`sources/` files, `refs/` + `blobs/`) are
# ignored: their sources are fetched again once.
DATABASE_NAME = "sources.sqlite"
_ENTRIES = "sources"
_DIGEST_BYTES = 32
# How long a writer waits for another process's transaction before the put counts as failed.
_BUSY_TIMEOUT_MS = 60_000


class DownloadCache:
  """Fetched remote bytes per source, so a re-run fetches only new sources.

  An entry is the sha256 of the bytes the source returned (32 bytes) followed by the bytes, and
  is trusted only when that digest matches (a damaged entry reads as a miss and the source is
  fetched again). Sources that return identical bytes (mirrors) each keep their own entry.

  A local folder holds one SQLite database (`sources.sqlite`, table `sources(id, entry)`, WAL
  journal): a put is one small transaction, so an interrupted job leaves whole entries or none,
  and the worker processes of one machine write it concurrently (SQLite's locking). One file per
  source cost a file creation per image: 0.14-0.47 ms of the kernel's CPU per 11 KB image on
  this VM whenever the disk had much unwritten data (after a few GB of writes), where an insert
  costs ~0.05-0.08 ms (issue 17); a folder of millions of small files is also slow to list,
  copy and delete. SQLite's locking needs a local disk (not NFS); a remote root (gs://...) keeps
  one object per source, `sources/<id[:2]>/<id>`, written in one call through `tf.io.gfile`.
  """

  def __init__(self, root: str):
    root = root.rstrip("/")
    self._store = _ObjectStore(root) if "://" in root else _SqliteStore(f"{root}/{DATABASE_NAME}")

  @property
  def is_local(self) -> bool:
    """True for a folder on this machine (its calls are quick enough to make in-line)."""
    return isinstance(self._store, _SqliteStore)

  def get(self, source_id: str) -> bytes | None:
    """The cached bytes of a source, or None (missing, or failing its checksum)."""
    entry = self._store.read(source_id)
    if entry is None:
      return None
    digest, data = entry[:_DIGEST_BYTES], entry[_DIGEST_BYTES:]
    return data if hashlib.sha256(data).digest() == digest else None

  def put(self, source_id: str, data: bytes) -> None:
    """Stores the bytes a source returned."""
    self._store.write(source_id, hashlib.sha256(data).digest() + data)


class _SqliteStore:
  """Entries in one SQLite database; one connection per thread (sqlite3's rule)."""

  def __init__(self, path: str):
    self._path = path
    self._local = threading.local()
    self._damaged: sqlite3.DatabaseError | None = None

  def _connection(self) -> sqlite3.Connection:
    if self._damaged is not None:
      # Not a database (or a corrupt one): every call would open it and fail the same way.
      # A new exception each time: re-raising one instance would grow its traceback per row.
      raise sqlite3.DatabaseError(str(self._damaged))
    connection = getattr(self._local, "connection", None)
    if connection is None:
      tf.io.gfile.makedirs(self._path.rsplit("/", 1)[0])
      # Autocommit: each statement is its own transaction.
      connection = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_MS / 1e3,
                                   isolation_level=None)
      try:
        _set_up(connection)
      except sqlite3.DatabaseError as error:
        connection.close()
        # "file is not a database", "database disk image is malformed": they do not pass.
        # OperationalError (locked, disk full, I/O) may, so it is not remembered.
        if not isinstance(error, sqlite3.OperationalError):
          self._damaged = error
        raise
      self._local.connection = connection
    return connection

  def read(self, source_id: str) -> bytes | None:
    row = self._connection().execute("SELECT entry FROM sources WHERE id = ?",
                                     (source_id,)).fetchone()
    return None if row is None else row[0]

  def write(self, source_id: str, entry: bytes) -> None:
    self._connection().execute("INSERT OR REPLACE INTO sources (id, entry) VALUES (?, ?)",
                               (source_id, entry))


def _set_up(connection: sqlite3.Connection) -> None:
  """WAL journal, NORMAL sync and the table, retried while another connection holds the lock:
  switching a new database to WAL can answer "database is locked" at once, without waiting for
  the busy timeout, when several connections open it together (16 threads in the tests)."""
  deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1e3
  while True:
    try:
      connection.execute("PRAGMA journal_mode=WAL")
      # WAL with NORMAL: a commit is durable at the next checkpoint, not at once; an entry lost
      # to a power cut is fetched again, and the database stays consistent.
      connection.execute("PRAGMA synchronous=NORMAL")
      connection.execute(
          "CREATE TABLE IF NOT EXISTS sources (id TEXT PRIMARY KEY, entry BLOB NOT NULL)")
      return
    except sqlite3.OperationalError as error:
      if "locked" not in str(error) or time.monotonic() > deadline:
        raise
      time.sleep(0.01)


class _ObjectStore:
  """Entries as one object per source under `ROOT/sources/` (an object store has no locks)."""

  def __init__(self, root: str):
    self._root = root
    self._folders: set[str] = set()  # folders known to exist (a makedirs per put was measurable)

  def _path(self, source_id: str) -> str:
    return f"{self._root}/{_ENTRIES}/{source_id[:2]}/{source_id}"

  def read(self, source_id: str) -> bytes | None:
    try:
      with tf.io.gfile.GFile(self._path(source_id), "rb") as f:
        return f.read()
    except tf.errors.NotFoundError:
      return None

  def write(self, source_id: str, entry: bytes) -> None:
    path = self._path(source_id)
    folder = path.rsplit("/", 1)[0]
    if folder not in self._folders:
      tf.io.gfile.makedirs(folder)
      self._folders.add(folder)
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(entry)
