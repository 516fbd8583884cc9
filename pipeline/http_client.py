"""A lean asyncio HTTP/1.1 client for ingest's downloads: GET over keep-alive connections to an
address the caller has vetted (`fetch.Fetcher` resolves, vets and picks it; this module never
resolves a name).

    pool = http_client.ConnectionPool("https", "93.184.216.34", 443, "example.org", maxsize=8)
    head = http_client.header_block({"Host": "example.org"})   # once per host, not per request
    response = await pool.request("/a.jpg?w=1", head, connect_timeout=10, read_timeout=30)
    body = await response.read_body(max_bytes=50 << 20, deadline=loop.time() + 60,
                                    read_timeout=30)
    response.release()          # the connection goes back to the pool when it may be reused

Why its own client (issue 17): at ~11 KB per image a download cost 0.27 ms of CPU in urllib3
and 0.13 ms in `http.client` alone (headers parsed through `email.parser`), against ~0.02 ms for
the bytes on a socket; and hundreds of downloads in flight on threads cost more in GIL
hand-offs than the downloads themselves (256 threads: 0.84 ms per image; one event loop: under
0.1 ms). This client does only what a download needs, on one event loop: a request line and a
few headers out; status, headers and a body framed by Content-Length, chunked encoding or the
connection's end back; gzip/deflate decoded under the byte cap (a small body must not inflate
past it); TLS with certificate and host name checks (`ssl.create_default_context`). Answers
other than 200 are not read: their connection is closed.

Errors: `ConnectError` (the address refused or cannot be reached: the caller may try its next
vetted address), `TimeoutError` (connect or read), `ProtocolError` (a malformed answer or a
connection that ended early), `BodyTooLarge`, `DeadlineExceeded`.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Mapping

_HEAD_LIMIT = 64 << 10
_READ_BYTES = 256 << 10
# A body's read timeout is moved on only once the new deadline is this much later (see read_body).
_RESCHEDULE_SECONDS = 1.0
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


class _Stale(Exception):
  """A kept-alive connection the server had closed before this request: retried once anew."""


def header_block(headers: Mapping[str, str]) -> bytes:
  """Request header lines as sent, blank line included (the same for every request to a host:
  built once, not per request)."""
  return "".join([*(f"{k}: {v}\r\n" for k, v in headers.items()), "\r\n"]).encode("latin-1")


def request_target(path: str, query: str) -> str:
  """The request target of a URL's path and query, %-encoding what may not stand in it."""
  target = (path or "/") + (f"?{query}" if query else "")
  if target.isascii() and target.isprintable() and " " not in target:
    return target
  return urllib.parse.quote(target, safe=_TARGET_SAFE)


class _Connection:
  """One stream pair, kept alive between requests."""
  __slots__ = ("reader", "writer", "used")

  def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    self.reader, self.writer, self.used = reader, writer, False

  def close(self) -> None:
    self.writer.close()


class Response:
  """Status and headers of one answer; the body is read with `read_body`."""

  def __init__(self, pool: ConnectionPool, connection: _Connection, status: int,
               headers: dict[str, list[str]], version: str):
    self.status = status
    self._headers = headers
    self._pool = pool
    self._connection = connection
    self._finished = False
    tokens = {t.strip().lower() for v in self.getlist("Connection") for t in v.split(",")}
    self._reusable = "close" not in tokens and (version != "HTTP/1.0" or "keep-alive" in tokens)

  def get(self, name: str, default: str | None = None) -> str | None:
    """The last value of header `name` (any case), or `default`."""
    values = self._headers.get(name.lower())
    return values[-1] if values else default

  def getlist(self, name: str) -> list[str]:
    """Every value of header `name` (any case), in order."""
    return list(self._headers.get(name.lower(), ()))

  async def read_body(self, max_bytes: int, deadline: float, read_timeout: float) -> bytes:
    """The whole body, decoded (gzip, deflate), at most `max_bytes` of it, each read within
    `read_timeout` seconds and all by `deadline` (event-loop time).

    Raises:
      BodyTooLarge, DeadlineExceeded, TimeoutError, ProtocolError, zlib.error.
    """
    decoder = _decoder(self.get("Content-Encoding", ""))
    chunks, total = [], 0
    loop = asyncio.get_running_loop()
    try:
      # One timeout moved on after pieces (a context per read cost more than the read), and only
      # once it is a second old: moving a timer is a heap push, and a small body arrives in one
      # piece. A body that stalls is given up `read_timeout` seconds (at most one more) after
      # its last piece.
      async with asyncio.timeout_at(min(loop.time() + read_timeout, deadline)) as timeout:
        async for chunk in self._raw_chunks():
          when = min(loop.time() + read_timeout, deadline)
          if when - timeout.when() >= _RESCHEDULE_SECONDS:
            timeout.reschedule(when)
          if decoder is not None:
            chunk = decoder.decompress(chunk, max_bytes - total + 1)
          total += len(chunk)
          if total > max_bytes:
            raise BodyTooLarge()
          chunks.append(chunk)
    except TimeoutError:
      if loop.time() >= deadline:
        raise DeadlineExceeded(f"after {total} bytes") from None
      raise
    if decoder is not None:
      chunks.append(decoder.flush())
      if total + len(chunks[-1]) > max_bytes:
        raise BodyTooLarge()
    self._finished = True
    return b"".join(chunks)

  async def _raw_chunks(self) -> AsyncIterator[bytes]:
    """The body as received: framed by chunked encoding, Content-Length or the end."""
    reader = self._connection.reader
    try:
      if "chunked" in (self.get("Transfer-Encoding") or "").lower():
        while size := await _chunk_size(reader):
          async for piece in _exactly(reader, size):
            yield piece
          if await _read_line(reader):
            raise ProtocolError("chunk data longer than its size")
        while await _read_line(reader):  # trailers
          pass
        return
      length = self.get("Content-Length")
      if length is not None:
        if not length.strip().isdigit():
          raise ProtocolError(f"bad Content-Length {length!r}")
        async for piece in _exactly(reader, int(length)):
          yield piece
        return
      self._reusable = False
      while piece := await reader.read(_READ_BYTES):
        yield piece
    except (ConnectionError, ssl.SSLError) as error:
      raise ProtocolError(f"connection broken: {error}") from None

  def release(self) -> None:
    """Returns the connection to its pool when the answer allows reuse (its body read whole);
    closes it otherwise. Call once, after `read_body` or instead of it."""
    connection, self._connection = self._connection, None
    if connection is None:
      return
    if self._reusable and self._finished:
      self._pool.put(connection)
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


async def _exactly(reader: asyncio.StreamReader, length: int) -> AsyncIterator[bytes]:
  """`length` bytes, in the pieces they arrive in."""
  while length:
    piece = await reader.read(min(length, _READ_BYTES))
    if not piece:
      raise ProtocolError(f"connection closed {length} bytes before the body's end")
    length -= len(piece)
    yield piece


async def _read_line(reader: asyncio.StreamReader) -> bytes:
  try:
    return (await reader.readuntil(b"\r\n"))[:-2]
  except asyncio.IncompleteReadError:
    raise ProtocolError("connection closed inside a chunk header") from None
  except asyncio.LimitOverrunError:
    raise ProtocolError("chunk header line too long") from None


async def _chunk_size(reader: asyncio.StreamReader) -> int:
  text = (await _read_line(reader)).split(b";", 1)[0].strip()
  try:
    return int(text, 16)
  except ValueError:
    raise ProtocolError(f"bad chunk size {text[:20]!r}") from None


def _parse_head(head: bytes) -> tuple[str, int, dict[str, list[str]]]:
  lines = head.decode("latin-1").split("\r\n")
  parts = lines[0].split(" ", 2)
  if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
    raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
  headers: dict[str, list[str]] = {}
  for line in lines[1:]:
    if not line:
      continue
    name, colon, value = line.partition(":")
    if not colon:
      raise ProtocolError(f"malformed header line {line[:80]!r}")
    headers.setdefault(name.strip().lower(), []).append(value.strip())
  return parts[0], int(parts[1]), headers


class ConnectionPool:
  """Kept-alive connections to one (scheme, address, port, host name); at most `maxsize` idle.

  Every connection goes to `address` as given: the caller vetted it, and no lookup happens
  here (a second DNS answer cannot swap it). TLS checks the certificate against `host`. Used
  from its event loop's thread only.
  """

  def __init__(self, scheme: str, address: str, port: int, host: str, maxsize: int,
               ssl_context: ssl.SSLContext | None = None):
    if scheme not in ("http", "https"):
      raise ValueError(f"scheme must be http or https, got {scheme!r}")
    self.scheme, self.address, self.port, self.host = scheme, address, port, host
    self._maxsize = maxsize
    self._context = ssl_context
    self._idle: list[_Connection] = []
    self._closed = False

  async def _connect(self, timeout: float) -> _Connection:
    tls = None
    if self.scheme == "https":
      tls = self._context or ssl.create_default_context()
    try:
      async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            self.address, self.port, ssl=tls, server_hostname=self.host if tls else None,
            limit=_HEAD_LIMIT)
    except ssl.SSLError as error:
      raise ProtocolError(f"TLS handshake with {self.host} failed: {error}") from None
    except TimeoutError:
      raise
    except OSError as error:
      raise ConnectError(f"cannot connect to {self.address} port {self.port}: {error}") from None
    return _Connection(reader, writer)

  def put(self, connection: _Connection) -> None:
    """Keeps a connection whose answer was read whole for the next request."""
    connection.used = True
    if not self._closed and len(self._idle) < self._maxsize:
      self._idle.append(connection)
    else:
      connection.close()

  def _idle_connection(self) -> _Connection | None:
    while self._idle:
      connection = self._idle.pop()
      if not (connection.reader.at_eof() or connection.writer.is_closing()):
        return connection
      connection.close()  # the server closed it while it was idle
    return None

  async def request(self, target: str, headers: bytes, *, connect_timeout: float,
                    read_timeout: float) -> Response:
    """Sends GET `target` with `headers` (a `header_block`); returns the answer with its head
    read.

    Raises:
      ConnectError, TimeoutError, ProtocolError.
    """
    data = b"GET " + target.encode("latin-1") + b" HTTP/1.1\r\n" + headers
    if _log.isEnabledFor(logging.DEBUG):
      _log.debug("GET %s (%s port %d)", target, self.address, self.port)
    connection = self._idle_connection()
    if connection is not None:
      try:
        return await self._exchange(connection, data, read_timeout)
      except _Stale:
        pass  # closed by the server just before this request: a new connection, once
    return await self._exchange(await self._connect(connect_timeout), data, read_timeout)

  async def _exchange(self, connection: _Connection, data: bytes,
                      read_timeout: float) -> Response:
    try:
      async with asyncio.timeout(read_timeout):
        connection.writer.write(data)
        head = await connection.reader.readuntil(b"\r\n\r\n")
        version, status, headers = _parse_head(head)
        while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints)
          head = await connection.reader.readuntil(b"\r\n\r\n")
          version, status, headers = _parse_head(head)
    except asyncio.IncompleteReadError as error:
      connection.close()
      if connection.used and not error.partial:
        raise _Stale() from None
      raise ProtocolError("connection closed before the response head ended") from None
    except asyncio.LimitOverrunError:
      connection.close()
      raise ProtocolError(f"response head longer than {_HEAD_LIMIT} bytes") from None
    except (ConnectionError, ssl.SSLError) as error:
      connection.close()
      if connection.used:
        raise _Stale() from None
      raise ProtocolError(f"connection broken: {error}") from None
    except BaseException:
      connection.close()
      raise
    return Response(self, connection, status, headers, version)

  def close(self) -> None:
    """Closes the idle connections; those in use close when released."""
    self._closed = True
    idle, self._idle = self._idle, []
    for connection in idle:
      connection.close()
