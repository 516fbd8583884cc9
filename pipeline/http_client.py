"""A lean HTTP/1.1 client for ingest's downloads: GET over keep-alive connections to an address
the caller has vetted (`fetch.Fetcher` resolves, vets and picks it; this module never resolves).

    pool = http_client.ConnectionPool("https", "93.184.216.34", 443, "example.org", maxsize=8)
    response = pool.request("/a.jpg?w=1", {"Host": "example.org"}, connect_timeout=10,
                            read_timeout=30)
    body = response.read_body(max_bytes=50 << 20, deadline=time.monotonic() + 60)
    response.release()          # the connection goes back to the pool when it may be reused

Why not urllib3 (used before issue 17): at ~11 KB images one download cost 0.27 ms of CPU in
urllib3 and 0.13 ms in `http.client` alone (header parsing through `email.parser`), against
~0.02 ms for the bytes on a socket; hundreds of images per second per core went to the client.
This client does only what a download needs: one request line and a few headers out; status,
headers, a body framed by Content-Length, chunked encoding or the connection's end back,
gzip/deflate decoded under the byte cap (a small body must not inflate past it), TLS with
certificate and host name checks (`ssl.create_default_context`). Non-200 answers are not read:
their connection is closed.

Errors: `ConnectError` (the address refused or is unreachable: the caller may try its next
vetted address), `TimeoutError` (connect or read), `ProtocolError` (a malformed answer or a
connection that ended early), `BodyTooLarge`, `DeadlineExceeded`.
"""
from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import Mapping

_HEAD_LIMIT = 64 << 10
_RECV_BYTES = 256 << 10
# Characters that may stand in a request target as they are (RFC 3986); others are %-encoded,
# as urllib3 did (a manifest URL with a space still works).
_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~"
_log = logging.getLogger("headstart.fetch")


class ConnectError(OSError):
  """The address refused the connection or cannot be reached."""


class ProtocolError(OSError):
  """A malformed answer, or a connection that ended before the answer did."""


class BodyTooLarge(Exception):
  """The body (decoded) passed the byte cap."""


class DeadlineExceeded(Exception):
  """The download's total deadline passed while reading the body."""

  def __init__(self, received: int):
    super().__init__(f"after {received} bytes")
    self.received = received


class _StaleConnection(Exception):
  """A kept-alive connection the server had closed before this request: retried once anew."""


def request_target(path: str, query: str) -> str:
  """The request target of a URL's path and query, %-encoding what may not stand in it."""
  target = (path or "/") + (f"?{query}" if query else "")
  if target.isascii() and target.isprintable() and " " not in target:
    return target
  return urllib.parse.quote(target, safe=_TARGET_SAFE)


class Response:
  """Status and headers of one answer; the body is read with `read_body`."""

  def __init__(self, connection: _Connection, status: int, headers: dict[str, list[str]],
               version: str):
    self.status = status
    self._headers = headers
    self._connection = connection
    self._reusable = not self._says_close(version)

  def _says_close(self, version: str) -> bool:
    tokens = {t.strip().lower() for v in self.getlist("Connection") for t in v.split(",")}
    return "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)

  def get(self, name: str, default: str | None = None) -> str | None:
    """The last value of header `name` (any case), or `default`."""
    values = self._headers.get(name.lower())
    return values[-1] if values else default

  def getlist(self, name: str) -> list[str]:
    """Every value of header `name` (any case), in order."""
    return list(self._headers.get(name.lower(), ()))

  def read_body(self, max_bytes: int, deadline: float, read_timeout: float) -> bytes:
    """The whole body, decoded (gzip, deflate), at most `max_bytes` of it.

    Raises:
      BodyTooLarge, DeadlineExceeded, TimeoutError, ProtocolError.
    """
    decoder = _decoder(self.get("Content-Encoding", ""))
    chunks, total = [], 0
    for chunk in self._raw_chunks(deadline, read_timeout):
      if decoder is not None:
        chunk = decoder.decompress(chunk, max_bytes - total + 1)
      total += len(chunk)
      if total > max_bytes:
        raise BodyTooLarge()
      chunks.append(chunk)
    if decoder is not None:
      tail = decoder.flush()
      total += len(tail)
      if total > max_bytes:
        raise BodyTooLarge()
      chunks.append(tail)
    return b"".join(chunks)

  def _raw_chunks(self, deadline: float, read_timeout: float):
    """The body as received: framed by chunked encoding, Content-Length or the end."""
    conn = self._connection
    if "chunked" in (self.get("Transfer-Encoding") or "").lower():
      yield from conn.chunked(deadline, read_timeout)
      return
    length = self.get("Content-Length")
    if length is not None:
      if not length.strip().isdigit():
        raise ProtocolError(f"bad Content-Length {length!r}")
      yield from conn.exactly(int(length), deadline, read_timeout)
      conn.finished = True
      return
    self._reusable = False
    yield from conn.until_closed(deadline, read_timeout)

  def release(self) -> None:
    """Returns the connection to its pool if the answer allows reuse (its body read whole);
    closes it otherwise. Call once, after `read_body` or instead of it."""
    connection, self._connection = self._connection, None
    if connection is None:
      return
    if self._reusable and connection.finished:
      connection.pool.put(connection)
    else:
      connection.close()


def _decoder(encoding: str):
  """A zlib decompressor for a Content-Encoding, or None for identity (and unknown codings,
  passed through as they are: the image check then refuses them)."""
  encoding = encoding.strip().lower()
  if encoding in ("gzip", "x-gzip"):
    return zlib.decompressobj(16 + zlib.MAX_WBITS)
  if encoding == "deflate":
    return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped, as RFC 9110 says
  return None


class _Connection:
  """One socket and its read buffer."""

  def __init__(self, pool: ConnectionPool, sock: socket.socket):
    self.pool = pool
    self.sock = sock
    self.finished = False   # the last answer was read to its end
    self.used = False       # served a request before (a kept-alive connection)
    self._buffer = bytearray()

  def close(self) -> None:
    try:
      self.sock.close()
    except OSError:
      pass

  def dropped(self) -> bool:
    """True when an idle connection is readable: the server closed it (or sent garbage)."""
    try:
      return bool(select.select([self.sock], [], [], 0)[0])
    except (OSError, ValueError):
      return True

  def _fill(self, deadline: float | None, read_timeout: float) -> bool:
    """Receives more bytes into the buffer; False at the end of the stream."""
    timeout = read_timeout
    if deadline is not None:
      left = deadline - time.monotonic()
      if left <= 0:
        raise DeadlineExceeded(len(self._buffer))
      timeout = min(timeout, left)
    self.sock.settimeout(timeout)
    try:
      data = self.sock.recv(_RECV_BYTES)
    except socket.timeout:
      if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(len(self._buffer)) from None
      raise
    except ssl.SSLError as error:
      raise ProtocolError(f"TLS error: {error}") from None
    except OSError as error:
      raise ProtocolError(f"connection broken: {error}") from None
    if not data:
      return False
    self._buffer += data
    return True

  def read_head(self, read_timeout: float) -> tuple[str, int, dict[str, list[str]]]:
    """(version, status, headers) of the next answer; 1xx answers are skipped."""
    while True:
      start = 0
      while (end := self._buffer.find(b"\r\n\r\n", start)) < 0:
        if len(self._buffer) > _HEAD_LIMIT:
          raise ProtocolError(f"response head longer than {_HEAD_LIMIT} bytes")
        start = max(0, len(self._buffer) - 3)
        try:
          more = self._fill(None, read_timeout)
        except ProtocolError:
          more = False  # reset by the peer: judged below like a close
        if not more:
          if not self._buffer and self.used:
            raise _StaleConnection()
          raise ProtocolError("connection closed before the response head ended")
      head = bytes(self._buffer[:end]).decode("latin-1")
      del self._buffer[:end + 4]
      version, status, headers = _parse_head(head)
      if not 100 <= status < 200:
        return version, status, headers

  def exactly(self, length: int, deadline: float, read_timeout: float):
    """`length` body bytes, in the pieces they arrive in."""
    while length:
      if not self._buffer and not self._fill(deadline, read_timeout):
        raise ProtocolError(f"connection closed {length} bytes before the body's end")
      piece = bytes(self._buffer[:length])
      del self._buffer[:len(piece)]
      length -= len(piece)
      yield piece

  def until_closed(self, deadline: float, read_timeout: float):
    """Every byte until the server closes the connection."""
    while self._buffer or self._fill(deadline, read_timeout):
      piece = bytes(self._buffer)
      self._buffer.clear()
      yield piece

  def _line(self, deadline: float, read_timeout: float) -> bytes:
    while (end := self._buffer.find(b"\r\n")) < 0:
      if len(self._buffer) > _HEAD_LIMIT:
        raise ProtocolError("chunk header line too long")
      if not self._fill(deadline, read_timeout):
        raise ProtocolError("connection closed inside a chunk header")
    line = bytes(self._buffer[:end])
    del self._buffer[:end + 2]
    return line

  def chunked(self, deadline: float, read_timeout: float):
    """The pieces of a chunked body; trailers are read and dropped."""
    while True:
      size_text = self._line(deadline, read_timeout).split(b";", 1)[0].strip()
      try:
        size = int(size_text, 16)
      except ValueError:
        raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
      if size == 0:
        while self._line(deadline, read_timeout):
          pass
        self.finished = True
        return
      yield from self.exactly(size, deadline, read_timeout)
      if self._line(deadline, read_timeout):
        raise ProtocolError("chunk data longer than its size")


def _parse_head(head: str) -> tuple[str, int, dict[str, list[str]]]:
  lines = head.split("\r\n")
  parts = lines[0].split(" ", 2)
  if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
    raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
  headers: dict[str, list[str]] = {}
  for line in lines[1:]:
    name, colon, value = line.partition(":")
    if not colon:
      raise ProtocolError(f"malformed header line {line[:80]!r}")
    headers.setdefault(name.strip().lower(), []).append(value.strip())
  return parts[0], int(parts[1]), headers


class ConnectionPool:
  """Kept-alive connections to one (scheme, address, port, host name); at most `maxsize` idle.

  Every connection goes to `address` as given: the caller vetted it, and no lookup happens
  here (a second DNS answer could not swap it). TLS checks the certificate against `host`.
  """

  def __init__(self, scheme: str, address: str, port: int, host: str, maxsize: int,
               ssl_context: ssl.SSLContext | None = None):
    if scheme not in ("http", "https"):
      raise ValueError(f"scheme must be http or https, got {scheme!r}")
    self.scheme, self.address, self.port, self.host = scheme, address, port, host
    self._maxsize = maxsize
    self._context = ssl_context
    self._idle: list[_Connection] = []
    self._lock = threading.Lock()
    self._closed = False

  def _connect(self, timeout: float) -> _Connection:
    try:
      sock = socket.create_connection((self.address, self.port), timeout=timeout)
    except socket.timeout:
      raise
    except OSError as error:
      raise ConnectError(f"cannot connect to {self.address} port {self.port}: {error}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if self.scheme == "https":
      context = self._context or ssl.create_default_context()
      try:
        sock = context.wrap_socket(sock, server_hostname=self.host)
      except ssl.SSLError as error:
        sock.close()
        raise ProtocolError(f"TLS handshake with {self.host} failed: {error}") from None
      except OSError:
        sock.close()
        raise
    return _Connection(self, sock)

  def _idle_connection(self) -> _Connection | None:
    while True:
      with self._lock:
        if not self._idle:
          return None
        connection = self._idle.pop()
      if not connection.dropped():
        return connection
      connection.close()

  def put(self, connection: _Connection) -> None:
    """Keeps a connection whose answer was read whole for the next request."""
    connection.finished, connection.used = False, True
    with self._lock:
      if not self._closed and len(self._idle) < self._maxsize:
        self._idle.append(connection)
        return
    connection.close()

  def request(self, target: str, headers: Mapping[str, str], *, connect_timeout: float,
              read_timeout: float) -> Response:
    """Sends GET `target`; returns the answer with its head read.

    Raises:
      ConnectError, TimeoutError, ProtocolError.
    """
    data = "".join([f"GET {target} HTTP/1.1\r\n",
                    *(f"{k}: {v}\r\n" for k, v in headers.items()), "\r\n"]).encode("latin-1")
    if _log.isEnabledFor(logging.DEBUG):
      _log.debug("GET %s (%s port %d)", target, self.address, self.port)
    connection = self._idle_connection()
    if connection is not None:
      try:
        return self._exchange(connection, data, read_timeout)
      except _StaleConnection:
        pass  # the server closed it while idle: a new connection, once
    return self._exchange(self._connect(connect_timeout), data, read_timeout)

  def _exchange(self, connection: _Connection, data: bytes, read_timeout: float) -> Response:
    try:
      connection.sock.settimeout(read_timeout)
      try:
        connection.sock.sendall(data)
      except (BrokenPipeError, ConnectionResetError):
        if connection.used:
          raise _StaleConnection() from None
        raise
      version, status, headers = connection.read_head(read_timeout)
    except socket.timeout:
      connection.close()
      raise
    except _StaleConnection:
      connection.close()
      raise
    except ssl.SSLError as error:
      connection.close()
      raise ProtocolError(f"TLS error: {error}") from None
    except OSError as error:
      connection.close()
      raise error if isinstance(error, ProtocolError) else ProtocolError(
          f"connection broken: {error}") from None
    return Response(connection, status, headers, version)

  def close(self) -> None:
    """Closes the idle connections; those in use close when released."""
    with self._lock:
      idle, self._idle, self._closed = self._idle, [], True
    for connection in idle:
      connection.close()
