"""The ingest's HTTP/1.1 client (`pipeline.http_client`) against a scripted loopback server: every
framing it reads, keep-alive reuse, and the errors of answers that break off or stall."""
from __future__ import annotations

import asyncio
import gzip

import pytest

from pipeline import http_client

HEAD = http_client.header_block({"Host": "test", "Accept": "image/*"})


def _answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
  lines = [f"HTTP/1.1 {status}", *headers]
  return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _sized(body: bytes, *headers: str) -> bytes:
  return _answer(body, f"Content-Length: {len(body)}", *headers)


def _chunked(body: bytes) -> bytes:
  parts = [body[:5], body[5:]]
  framed = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts)
  return _answer(framed + b"0\r\nX-Trailer: t\r\n\r\n", "Transfer-Encoding: chunked")


async def _exchange(script, requests: int = 1, *, read_timeout: float = 5.0,
                    deadline: float = 10.0, max_bytes: int = 1 << 20):
  """Serves `script(request_number)` -> (bytes to send, then close?) on one loopback server;
  sends `requests` GETs through one pool. Returns (bodies or exceptions, connections made)."""
  connections, served = [], 0

  async def handle(reader, writer):
    nonlocal served
    connections.append(writer)
    try:
      while True:
        await reader.readuntil(b"\r\n\r\n")
        reply, close = script(served)
        served += 1
        writer.write(reply)
        await writer.drain()
        if close:
          writer.close()
          return
    except (asyncio.IncompleteReadError, ConnectionError):
      writer.close()

  server = await asyncio.start_server(handle, "127.0.0.1", 0)
  port = server.sockets[0].getsockname()[1]
  pool = http_client.ConnectionPool("http", "127.0.0.1", port, "test", maxsize=4)
  loop = asyncio.get_running_loop()
  results = []
  try:
    for _ in range(requests):
      try:
        response = await pool.request("/a.jpg", HEAD, connect_timeout=5,
                                      read_timeout=read_timeout)
        try:
          results.append((response.status, await response.read_body(
              max_bytes, loop.time() + deadline, read_timeout)))
        finally:
          response.release()
      except Exception as error:  # noqa: BLE001 (the outcome under test)
        results.append(error)
      await asyncio.sleep(0.05)  # lets a server's close reach the idle connection
  finally:
    pool.close()
    server.close()
  return results, len(connections)


@pytest.mark.parametrize("reply, reused", [
    (_sized(b"0123456789"), True),
    (_chunked(b"0123456789"), True),
    (_answer(b"", status="100 Continue") + _sized(b"0123456789"), True),
    (_sized(gzip.compress(b"0123456789"), "Content-Encoding: gzip"), True),
    (_sized(b"0123456789", "Connection: close"), False),
])
def test_every_framing_gives_the_body_and_kept_alive_connections_are_reused(reply, reused):
  results, connections = asyncio.run(_exchange(lambda n: (reply, False), requests=3))
  assert results == [(200, b"0123456789")] * 3
  assert connections == (1 if reused else 3)


def test_a_body_running_to_the_end_of_the_connection():
  reply = b"HTTP/1.0 200 OK\r\n\r\n0123456789"
  results, connections = asyncio.run(_exchange(lambda n: (reply, True), requests=2))
  assert results == [(200, b"0123456789")] * 2 and connections == 2


def test_a_connection_the_server_closed_after_its_answer_is_replaced_once():
  """Stale keep-alive: the server closes without saying so; the next request goes out anew."""
  results, connections = asyncio.run(_exchange(lambda n: (_sized(b"abc"), True), requests=3))
  assert results == [(200, b"abc")] * 3 and connections == 3


def test_bytes_after_the_body_keep_a_connection_from_reuse():
  results, connections = asyncio.run(_exchange(lambda n: (_sized(b"abc") + b"junk", False), 2))
  assert results == [(200, b"abc")] * 2 and connections == 2


@pytest.mark.parametrize("reply, error, message", [
    (_answer(b"01234", "Content-Length: 10"), http_client.ProtocolError, "body's end"),
    (_answer(b"5\r\n01234\r\n"[:9], "Transfer-Encoding: chunked"), http_client.ProtocolError,
     "connection closed"),
    (_answer(b"3\r\n01234\r\n0\r\n\r\n", "Transfer-Encoding: chunked"),
     http_client.ProtocolError, "longer than its size"),
    (_answer(b"zz\r\n", "Transfer-Encoding: chunked"), http_client.ProtocolError,
     "bad chunk size"),
    (_answer(b"", "Content-Length: ten"), http_client.ProtocolError, "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", http_client.ProtocolError, "response head"),
    (b"SPDY/3 200 OK\r\n\r\n", http_client.ProtocolError, "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000 + b"\r\n", http_client.ProtocolError,
     "longer than"),
    (_sized(bytes(2000)), http_client.BodyTooLarge, ""),
    (_sized(gzip.compress(bytes(1 << 20)), "Content-Encoding: gzip"), http_client.BodyTooLarge,
     ""),
])
def test_answers_that_break_off_or_overflow_are_errors(reply, error, message):
  results, _ = asyncio.run(_exchange(lambda n: (reply, True), max_bytes=1000))
  assert isinstance(results[0], error) and message in str(results[0])


@pytest.mark.parametrize("deadline, error", [(5.0, TimeoutError),
                                             (0.3, http_client.DeadlineExceeded)])
def test_a_stalled_answer_times_out_per_read_and_by_the_deadline(deadline, error):
  """Head, a piece of the body, then silence: the read timeout (1 s), or the whole download's
  deadline when that comes first."""
  results, _ = asyncio.run(_exchange(
      lambda n: (_answer(b"01234", "Content-Length: 10"), False), read_timeout=1.0,
      deadline=deadline))
  assert type(results[0]) is error


def test_a_server_that_never_answers_times_out():
  async def silent():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    pool = http_client.ConnectionPool("http", "127.0.0.1", server.sockets[0].getsockname()[1],
                                      "test", maxsize=1)
    try:
      with pytest.raises(TimeoutError):
        await pool.request("/", HEAD, connect_timeout=5, read_timeout=0.3)
    finally:
      pool.close()
      server.close()
  asyncio.run(silent())
