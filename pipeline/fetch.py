"""Fetching image bytes from local paths, gs:// and http(s), with the guards the open web needs.

    fetcher = fetch.Fetcher(fetch.FetchConfig(allowed_networks=("127.0.0.1/32",)))
    data = fetcher.fetch("https://example.org/cat.jpg")   # bytes, or raises FetchError

HTTP(S) guards: connect/read timeouts and a total deadline per download, a byte cap (checked on
Content-Length and while streaming), bounded retries with exponential backoff for 429, 5xx and
connection errors, and an address guard: every hop's host is resolved and loopback, private,
link-local (169.254.169.254 metadata), multicast, reserved and unspecified addresses are refused
unless `allowed_networks` names them. The connection then goes to the vetted address itself,
so a second DNS answer cannot swap it (DNS rebinding). Redirects are followed by hand, each hop
vetted the same way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import socket
import time
import urllib.parse
import uuid
from collections.abc import Sequence

import tensorflow as tf
import urllib3

from pipeline import sources

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 << 10
_MAX_RETRY_AFTER_SECONDS = 10.0


class FetchError(ValueError):
  """A source that could not be fetched; `reason` is the dead-letter code."""

  def __init__(self, reason: str, message: str, *, retryable: bool = False):
    super().__init__(message)
    self.reason = reason
    self.retryable = retryable


@dataclasses.dataclass(frozen=True)
class FetchConfig:
  """Limits of one download."""
  connect_timeout: float = 10.0
  read_timeout: float = 30.0
  deadline: float = 60.0
  max_bytes: int = 50 << 20
  retries: int = 3
  backoff: float = 0.5
  max_redirects: int = 5
  allowed_networks: tuple[str, ...] = ()
  user_agent: str = "headstart/0.1 (+https://github.com/headstart)"


def _vet_address(address: str, allowed: Sequence[ipaddress._BaseNetwork]) -> None:
  ip = ipaddress.ip_address(address.split("%", 1)[0])
  if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
    ip = ip.ipv4_mapped
  if any(ip in network for network in allowed):
    return
  if (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
      or ip.is_unspecified or not ip.is_global):
    raise FetchError("blocked_address", f"address {ip} is loopback, private, link-local or "
                     "otherwise not public; refused (allow it explicitly with --allow-network)")


class Fetcher:
  """Fetches bytes; holds one connection pool per vetted (scheme, address, port, host)."""

  def __init__(self, config: FetchConfig):
    self.config = config
    self._allowed = tuple(ipaddress.ip_network(n, strict=False) for n in config.allowed_networks)
    self._pools: dict[tuple, urllib3.connectionpool.HTTPConnectionPool] = {}

  def fetch(self, location: str) -> bytes:
    """Returns the bytes at `location` (local path, gs:// or http(s) URL).

    Raises:
      FetchError: with a dead-letter reason code.
    """
    if location.split("://", 1)[0].lower() in sources.REMOTE_SCHEMES:
      return self._fetch_http(location)
    return self._fetch_file(location)

  def _fetch_file(self, location: str) -> bytes:
    try:
      info = tf.io.gfile.stat(location)
      if info.is_directory:
        raise FetchError("not_a_file", f"{location!r} is a directory")
      if info.length > self.config.max_bytes:
        raise FetchError("too_many_bytes",
                         f"file is {info.length} bytes; the cap is {self.config.max_bytes}")
      with tf.io.gfile.GFile(location, "rb") as f:
        return f.read()
    except tf.errors.NotFoundError:
      raise FetchError("not_found", f"file {location!r} does not exist") from None
    except tf.errors.OpError as error:  # permission denied, I/O error, bucket refused ...
      raise FetchError("unreadable", f"could not read {location!r}: {error.message}") from None

  # -- HTTP --------------------------------------------------------------------------------------

  def _fetch_http(self, url: str) -> bytes:
    started = time.monotonic()
    attempt = 0
    while True:
      try:
        return self._follow_redirects(url, started)
      except FetchError as error:
        attempt += 1
        elapsed = time.monotonic() - started
        delay = getattr(error, "retry_after", None) or self.config.backoff * 2 ** (attempt - 1)
        if (not error.retryable or attempt > self.config.retries
            or elapsed + delay > self.config.deadline):
          raise
        time.sleep(delay)

  def _follow_redirects(self, url: str, started: float) -> bytes:
    for _ in range(self.config.max_redirects + 1):
      response = self._request(url, started)
      try:
        if response.status in _REDIRECT_STATUSES:
          target = response.headers.get("Location")
          if not target:
            raise FetchError("http_error", f"redirect {response.status} without a Location")
          url = urllib.parse.urljoin(url, target)
          if urllib.parse.urlsplit(url).scheme.lower() not in sources.REMOTE_SCHEMES:
            raise FetchError("unsupported_scheme", "redirect to a non-http(s) URL refused")
          continue
        if response.status in _RETRY_STATUSES:
          error = FetchError(f"http_{response.status}", f"HTTP {response.status}", retryable=True)
          retry_after = response.headers.get("Retry-After", "")
          if retry_after.isdigit():
            error.retry_after = min(float(retry_after), _MAX_RETRY_AFTER_SECONDS)
          raise error
        if response.status != 200:
          reason = "not_found" if response.status in (404, 410) else f"http_{response.status}"
          raise FetchError(reason, f"HTTP {response.status}")
        return self._read_body(response, started)
      finally:
        response.release_conn()
    raise FetchError("too_many_redirects", f"more than {self.config.max_redirects} redirects")

  def _pool(self, scheme: str, host: str, port: int, address: str):
    key = (scheme, address, port, host)
    if key not in self._pools:
      timeout = urllib3.Timeout(connect=self.config.connect_timeout, read=self.config.read_timeout)
      if scheme == "https":
        self._pools[key] = urllib3.HTTPSConnectionPool(
            address, port, timeout=timeout, retries=False, server_hostname=host,
            assert_hostname=host, maxsize=4)
      else:
        self._pools[key] = urllib3.HTTPConnectionPool(address, port, timeout=timeout,
                                                      retries=False, maxsize=4)
    return self._pools[key]

  def _request(self, url: str, started: float) -> urllib3.BaseHTTPResponse:
    parts = urllib.parse.urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname
    if not host:
      raise FetchError("bad_url", "URL has no host")
    port = parts.port or (443 if scheme == "https" else 80)
    try:
      infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
      raise FetchError("dns_error", f"cannot resolve host: {error}", retryable=False) from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:  # every answer must be public, not just the first
      _vet_address(address, self._allowed)
    path = parts.path or "/"
    if parts.query:
      path += "?" + parts.query
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": self.config.user_agent,
               "Accept": "image/*"}
    if parts.username:
      headers.update(urllib3.make_headers(
          basic_auth=f"{urllib.parse.unquote(parts.username)}:"
                     f"{urllib.parse.unquote(parts.password or '')}"))
    remaining = self.config.deadline - (time.monotonic() - started)
    if remaining <= 0:
      raise FetchError("timeout", f"total deadline of {self.config.deadline:g}s exceeded")
    try:
      return self._pool(scheme, host, port, addresses[0]).urlopen(
          "GET", path, headers=headers, redirect=False, preload_content=False,
          timeout=urllib3.Timeout(connect=min(self.config.connect_timeout, remaining),
                                  read=min(self.config.read_timeout, remaining)))
    except urllib3.exceptions.NewConnectionError as error:
      # Checked first: urllib3 2 makes it a subclass of ConnectTimeoutError.
      raise FetchError("connection_error", sources.redact(f"cannot connect: {error}"),
                       retryable=True) from None
    except urllib3.exceptions.TimeoutError as error:
      raise FetchError("timeout", f"timed out: {type(error).__name__}", retryable=True) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
      raise FetchError("connection_error", sources.redact(f"{type(error).__name__}: {error}"),
                       retryable=True) from None

  def _read_body(self, response: urllib3.BaseHTTPResponse, started: float) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > self.config.max_bytes:
      raise FetchError("too_many_bytes", f"Content-Length {declared} exceeds the cap of "
                       f"{self.config.max_bytes} bytes")
    chunks, total = [], 0
    try:
      for chunk in response.stream(_CHUNK_BYTES):
        total += len(chunk)
        if total > self.config.max_bytes:
          raise FetchError("too_many_bytes", f"body exceeds the cap of {self.config.max_bytes} bytes")
        if time.monotonic() - started > self.config.deadline:
          raise FetchError("timeout", f"total deadline of {self.config.deadline:g}s exceeded "
                           f"after {total} bytes")
        chunks.append(chunk)
    except urllib3.exceptions.TimeoutError:
      raise FetchError("timeout", "read timed out", retryable=True) from None
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError) as error:
      raise FetchError("connection_error", f"body interrupted: {type(error).__name__}",
                       retryable=True) from None
    return b"".join(chunks)


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
