"""A loopback image server for the ingest-from-HTTP benchmark: many distinct URLs over a few
JPEGs held in memory, with an optional added latency per response.

    python -m benchmarks.http_source --images DIR --latency 0.1 --hosts 32  # prints "URLS ..."

    with http_source.serve(jpegs_dir, latency=0.1, hosts=32) as urls:      # from the benchmark
      ...  # GET {urls[k]}/img/<i>.jpg -> the (i mod n)-th file of DIR, after `latency` seconds

`hosts` loopback addresses (127.0.0.1, 127.0.0.2, ...) each stand for one web host, so a
manifest spread over them meets the ingest's per-host limit as a real one spread over many
sites does.

One asyncio event loop in its own process: HTTP/1.1 keep-alive, Content-Length, no threads per
connection, so hundreds of connections waiting out their latency cost the server (and the two
cores it shares with the job) next to nothing; its CPU is not counted as the job's (the job's
process tree is measured, not this one's).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import pathlib
import subprocess
import sys
from collections.abc import Iterator, Sequence

_HEADER_LIMIT = 64 << 10


def _response(status: str, body: bytes) -> bytes:
  return (f"HTTP/1.1 {status}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n"
          "Connection: keep-alive\r\n\r\n").encode() + body


class _Server:
  """Answers GET /img/<i>.jpg with bodies[i % len(bodies)] after `latency` seconds."""

  def __init__(self, bodies: Sequence[bytes], latency: float):
    self._responses = [_response("200 OK", body) for body in bodies]
    self._missing = _response("404 Not Found", b"")
    self.latency = latency

  def answer(self, request_line: bytes) -> bytes:
    parts = request_line.split()
    path = parts[1].decode("latin-1") if len(parts) > 1 else ""
    name = path.rsplit("/", 1)[-1].split("?", 1)[0]
    if not (path.startswith("/img/") and name.endswith(".jpg") and name[:-4].isdigit()):
      return self._missing
    return self._responses[int(name[:-4]) % len(self._responses)]


class _Connection(asyncio.Protocol):
  """One keep-alive connection: each request's head in, its answer out (after the latency).

  A protocol and a timer per answer, not a stream pair and a sleeping task: the server shares
  the job's two cores, and with 100 ms per response the streams cost 0.065 ms of CPU per
  request, this 0.047 (0.043 and 0.040 without latency; most of it is the kernel's TCP).
  """

  def __init__(self, server: _Server):
    self._server = server
    self._buffer = b""
    self._transport: asyncio.Transport | None = None

  def connection_made(self, transport: asyncio.BaseTransport) -> None:
    self._transport = transport

  def data_received(self, data: bytes) -> None:
    self._buffer += data
    while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
      head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
      response = self._server.answer(head.split(b"\r\n", 1)[0])
      if self._server.latency > 0:
        asyncio.get_running_loop().call_later(self._server.latency, self._send, response)
      else:
        self._send(response)
    if len(self._buffer) > _HEADER_LIMIT:
      self._transport.close()

  def _send(self, response: bytes) -> None:
    if not self._transport.is_closing():
      self._transport.write(response)


async def _serve(bodies: Sequence[bytes], latency: float, hosts: int) -> None:
  server = _Server(bodies, latency)
  loop = asyncio.get_running_loop()
  servers = [await loop.create_server(lambda: _Connection(server), f"127.0.0.{index + 1}", 0,
                                      backlog=1024) for index in range(hosts)]
  urls = [f"http://{host}:{port}" for host, port, *_ in
          (server.sockets[0].getsockname() for server in servers)]
  print("URLS " + " ".join(urls), flush=True)
  await asyncio.gather(*(server.serve_forever() for server in servers))


def _bodies(folder: pathlib.Path) -> list[bytes]:
  files = sorted(folder.glob("*.jpg"))
  if not files:
    raise ValueError(f"no *.jpg in {folder}")
  return [path.read_bytes() for path in files]


@contextlib.contextmanager
def serve(folder: pathlib.Path, latency: float = 0.0, hosts: int = 1) -> Iterator[list[str]]:
  """Runs the server in a child process for the `with` block; yields its base URLs (one per
  loopback host)."""
  if not 1 <= hosts <= 254:
    raise ValueError(f"hosts must be 1-254, got {hosts!r}")
  process = subprocess.Popen([sys.executable, "-m", "benchmarks.http_source", "--images",
                              str(folder), "--latency", str(latency), "--hosts", str(hosts)],
                             stdout=subprocess.PIPE, text=True)
  try:
    line = process.stdout.readline()
    if not line.startswith("URLS "):
      raise RuntimeError(f"the image server did not start (said {line!r})")
    yield line.split()[1:]
  finally:
    process.kill()
    process.wait()


def main(argv: list[str] | None = None) -> int:
  """Serves until killed."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks.http_source")
  parser.add_argument("--images", required=True, help="folder of the *.jpg files to serve")
  parser.add_argument("--latency", type=float, default=0.0, help="seconds added per response")
  parser.add_argument("--hosts", type=int, default=1, help="loopback addresses to serve on")
  args = parser.parse_args(argv)
  asyncio.run(_serve(_bodies(pathlib.Path(args.images)), args.latency, args.hosts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
