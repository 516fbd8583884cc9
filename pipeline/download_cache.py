"""The download cache: fetched remote bytes kept per source, so a re-run fetches only new sources.

    cache = download_cache.DownloadCache("out/images/download_cache")
    cache.put(row_id, data); cache.get(row_id)   # bytes, or None
    cache.lookup(row_id)                         # (bytes, their sha256), or None
    cache.flush()                                # local puts are committed in batches
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time

import tensorflow as tf

# A local cache is pack files under `packs/` located by an index in one SQLite database; a remote
# one (gs://) keeps one object per source under `sources/`. Earlier local layouts (`sources/`
# files, `refs/` + `blobs/`, entries inside the database's `sources` table) are ignored: their
# sources are fetched again once.
DATABASE_NAME = "sources.sqlite"
PACKS = "packs"
_ENTRIES = "sources"
_DIGEST_BYTES = 32
# How long a writer waits for another process's transaction before the put counts as failed.
_BUSY_TIMEOUT_MS = 60_000
# Local puts are committed together once this many entries or bytes wait (and at `flush`): one
# transaction per put cost 0.065-0.071 ms per 11.5 KB entry, one per 32 entries 0.041-0.048.
BATCH_ENTRIES = 32
_BATCH_BYTES = 4 << 20
# Pack files a store keeps open for reading (least recently opened closed first).
_OPEN_PACKS = 32
_PACK_NAME = re.compile(r"[0-9]+-[0-9a-f]{16}\.pack")


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

  A local folder holds pack files (`packs/<pid>-<random>.pack`: each writer appends the entries
  of its puts to its own) and one SQLite database indexing them (`sources.sqlite`, table
  `packed(id, pack, offset, length)`, WAL journal). Puts wait in memory (readable at once) and
  are written together, up to `BATCH_ENTRIES` per batch and at every `flush`: the batch's
  entries are appended to the pack, then indexed in one transaction, so an interrupted job
  leaves whole entries or none (at most one batch is lost and fetched again; bytes appended but
  never indexed are dead weight, not wrong answers), and the worker processes of one machine
  write it concurrently (own packs, SQLite's locking for the index). Entries inside the database
  cost every byte twice (WAL, then checkpoint) plus its B-tree and WAL checksums: ~0.07 ms of
  the HTTP benchmark's CPU per 11 KB image in the job, the disk writes slowing the shard writer
  too (issue 17). One file per source cost a file creation per image: 0.14-0.47 ms of the
  kernel's CPU per 11 KB image on this VM whenever the disk had much unwritten data, and a
  folder of millions of small files is slow to list, copy and delete. SQLite's locking needs a
  local disk (not NFS); a remote root (gs://...) keeps one object per source,
  `sources/<id[:2]>/<id>`, written in one call through `tf.io.gfile`.
  """

  def __init__(self, root: str):
    root = root.rstrip("/")
    self._store = _ObjectStore(root) if "://" in root else _PackStore(root)

  @property
  def is_local(self) -> bool:
    """True for a folder on this machine (its calls are quick enough to make in-line)."""
    return isinstance(self._store, _PackStore)

  def is_empty(self) -> bool:
    """True when the cache holds no entry, committed or waiting."""
    return self._store.is_empty()

  def get(self, source_id: str) -> bytes | None:
    """The cached bytes of a source, or None (missing, or failing its checksum)."""
    found = self.lookup(source_id)
    return None if found is None else found[0]

  def lookup(self, source_id: str) -> tuple[bytes, bytes] | None:
    """(bytes, their sha256 digest) of a source, or None (missing, or failing its checksum):
    the digest checked is the caller's too, so the bytes need no second hashing."""
    entry = self._store.read(source_id)
    if entry is None:
      return None
    digest, data = entry[:_DIGEST_BYTES], entry[_DIGEST_BYTES:]
    return (data, digest) if hashlib.sha256(data).digest() == digest else None

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


class _PackStore:
  """Entries appended to this store's own pack file and indexed in one SQLite database; one
  connection per thread (sqlite3's rule); puts waiting for their batch shared by all threads."""

  def __init__(self, root: str):
    self._root = root
    self._path = f"{root}/{DATABASE_NAME}"
    self._local = threading.local()
    self._damaged: sqlite3.DatabaseError | None = None
    self._lock = threading.Lock()   # the waiting puts, the pack being written, the open packs
    self._pending: dict[str, bytes] = {}
    self._pending_bytes = 0
    self._pack: tuple[int, str, object] | None = None   # (pid, name, file) being appended to
    self._readers: dict[str, int] = {}   # pack name -> descriptor open for reading

  def _connection(self) -> sqlite3.Connection:
    if self._damaged is not None:
      # Not a database (or a corrupt one): every call would open it and fail the same way.
      # A new exception each time: re-raising one instance would grow its traceback per row.
      raise sqlite3.DatabaseError(str(self._damaged))
    connection = getattr(self._local, "connection", None)
    if connection is None:
      os.makedirs(self._root, exist_ok=True)
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
        "SELECT EXISTS (SELECT 1 FROM packed)").fetchone()[0]

  def read(self, source_id: str) -> bytes | None:
    with self._lock:
      entry = self._pending.get(source_id)
    if entry is not None:
      return entry
    row = self._connection().execute("SELECT pack, offset, length FROM packed WHERE id = ?",
                                     (source_id,)).fetchone()
    if row is None:
      return None
    pack, offset, length = row
    if not (isinstance(pack, str) and _PACK_NAME.fullmatch(pack)):
      return None   # a damaged index names no file outside the packs
    try:
      return os.pread(self._reader(pack), length, offset)  # short when cut: the digest fails
    except OSError:
      return None   # the pack is gone or unreadable: a miss

  def _reader(self, pack: str) -> int:
    with self._lock:
      fd = self._readers.get(pack)
      if fd is None:
        if len(self._readers) >= _OPEN_PACKS:
          os.close(self._readers.pop(next(iter(self._readers))))
        fd = self._readers[pack] = os.open(f"{self._root}/{PACKS}/{pack}", os.O_RDONLY)
      return fd

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
      connection = self._connection()  # a damaged index fails before any byte is appended
      with self._lock:
        rows = self._append(batch)
      with connection:  # one transaction: indexed whole, or not at all
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT OR REPLACE INTO packed (id, pack, offset, length) VALUES (?, ?, ?, ?)", rows)
    except Exception as error:  # noqa: BLE001 (locked, full disk, not a database, no folder)
      raise NotStored(len(batch), error) from error

  def _append(self, batch: dict[str, bytes]) -> list[tuple[str, str, int, int]]:
    """Appends entries to this process's pack (the caller holds the lock); their index rows.
    The bytes reach the OS before they are indexed."""
    if self._pack is None or self._pack[0] != os.getpid():  # a forked child writes its own
      os.makedirs(f"{self._root}/{PACKS}", exist_ok=True)
      name = f"{os.getpid()}-{secrets.token_hex(8)}.pack"
      self._pack = (os.getpid(), name, open(f"{self._root}/{PACKS}/{name}", "xb"))
    _, name, file = self._pack
    rows, offset = [], file.tell()
    for source_id, entry in batch.items():
      rows.append((source_id, name, offset, len(entry)))
      offset += len(entry)
    # One write for the batch: a write per 11 KB entry cost 7.3 us of CPU each, joined 3.2.
    try:
      file.write(b"".join(batch.values()))
      file.flush()
    except OSError:
      self._pack = None  # part of the batch may be in the file: later batches go to a new one
      with contextlib.suppress(OSError):
        file.close()
      raise
    return rows


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
      connection.execute("CREATE TABLE IF NOT EXISTS packed (id TEXT PRIMARY KEY, pack TEXT NOT "
                         "NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL)")
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
