"""The download cache: fetched remote bytes kept per source, so a re-run fetches only new sources.

    cache = download_cache.DownloadCache("out/images/download_cache")
    cache.put(row_id, data); cache.get(row_id)   # bytes, or None
    cache.flush()                                # local puts are committed in batches
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
# Local puts are committed together once this many entries or bytes wait (and at `flush`): one
# transaction per put cost 0.065-0.071 ms per 11.5 KB entry, one per 32 entries 0.041-0.048.
BATCH_ENTRIES = 32
_BATCH_BYTES = 4 << 20


class NotStored(Exception):
  """A batch of puts could not be committed; `entries` of them are not in the cache."""

  def __init__(self, entries: int, error: Exception):
    super().__init__(f"{entries} entries not stored: {error}")
    self.entries = entries


class DownloadCache:
  """Fetched remote bytes per source, so a re-run fetches only new sources.

  An entry is the sha256 of the bytes the source returned (32 bytes) followed by the bytes, and
  is trusted only when that digest matches (a damaged entry reads as a miss and the source is
  fetched again). Sources that return identical bytes (mirrors) each keep their own entry.

  A local folder holds one SQLite database (`sources.sqlite`, table `sources(id, entry)`, WAL
  journal): puts wait in memory (readable at once) and are committed together, up to
  `BATCH_ENTRIES` per transaction and at every `flush`, so an interrupted job leaves whole
  entries or none (at most one batch is lost and fetched again), and the worker processes of
  one machine write it concurrently (SQLite's locking). One file per
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

  def is_empty(self) -> bool:
    """True when the cache holds no entry, committed or waiting."""
    return self._store.is_empty()

  def get(self, source_id: str) -> bytes | None:
    """The cached bytes of a source, or None (missing, or failing its checksum)."""
    entry = self._store.read(source_id)
    if entry is None:
      return None
    digest, data = entry[:_DIGEST_BYTES], entry[_DIGEST_BYTES:]
    return data if hashlib.sha256(data).digest() == digest else None

  def put(self, source_id: str, data: bytes, digest: bytes | None = None) -> None:
    """Stores the bytes a source returned (locally: in the next committed batch); `digest` is
    their sha256 when the caller has it.

    Raises:
      NotStored: this put completed a batch that could not be committed.
    """
    self._store.write(source_id, (digest or hashlib.sha256(data).digest()) + data)

  def flush(self) -> None:
    """Commits the puts still waiting (a no-op for a remote cache).

    Raises:
      NotStored: they could not be committed.
    """
    self._store.flush()


class _SqliteStore:
  """Entries in one SQLite database; one connection per thread (sqlite3's rule), puts waiting
  for their batch's commit shared by all threads."""

  def __init__(self, path: str):
    self._path = path
    self._local = threading.local()
    self._damaged: sqlite3.DatabaseError | None = None
    self._lock = threading.Lock()
    self._pending: dict[str, bytes] = {}
    self._pending_bytes = 0

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

  def is_empty(self) -> bool:
    with self._lock:
      if self._pending:
        return False
    return not self._connection().execute(
        "SELECT EXISTS (SELECT 1 FROM sources)").fetchone()[0]

  def read(self, source_id: str) -> bytes | None:
    with self._lock:
      entry = self._pending.get(source_id)
    if entry is not None:
      return entry
    row = self._connection().execute("SELECT entry FROM sources WHERE id = ?",
                                     (source_id,)).fetchone()
    return None if row is None else row[0]

  def write(self, source_id: str, entry: bytes) -> None:
    with self._lock:
      self._pending[source_id] = entry
      self._pending_bytes += len(entry)
      full = len(self._pending) >= BATCH_ENTRIES or self._pending_bytes >= _BATCH_BYTES
    if full:
      self.flush()

  def flush(self) -> None:
    with self._lock:
      batch, self._pending, self._pending_bytes = self._pending, {}, 0
    if not batch:
      return
    try:
      connection = self._connection()
      with connection:  # one transaction: committed whole, or rolled back
        connection.execute("BEGIN")
        connection.executemany("INSERT OR REPLACE INTO sources (id, entry) VALUES (?, ?)",
                               batch.items())
    except Exception as error:  # noqa: BLE001 (locked, full disk, not a database, no folder)
      raise NotStored(len(batch), error) from error


def _set_up(connection: sqlite3.Connection) -> None:
  """WAL journal, NORMAL sync and the table, retried while another connection holds the lock:
  switching a new database to WAL can answer "database is locked" at once, without waiting for
  the busy timeout, when several connections open it together (16 threads in the tests)."""
  deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1e3
  while True:
    try:
      # 64 KB pages (a new database only: an existing one keeps its own): batches of ~11 KB
      # images committed in 0.023 ms per entry against 0.041-0.048 with 4 KB pages.
      connection.execute("PRAGMA page_size=65536")
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

  def is_empty(self) -> bool:
    return not tf.io.gfile.exists(f"{self._root}/{_ENTRIES}")

  def read(self, source_id: str) -> bytes | None:
    try:
      with tf.io.gfile.GFile(self._path(source_id), "rb") as f:
        return f.read()
    except tf.errors.NotFoundError:
      return None

  def flush(self) -> None:
    """Nothing waits: each put is written at once."""

  def write(self, source_id: str, entry: bytes) -> None:
    path = self._path(source_id)
    folder = path.rsplit("/", 1)[0]
    if folder not in self._folders:
      tf.io.gfile.makedirs(folder)
      self._folders.add(folder)
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(entry)
