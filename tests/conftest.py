"""Shared test fixtures: tiny generated images, a loopback HTTP server, a tiny ingested dataset.

    .venv/bin/python -m pytest tests/          # or ./run_tests.sh
"""
from __future__ import annotations

import csv
import http.server
import pathlib
import threading
import time

import cv2
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_WEIGHTS = REPO_ROOT.parent / "shared" / "weights"
MOBILENET_WEIGHTS = SHARED_WEIGHTS / "mobilenet_1_0_224_imagenet_notop.weights.h5"


def ingest_emoji_sample(name: str, label_column: str, out: pathlib.Path) -> pathlib.Path:
  """`data/sample/<name>.csv` ingested at 128 px, split 60/20/20 grouped by emoji; for the
  real-weights tests, which are skipped where the shared MobileNet weights are absent."""
  if not MOBILENET_WEIGHTS.exists():
    pytest.skip(f"{MOBILENET_WEIGHTS} is absent (the shared real weights are not on this machine)")
  from pipeline import run as ingest

  ingest.run(["--source", str(REPO_ROOT / "data" / "sample" / f"{name}.csv"), "--out", str(out),
              "--image-size", "128", "--label-column", label_column, "--group-column", "group",
              "--splits", "train=60,val=20,test=20"])
  return out


def make_image(size: tuple[int, int], label_index: int, seed: int) -> np.ndarray:
  """A BGR image whose class is visible: a filled disc (class 0) or square (class 1) in a colour."""
  rng = np.random.default_rng(seed)
  height, width = size
  image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
  colour = [(40, 40, 200), (200, 60, 30), (30, 200, 60), (200, 200, 40)][label_index % 4]
  centre, radius = (width // 2, height // 2), min(width, height) // 3
  if label_index % 2 == 0:
    cv2.circle(image, centre, radius, colour, -1)
  else:
    cv2.rectangle(image, (centre[0] - radius, centre[1] - radius),
                  (centre[0] + radius, centre[1] + radius), colour, -1)
  return image


def write_image_set(folder: pathlib.Path, count: int, size: int, classes=("a", "b"),
                    groups: int | None = None) -> pathlib.Path:
  """Writes `count` labelled JPEG/PNG images under folder/img and a manifest; returns its path."""
  (folder / "img").mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(count):
    label = i % len(classes)
    image = make_image((size + i % 5, size + (i * 3) % 7), label, seed=i)
    name = f"img/{i:04d}{'.jpg' if i % 2 else '.png'}"
    cv2.imwrite(str(folder / name), image)
    row = [name, classes[label]]
    if groups:
      row.append(f"g{i % groups}")
    rows.append(row)
  manifest = folder / "manifest.csv"
  with manifest.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image_url", "label"] + (["group"] if groups else []))
    writer.writerows(rows)
  return manifest


@pytest.fixture(scope="session")
def tiny_image_dataset(tmp_path_factory) -> pathlib.Path:
  """A 2-class, 24-image dataset ingested at 64 px with the real job (shared by later stages)."""
  from pipeline import run as ingest

  folder = tmp_path_factory.mktemp("tiny_src")
  manifest = write_image_set(folder, 24, 72)
  out = tmp_path_factory.mktemp("tiny_images") / "images"
  ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", "64",
              "--splits", "train=60,val=20,test=20"])
  return out


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `server.routes[path]`: (status, headers, body) or a callable(handler)."""

  def do_GET(self):  # noqa: N802 (http.server's naming)
    self.server.hits.append(self.path)
    route = self.server.routes.get(self.path.split("?", 1)[0])
    if route is None:
      self.send_response(404)
      self.end_headers()
      return
    if callable(route):
      route(self)
      return
    status, headers, body = route
    self.send_response(status)
    for key, value in headers.items():
      self.send_header(key, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


class _Server(http.server.ThreadingHTTPServer):
  # socketserver listens with a backlog of 5: ingest opens up to --max-per-host (8)
  # connections at once, and on a busy machine the accept thread fell behind, the kernel
  # dropped a SYN and the client's retransmission came a second later, past a test's --timeout.
  request_queue_size = 128


@pytest.fixture
def http_server():
  """A loopback HTTP server on 127.0.0.1; set `server.routes`, read `server.hits`."""
  server = _Server(("127.0.0.1", 0), _Handler)
  server.routes, server.hits = {}, []
  server.daemon_threads = True
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  server.url = f"http://127.0.0.1:{server.server_address[1]}"
  yield server
  server.shutdown()
  server.server_close()


def send(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"",
         headers: dict[str, str] | None = None) -> None:
  """Answers a request from a callable route: status, headers, Content-Length and body (a
  client that already gave up is not an error)."""
  handler.send_response(status)
  for key, value in (headers or {}).items():
    handler.send_header(key, value)
  handler.send_header("Content-Length", str(len(body)))
  handler.end_headers()
  try:
    handler.wfile.write(body)
  except (BrokenPipeError, ConnectionResetError):
    pass


def slow_drip(seconds_per_byte: float, total: int):
  """A route that sends a valid-looking header then one byte at a time."""
  def route(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", str(total))
    handler.end_headers()
    try:
      for _ in range(total):
        handler.wfile.write(b"\xff")
        handler.wfile.flush()
        time.sleep(seconds_per_byte)
    except (BrokenPipeError, ConnectionResetError):
      pass
  return route
