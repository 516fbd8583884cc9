"""Stage 1 tests: the real ingest job end to end on generated images, plus its pure parts.

    .venv/bin/python -m pytest tests/test_pipeline.py -q
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import json
import logging
import pathlib
import threading
import time
import zlib

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from contracts import datasets, layout
import headstart
from pipeline import image_decode, sources, splits
from pipeline import run as ingest
from tests.conftest import REPO_ROOT, make_image, slow_drip, write_image_set


def _load_all(out: pathlib.Path) -> dict[str, list[dict]]:
  builder = tfds.builder_from_directory(str(out))
  return {split: list(tfds.as_numpy(builder.as_dataset(split=split)))
          for split in builder.info.splits}


def _errors(out: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines() if line]


def _png(image_bgr: np.ndarray) -> bytes:
  return cv2.imencode(".png", image_bgr)[1].tobytes()


def test_csv_manifest_to_tfds_dataset(tmp_path, tiny_image_dataset):
  manifest = datasets.read_manifest(str(tiny_image_dataset))
  records = _load_all(tiny_image_dataset)
  assert {s: len(r) for s, r in records.items()} == {
      s: v["num_examples"] for s, v in manifest["splits"].items()}
  assert sum(len(r) for r in records.values()) == 24
  example = records["train"][0]
  assert example["image"].shape == (64, 64, 3) and example["image"].dtype == np.uint8
  assert manifest["class_names"] == ["a", "b"] and manifest["task"] == "binary"
  assert manifest["counts"]["balanced"] and manifest["counts"]["dead_lettered"] == 0
  # ids are sha256 of the path relative to the manifest folder: identical on every machine.
  ids = {r["id"].decode() for rs in records.values() for r in rs}
  assert sources.source_id("img/0000.png") in ids
  for split, entry in manifest["splits"].items():
    for shard in entry["shards"]:
      assert datasets.file_sha256(str(tiny_image_dataset / shard["file"])) == shard["sha256"]


def test_bad_rows_are_dead_lettered_and_counts_balance(tmp_path):
  manifest = write_image_set(tmp_path / "src", 10, 48)
  img = tmp_path / "src" / "img"
  (img / "text.jpg").write_bytes(b"<html><body>not found</body></html>")
  (img / "empty.png").write_bytes(b"")
  (img / "trunc.jpg").write_bytes((img / "0001.jpg").read_bytes()[:300])
  (img / "tiny.png").write_bytes(_png(make_image((8, 8), 0, 1)))
  with manifest.open("a") as f:
    f.write("img/missing.jpg,a\nimg/text.jpg,b\nimg/empty.png,a\nimg/trunc.jpg,b\n"
            "img/tiny.png,a\nimg/0002.png,a\nimg/0003.jpg,a\n../outside.png,a\n"
            "ftp://host/x.jpg,a\n,a\nimg/0004.png,\ntoo,many,fields\n"
            "http://user:secret@example.invalid/x.jpg,a\n")
  with manifest.open("ab") as f:
    f.write(b"img/\xff\xfe.png,a\n")  # not UTF-8
  out = tmp_path / "out"
  summary = ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", "32",
                        "--max-error-fraction", "0.9", "--retries", "0", "--timeout", "2"])
  reasons = sorted(e["reason"] for e in _errors(out))
  assert reasons == sorted([
      "not_found", "not_an_image", "empty_file", "truncated", "too_small", "duplicate",
      "conflicting_label", "conflicting_label", "outside_root", "unsupported_scheme",
      "missing_url", "missing_label", "malformed_row", "malformed_row", "dns_error"])
  assert summary["written"] == 9 and summary["input_rows"] == 24 and summary["balanced"]
  assert "secret" not in (out / "errors.jsonl").read_text()
  assert all({"stage", "reason", "row", "message"} <= set(e) for e in _errors(out))
  assert sum(len(r) for r in _load_all(out).values()) == 9


def test_error_fraction_above_limit_fails_without_manifest(tmp_path):
  manifest = write_image_set(tmp_path / "src", 2, 48)
  with manifest.open("a") as f:
    f.write("img/missing1.jpg,a\nimg/missing2.jpg,b\nimg/missing3.jpg,b\n")
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="max-error-fraction"):
    ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", "32"])
  assert not (out / "manifest.json").exists()
  assert len(_errors(out)) == 3


def test_empty_manifest_and_bad_flags_give_one_line_errors(tmp_path, capsys):
  empty = tmp_path / "empty.csv"
  empty.write_text("image_url,label\n")
  assert headstart.main(["ingest", "--source", str(empty), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "no rows" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert headstart.main(["ingest", "--source", str(empty), "--out", "o", "--splits",
                         "train=80,bogus=20"]) == 2
  assert "'bogus'" in capsys.readouterr().err
  assert headstart.main(["ingest", "--source", "x.csv", "--out", "o", "--resize", "squash"]) == 2
  err = capsys.readouterr().err
  assert "invalid choice: 'squash'" in err and len(err.strip().splitlines()) == 1
  manifest = write_image_set(tmp_path / "src", 2, 40)
  assert headstart.main(["ingest", "--source", str(manifest), "--out", "o",
                         "--label-column", "gender"]) == 2
  assert "--label-column 'gender' is not a column" in capsys.readouterr().err


def test_class_folder_and_split_folder_trees(tmp_path):
  for split in ("train", "val"):
    for label in ("cat", "dog"):
      folder = tmp_path / "tree" / split / label
      folder.mkdir(parents=True)
      for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), make_image((40, 40), label == "dog", i))
  (tmp_path / "tree" / "train" / "notes.txt").write_text("stray file")
  out = tmp_path / "out"
  summary = ingest.run(["--source", str(tmp_path / "tree"), "--out", str(out),
                        "--image-size", "32"])
  records = _load_all(out)
  assert {s: len(r) for s, r in records.items()} == {"train": 6, "validation": 6}
  assert summary["by_reason"] == {"not_in_class_folder": 1}
  # The job's own clock: first row fetched to last image decoded, start-up left out.
  assert 0 < summary["fetch_decode_seconds"] < summary["seconds"]
  flat = tmp_path / "flat"
  for label in ("x", "y", "z"):
    (flat / label).mkdir(parents=True)
    cv2.imwrite(str(flat / label / "1.jpg"), make_image((40, 40), 0, 3))
  ingest.run(["--source", str(flat), "--out", str(tmp_path / "out2"), "--image-size", "32"])
  assert datasets.read_manifest(str(tmp_path / "out2"))["class_names"] == ["x", "y", "z"]


def test_split_assignment_is_deterministic_grouped_and_stable():
  spec = splits.parse_splits("train=80,val=10,test=10")
  ids = [sources.source_id(f"img/{i}.jpg") for i in range(2000)]
  first = {i: splits.assign_split(i, spec) for i in ids}
  assert first == {i: splits.assign_split(i, spec) for i in ids}
  counts = {s: list(first.values()).count(s) for s in ("train", "validation", "test")}
  assert 1450 < counts["train"] < 1750 and counts["validation"] > 120 and counts["test"] > 120
  # Adding rows never moves existing rows: the split depends on the key alone.
  more = {i: splits.assign_split(i, spec) for i in ids + ["new"]}
  assert all(more[i] == first[i] for i in ids)
  with pytest.raises(ValueError, match="'x'"):
    splits.parse_splits("train=x")


def test_groups_never_span_splits(tmp_path):
  manifest = write_image_set(tmp_path / "src", 30, 40, groups=6)
  out = tmp_path / "out"
  ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", "32",
              "--group-column", "group", "--splits", "train=50,val=25,test=25"])
  split_of_group: dict[str, set] = {}
  for split, records in _load_all(out).items():
    for record in records:
      split_of_group.setdefault(record["group"].decode(), set()).add(split)
  assert len(split_of_group) == 6 and all(len(s) == 1 for s in split_of_group.values())


def test_split_column_overrides_hash(tmp_path):
  (tmp_path / "img").mkdir()
  rows = ["image_url,label,fold"]
  for i in range(6):
    cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), make_image((40, 40), i % 2, i))
    rows.append(f"img/{i}.png,{'ab'[i % 2]},{['train', 'dev', 'test'][i % 3]}")
  (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
  ingest.run(["--source", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"),
              "--image-size", "32", "--split-column", "fold"])
  counts = {s: len(r) for s, r in _load_all(tmp_path / "out").items()}
  assert counts == {"train": 2, "validation": 2, "test": 2}


def test_http_sources_retries_guard_and_dead_letters(tmp_path, http_server):
  good = _png(make_image((48, 48), 0, 1))
  metadata_hits = []

  class Metadata(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
      metadata_hits.append(self.path)
      self.send_response(200)
      self.end_headers()

    def log_message(self, *args):
      pass

  metadata = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Metadata)
  threading.Thread(target=metadata.serve_forever, daemon=True).start()
  flaky_calls = []

  def flaky(handler):
    flaky_calls.append(1)
    if len(flaky_calls) == 1:
      handler.send_response(503)
      handler.send_header("Content-Length", "0")
      handler.end_headers()
      return
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(good)))
    handler.end_headers()
    handler.wfile.write(good)

  def endless(handler):  # no Content-Length, never-ending body: stopped by the byte cap
    handler.send_response(200)
    handler.end_headers()
    try:
      while True:
        handler.wfile.write(b"\x89PNG\r\n\x1a\n" + bytes(65536))
    except (BrokenPipeError, ConnectionResetError):
      pass

  meta_url = f"http://127.0.0.2:{metadata.server_address[1]}/latest/meta-data"
  http_server.routes = {
      "/good.png": (200, {"Content-Type": "image/png"}, good),
      "/flaky.png": flaky,
      "/soft404.jpg": (200, {"Content-Type": "text/html"}, b"<!DOCTYPE html><p>gone</p>"),
      "/huge.png": (200, {}, b"\x89PNG\r\n\x1a\n" + b"0" * 30000),
      "/forbidden.png": (403, {}, b""),
      "/busy.png": (429, {}, b""),
      "/to-metadata.png": (302, {"Location": meta_url}, b""),
      "/drip.png": slow_drip(0.2, 100),
      # 10 MB of zeros gzip-compressed to ~10 KB: the byte cap counts decoded bytes.
      "/gzip-bomb.png": (200, {"Content-Encoding": "gzip"},
                         gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(10 << 20))),
      "/endless.png": endless,
  }
  rows = ["image_url,label", f"{http_server.url}/good.png,a", f"{http_server.url}/flaky.png,b",
          f"{http_server.url}/soft404.jpg,a", f"{http_server.url}/huge.png,a",
          f"{http_server.url}/forbidden.png,a", f"{http_server.url}/busy.png,b",
          f"{http_server.url}/nothing.png,b", f"{http_server.url}/to-metadata.png,a",
          f"{http_server.url}/drip.png,a", f"{meta_url}/direct,b",
          "http://169.254.169.254/latest/meta-data,a", "http://[::1]/x.png,a",
          "http://2130706434/x.png,a", "http://0xA9FEA9FE/x.png,a", "http://0177.0.0.2/x.png,a",
          "http://[::ffff:169.254.169.254]/x.png,a", "http://10.0.0.5/x.png,a",
          f"{http_server.url}/gzip-bomb.png,a", f"{http_server.url}/endless.png,b"]
  (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
  out = tmp_path / "out"
  summary = ingest.run(["--source", str(tmp_path / "m.csv"), "--out", str(out),
                        "--image-size", "32", "--allow-network", "127.0.0.1/32",
                        "--max-bytes", "20000", "--timeout", "2", "--retries", "2",
                        "--max-error-fraction", "1"])
  metadata.shutdown()
  by_source = {e["row"]["source"].rsplit("/", 1)[-1]: e["reason"] for e in _errors(out)}
  assert summary["written"] == 2 and len(flaky_calls) == 2  # one retry, exactly one output
  assert summary["balanced"] and summary["input_rows"] == 19
  assert {k: v for k, v in by_source.items() if k != "x.png"} == {
      "soft404.jpg": "not_an_image", "huge.png": "too_many_bytes", "forbidden.png": "http_403",
      "busy.png": "http_429", "nothing.png": "not_found", "to-metadata.png": "blocked_address",
      "drip.png": "timeout", "direct": "blocked_address", "meta-data": "blocked_address",
      "gzip-bomb.png": "too_many_bytes", "endless.png": "too_many_bytes"}
  reasons = sorted(e["reason"] for e in _errors(out))
  assert reasons.count("blocked_address") == 9  # every spelling of loopback/metadata/private
  assert metadata_hits == []


def test_multi_processing_runner_mode(tmp_path):
  manifest = write_image_set(tmp_path / "src", 12, 40)
  out = tmp_path / "out"
  summary = ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", "32",
                        "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
  assert summary["written"] == 12 and summary["balanced"]
  assert sum(len(r) for r in _load_all(out).values()) == 12


# --- image decoding policy -----------------------------------------------------------------------


def _pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt,expected", [
    ("L", "PNG", (128, 128, 128)),
    ("P", "PNG", (255, 0, 0)),
    ("CMYK", "JPEG", (255, 0, 0)),
    ("RGBA", "PNG", (255, 128, 128)),   # half-transparent red on white
    ("I;16", "PNG", (128, 128, 128)),
])
def test_every_colour_mode_becomes_rgb(mode, fmt, expected):
  if mode == "L":
    image = Image.new("L", (40, 40), 128)
  elif mode == "P":
    image = Image.new("RGB", (40, 40), (255, 0, 0)).convert("P")
  elif mode == "CMYK":
    image = Image.new("RGB", (40, 40), (255, 0, 0)).convert("CMYK")
  elif mode == "RGBA":
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 128))
  else:
    image = Image.fromarray(np.full((40, 40), 32896, np.uint16))
  decoded = image_decode.decode_and_resize(_pil_bytes(image, fmt), size=32)
  assert decoded.rgb.shape == (32, 32, 3) and decoded.rgb.dtype == np.uint8
  assert np.allclose(decoded.rgb[16, 16], expected, atol=6), decoded.rgb[16, 16]


def test_exif_orientation_is_applied():
  array = np.zeros((40, 80, 3), np.uint8)
  array[:, :40] = (255, 0, 0)  # left half red in the stored pixels
  image = Image.fromarray(array)
  exif = image.getexif()
  exif[0x0112] = 6  # display rotated 90 degrees clockwise
  data = _pil_bytes(image, "JPEG", exif=exif.tobytes(), quality=95)
  decoded = image_decode.decode_and_resize(data, size=40)
  assert (decoded.source_width, decoded.source_height) == (40, 80)
  assert decoded.rgb[5, 20, 0] > 200 and decoded.rgb[35, 20, 0] < 60  # red now on top


def _jpeg_variants() -> dict[str, tuple[bytes, bool]]:
  """JPEGs of every kind the header reader meets: (bytes, whether the fast path reads it)."""
  array = np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)
  image = Image.fromarray(array)
  exif = image.getexif()
  exif[0x0112] = 6
  plain = cv2.imencode(".jpg", array)[1].tobytes()
  return {
      "opencv baseline": (plain, True),
      "opencv progressive": (cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
                             .tobytes(), True),
      "grayscale": (_pil_bytes(Image.fromarray(array[:, :, 0]), "JPEG"), True),
      "optimized progressive": (_pil_bytes(image, "JPEG", progressive=True, optimize=True), True),
      "icc profile": (_pil_bytes(image, "JPEG", icc_profile=b"x" * 300), True),
      "exif orientation": (_pil_bytes(image, "JPEG", exif=exif.tobytes()), False),
      "xmp": (_pil_bytes(image, "JPEG", xmp=b"<x:xmpmeta tiff:Orientation=\"6\"/>"), False),
      "cmyk": (_pil_bytes(image.convert("CMYK"), "JPEG"), False),
      "fill bytes before a marker": (plain[:2] + b"\xff" + plain[2:], False),
      "segment past the end": (plain[:30], False),
  }


@pytest.mark.parametrize("name", list(_jpeg_variants()))
def test_jpeg_header_fast_path_agrees_with_pillow(name):
  data, fast = _jpeg_variants()[name]
  assert (image_decode._plain_jpeg_header(data) is not None) == fast
  try:
    with Image.open(io.BytesIO(data)) as image:
      expected = image_decode.Header("jpeg", *image.size, image.mode,
                                     int(getattr(image, "n_frames", 1)),
                                     int(image.getexif().get(0x0112, 1)))
  except OSError:
    expected = None  # unreadable: read_header must refuse it as before
  if expected is None:
    with pytest.raises(image_decode.ImageError):
      image_decode.read_header(data)
  else:
    assert image_decode.read_header(data) == expected


def test_decompression_bomb_refused_before_decode():
  # A PNG whose header claims 60000 x 60000 (3.6 Gpx) with 1 KB of zeros as "pixels":
  # refused from the header alone, before any buffer is allocated.
  def chunk(kind: bytes, body: bytes) -> bytes:
    return (len(body).to_bytes(4, "big") + kind + body
            + zlib.crc32(kind + body).to_bytes(4, "big"))
  ihdr = (60000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
  bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))
  with pytest.raises(image_decode.ImageError) as error:
    image_decode.decode_and_resize(bomb, size=32)
  assert error.value.reason == "too_many_pixels"


def test_animated_gif_keeps_first_frame():
  frames = [Image.new("RGB", (40, 40), c) for c in ((0, 0, 255), (255, 0, 0))]
  buffer = io.BytesIO()
  frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
  decoded = image_decode.decode_and_resize(buffer.getvalue(), size=32)
  assert decoded.rgb[16, 16, 2] > 200 and decoded.rgb[16, 16, 0] < 50


@pytest.mark.parametrize("resize", image_decode.RESIZE_MODES)
def test_keypoints_follow_the_resize(resize):
  image = np.zeros((60, 120, 3), np.uint8)
  points = np.array([[30.0, 20.0], [100.0, 50.0]], np.float32)
  for x, y in points.astype(int):
    cv2.circle(image, (x, y), 3, (255, 255, 255), -1)
  decoded = image_decode.decode_and_resize(_png(image), size=64, resize=resize)
  normalised = decoded.geometry.normalise(points)
  np.testing.assert_allclose(decoded.geometry.to_source_pixels(normalised), points, atol=1e-3)
  for x, y in normalised:
    if 0 <= x < 1 and 0 <= y < 1:  # crop may cut a point off: it stays outside [0, 1)
      assert decoded.rgb[int(y * 64), int(x * 64)].max() > 100


def test_keypoint_manifest(tmp_path):
  (tmp_path / "k").mkdir()
  rows = ["image_url,x0,y0,x1,y1"]
  for i in range(4):
    image = np.zeros((50, 100, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "k" / f"{i}.png"), image)
    rows.append(f"k/{i}.png,10,5,90,45")
  (tmp_path / "kp.csv").write_text("\n".join(rows) + "\n")
  out = tmp_path / "out"
  ingest.run(["--source", str(tmp_path / "kp.csv"), "--out", str(out), "--image-size", "40",
              "--target-columns", "all", "--resize", "pad"])
  manifest = datasets.read_manifest(str(out))
  assert manifest["task"] == "keypoints" and manifest["num_keypoints"] == 2
  record = next(r for rs in _load_all(out).values() for r in rs)
  # pad: scale 0.4, vertical offset 10 -> (10,5)->(4,12)/40, (90,45)->(36,28)/40
  np.testing.assert_allclose(record["targets"], [[0.1, 0.3], [0.9, 0.7]], atol=1e-5)


# Modules allowed local file calls, and why (their remote paths go through tf.io.gfile).
_LOCAL_IO_ALLOWED = {
    # A local download cache is a SQLite database (a file creation per image cost 0.14-0.47 ms
    # of CPU); a remote one goes through gfile: both tested in
    # test_download_cache_local_and_remote_agree.
    "pipeline/download_cache.py",
}


def test_stage_code_does_portable_io_only():
  """gs:// works only if every file access goes through tf.io.gfile or Beam FileSystems."""
  offenders = []
  for package in ("pipeline", "features"):
    for path in (REPO_ROOT / package).rglob("*.py"):
      if str(path.relative_to(REPO_ROOT)) in _LOCAL_IO_ALLOWED:
        continue
      text = path.read_text()
      for needle in (" open(", "os.path."):
        if needle in text:
          offenders.append(f"{path.relative_to(REPO_ROOT)}: {needle.strip()}")
  assert offenders == []


def test_verify_detects_corrupt_truncated_and_missing_shards(tmp_path, tiny_image_dataset, capsys):
  import shutil

  from pipeline import verify

  copy = tmp_path / "copy"
  shutil.copytree(tiny_image_dataset, copy)
  assert verify.verify(str(copy))
  shards = sorted(copy.glob("images-*.tfrecord-*"))
  flipped = bytearray(shards[0].read_bytes())
  flipped[len(flipped) // 2] ^= 0xFF
  shards[0].write_bytes(bytes(flipped))                           # F9: corrupt bytes
  shards[1].write_bytes(shards[1].read_bytes()[:-100])            # F10: truncated
  shards[2].unlink()                                              # missing shard
  assert not verify.verify(str(copy))
  out = capsys.readouterr().out
  assert out.count("FAIL") == 3 and "missing" in out and "sha256 mismatch" in out
  (copy / "manifest.json").unlink()
  with pytest.raises(layout.DatasetError, match="not a complete headstart dataset"):
    verify.verify(str(copy))


def test_rerun_on_grown_manifest_fetches_only_new_sources(tmp_path, http_server, monkeypatch):
  """F13: the content-addressed download cache; the result equals a clean run (as sets by id).
  A cache that starts empty is only written: the first run looks nothing up."""
  from pipeline import download_cache
  lookups = []
  lookup = download_cache.DownloadCache.lookup
  monkeypatch.setattr(download_cache.DownloadCache, "lookup",
                      lambda self, source_id: lookups.append(source_id) or lookup(self, source_id))
  http_server.routes = {f"/{i}.png": (200, {}, _png(make_image((40, 40), i % 2, i)))
                        for i in range(8)}
  rows = [f"{http_server.url}/{i}.png,{'ab'[i % 2]}" for i in range(8)]
  half, full = tmp_path / "half.csv", tmp_path / "full.csv"
  half.write_text("image_url,label\n" + "\n".join(rows[:4]) + "\n")
  full.write_text("image_url,label\n" + "\n".join(rows) + "\n")
  common = ["--image-size", "32", "--allow-network", "127.0.0.1/32"]
  ingest.run(["--source", str(half), "--out", str(tmp_path / "out"), *common])
  first_hits = list(http_server.hits)
  assert lookups == []
  http_server.hits.clear()
  summary = ingest.run(["--source", str(full), "--out", str(tmp_path / "out"), *common])
  assert summary["download_cache"] == {"hits": 4, "not_written": 0} and len(lookups) == 8
  assert sorted(first_hits) == sorted(f"/{i}.png" for i in range(4))
  assert sorted(http_server.hits) == sorted(f"/{i}.png" for i in range(4, 8))
  ingest.run(["--source", str(full), "--out", str(tmp_path / "clean"), *common,
              "--download-cache", "none"])

  def content(out):
    return {(r["id"], r["content_sha256"], r["label"])
            for rs in _load_all(out).values() for r in rs}

  assert content(tmp_path / "out") == content(tmp_path / "clean") and len(content(tmp_path / "out")) == 8


def test_decoder_crash_and_hang_cost_one_dead_letter_each(tmp_path):
  """F4/F5: a decoder that aborts or never returns is isolated in a subprocess."""
  manifest = write_image_set(tmp_path / "src", 6, 40)
  (tmp_path / "src" / "img" / "crash.png").write_bytes(b"CRASH")
  (tmp_path / "src" / "img" / "hang.png").write_bytes(b"HANG")
  with manifest.open("a") as f:
    f.write("img/crash.png,a\nimg/hang.png,b\n")
  out = tmp_path / "out"
  summary = ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", "32",
                        "--decoder", "tests.decoders:crash_or_hang", "--decode-timeout", "3",
                        "--max-error-fraction", "0.5"])
  assert summary["written"] == 6 and summary["balanced"]
  assert summary["by_reason"] == {"decoder_crash": 1, "decode_timeout": 1}


def test_gs_sources_only_from_allowed_buckets():
  spec = sources.CsvSpec("gs://mine/m.csv", "gs://mine", ("image_url", "label"), 0, 1, None, None,
                         (), (), ("shared-images",))
  assert sources.parse_csv_line("gs://mine/a.jpg,x", spec)["location"] == "gs://mine/a.jpg"
  assert sources.parse_csv_line("gs://shared-images/b.jpg,x", spec)["source"].endswith("b.jpg")
  with pytest.raises(sources.RowError) as error:
    sources.parse_csv_line("gs://someone-else/secret.jpg,x", spec)
  assert error.value.reason == "bucket_not_allowed"


def test_dns_answers_are_vetted_and_short_bodies_are_not_images(tmp_path, http_server,
                                                               monkeypatch):
  """Rows 11 and 19: a name resolving to any private address is refused (the connection goes
  to the vetted address, so a later DNS answer cannot swap it); a body cut short of its
  Content-Length is retried and dead-lettered."""
  from pipeline import fetch

  real_getaddrinfo = fetch.socket.getaddrinfo
  answers = {"rebind.example": ["93.184.216.34", "127.0.0.2"], "internal.example": ["10.1.2.3"]}

  def fake_getaddrinfo(host, port, *args, **kwargs):
    if host in answers:
      return [(fetch.socket.AF_INET, fetch.socket.SOCK_STREAM, 6, "", (ip, port))
              for ip in answers[host]]
    return real_getaddrinfo(host, port, *args, **kwargs)

  monkeypatch.setattr(fetch.socket, "getaddrinfo", fake_getaddrinfo)

  def short_body(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "5000")
    handler.end_headers()
    handler.wfile.write(b"\x89PNG\r\n\x1a\n" + bytes(92))  # then the connection closes

  http_server.routes = {"/short.png": short_body}
  rows = ["image_url,label", "http://rebind.example/a.png,a", "http://internal.example/b.png,b",
          f"{http_server.url}/short.png,a"]
  (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="no image was written"):
    ingest.run(["--source", str(tmp_path / "m.csv"), "--out", str(out), "--image-size", "32",
                "--allow-network", "127.0.0.1/32", "--retries", "1", "--max-error-fraction", "1"])
  reasons = {e["row"]["source"].split("/")[2]: e["reason"] for e in _errors(out)}
  assert reasons["rebind.example"] == "blocked_address"
  assert reasons["internal.example"] == "blocked_address"
  assert reasons[http_server.url.split("/")[2]] == "connection_error"
  assert http_server.hits.count("/short.png") == 2  # first try + one retry


def test_labels_outside_classes_and_random_bytes_are_dead_lettered(tmp_path):
  manifest = write_image_set(tmp_path / "src", 4, 40)
  (tmp_path / "src" / "img" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
  with manifest.open("a") as f:
    f.write("img/0000.png,a\nimg/noise.jpg,b\n")  # (a duplicate of row 0 is fine)
  rows = manifest.read_text().splitlines()
  rows[2] = rows[2].replace(",b", ",zebra")  # img/0001.jpg now has a label outside --classes
  manifest.write_text("\n".join(rows) + "\n")
  out = tmp_path / "out"
  summary = ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", "32",
                        "--classes", "a,b", "--max-error-fraction", "0.9"])
  assert summary["by_reason"] == {"unknown_label": 1, "not_an_image": 1, "duplicate": 1}
  assert summary["written"] == 3 and summary["balanced"]
  assert datasets.read_manifest(str(out))["class_names"] == ["a", "b"]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 8, 13, 4096])
def test_describe_shard_counts_and_hashes_in_one_read(tmp_path, chunk_bytes):
  import tensorflow as tf

  path = str(tmp_path / "x.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(9):
      writer.write(bytes(i * 37))
  entry = datasets.describe_shard(path, "train", chunk_bytes=chunk_bytes)
  assert entry["num_examples"] == datasets.count_records(path) == 9
  assert entry["sha256"] == datasets.file_sha256(path)
  pathlib.Path(path).write_bytes(pathlib.Path(path).read_bytes()[:-3])
  with pytest.raises(layout.DatasetError, match="ends inside a record"):
    datasets.describe_shard(path, "train", chunk_bytes=chunk_bytes)


def test_unreadable_local_file_is_a_dead_letter_not_a_crash(tmp_path, monkeypatch):
  """A file that stat() sees but read() refuses (permissions, I/O error) gets its own reason."""
  import tensorflow as tf
  from pipeline import fetch
  path = tmp_path / "locked.jpg"
  path.write_bytes(b"\xff\xd8\xff" + b"\0" * 100)

  class RefusingFile:
    def __init__(self, *args, **kwargs):
      raise tf.errors.PermissionDeniedError(None, None, "permission denied")

  monkeypatch.setattr(tf.io.gfile, "GFile", RefusingFile)
  with pytest.raises(fetch.FetchError) as caught:
    fetch.Fetcher(fetch.FetchConfig()).fetch(str(path))
  assert caught.value.reason == "unreadable" and "permission denied" in str(caught.value)
  with pytest.raises(fetch.FetchError) as caught:
    fetch.Fetcher(fetch.FetchConfig()).fetch(str(tmp_path))
  assert caught.value.reason == "not_a_file"


@pytest.mark.parametrize("share_bytes", [True, False])
def test_isolated_decoder_moves_big_sources_through_the_shared_buffer(share_bytes):
  """Sources of every size reach the worker intact, through the memfd buffer (grown past its
  first size) or, without one, through the pipe; results equal in-process decoding."""
  from pipeline import decoder_pool
  settings = image_decode.DecodeSettings(48)
  small = cv2.imencode(".png", make_image((40, 40), 1, 0))[1].tobytes()
  noise = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), np.uint8)
  big = cv2.imencode(".png", noise)[1].tobytes()   # > 1 MB: the buffer has to grow
  assert len(small) < decoder_pool._SHARED_MIN_BYTES < (1 << 20) < len(big)
  decode = decoder_pool.IsolatedDecoder(image_decode.prepare_record, processes=1, timeout=60,
                                        share_bytes=share_bytes)
  try:
    for data in (small, big, small, big):
      got = decode({"id": "x"}, data, settings)
      want = image_decode.prepare_record({"id": "x"}, data, settings)
      assert got["content_sha256"] == want["content_sha256"] and got["image"] == want["image"]
    worker = decode._workers[0]
    assert (worker.shared is not None) == share_bytes
  finally:
    decode.close()


def test_isolated_decoder_start_imports_before_the_first_call_and_its_deadline(monkeypatch):
  """`start` has each worker import the function's module before any call: a first call
  whose deadline is shorter than the import succeeds (without `start`, the import ran inside
  it). A module that cannot be imported costs no start; its calls are dead-lettered. A worker
  that cannot be started keeps its slot: the first call tries again and fails as it would."""
  from pipeline import decoder_pool
  from tests import slow_import_decoder
  timeout = slow_import_decoder.IMPORT_SECONDS / 3
  cold = decoder_pool.IsolatedDecoder(slow_import_decoder.describe, processes=1, timeout=timeout)
  warm = decoder_pool.IsolatedDecoder(slow_import_decoder.describe, processes=2, timeout=timeout)
  try:
    with pytest.raises(image_decode.ImageError) as caught:
      cold({"id": "x"}, b"abc", None)
    assert caught.value.reason == "decode_timeout"
    warm.start()
    assert len(warm._workers) == 2
    assert warm.map([({"id": "x"}, b"abc", None)] * 3) == [{"id": "x", "length": 3}] * 3
  finally:
    cold.close()
    warm.close()

  def missing(row, data, settings):
    return row
  missing.__module__ = "tests.no_such_module"
  broken = decoder_pool.IsolatedDecoder(missing, processes=1, timeout=30)
  try:
    broken.start()
    assert broken._workers == []
    (result,) = broken.map([({"id": "x"}, b"abc", None)])
    assert result.reason == "decode_failed" and "no_such_module" in str(result)
  finally:
    broken.close()

  def no_process(*args, **kwargs):
    raise OSError("cannot start a process")
  monkeypatch.setattr(decoder_pool, "_Worker", no_process)
  unstartable = decoder_pool.IsolatedDecoder(slow_import_decoder.describe, processes=2,
                                             timeout=30)
  unstartable.start()
  assert unstartable._workers == [] and unstartable._idle.qsize() == 2
  with pytest.raises(OSError, match="cannot start a process"):
    unstartable.map([({"id": "x"}, b"abc", None)])


def test_decoder_replies_carry_only_what_the_call_added_to_its_row():
  """A reply leaves out the row's own fields (the parent has them) and names the dropped ones;
  merged, it is the whole result. A reply breaking that form is a bad reply."""
  from pipeline import decode_worker
  row = {"id": "x" * 64, "location": "http://example.org/a.jpg", "label": "a", "extra": {}}
  result = {**row, "label": "b", "image": b"\xff\xd8jpeg", "width": 3}
  del result["extra"]
  frame = decode_worker.encode_reply(True, result, base=row)
  kind, text_size, blob_size = decode_worker.reply_sizes(frame[:decode_worker.REPLY_HEADER.size])
  body = frame[decode_worker.REPLY_HEADER.size:]
  ok, fields = decode_worker.decode_reply(kind, body[:text_size], body[text_size:])
  assert ok and b"example.org" not in frame
  assert set(fields) == {"label", "image", "width", decode_worker.DROPPED_KEY}
  assert decode_worker.merge_reply(row, fields) == result
  with pytest.raises(decode_worker.BadReply):
    decode_worker.merge_reply(row, {decode_worker.DROPPED_KEY: "extra"})


def test_examples_serialize_to_the_same_bytes_in_every_process():
  """Shard bytes (hence dataset fingerprints and feature cache keys) do not depend on the
  process: a protobuf map is otherwise written in a per-process order."""
  import os
  import subprocess
  import sys
  code = ("from contracts import schema; s = schema.image_schema(image_size=2, image_format='png', "
          "class_names=('x', 'y'), num_keypoints=0); print(s.encode({'id': 'a', 'image': b'x', "
          "'label': 1, 'source': 's', 'group': '', 'content_sha256': 'c', 'height': 2, "
          "'width': 3}).hex())")
  outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONHASHSEED": str(seed),
                                 "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout.strip()
             for seed in (1, 2, 3)}
  assert len(outputs) == 1 and all(outputs)


def test_download_cache_local_and_remote_agree(tmp_path):
  """The local root (pack files indexed by one SQLite database) and a remote one (one object
  per source through tf.io.gfile, here TF's in-memory ram://) store and return the same bytes;
  a damaged entry is a miss, not wrong bytes, and a put makes it whole again."""
  import sqlite3

  import tensorflow as tf

  from pipeline import download_cache
  local = download_cache.DownloadCache(str(tmp_path / "cache"))
  remote = download_cache.DownloadCache(f"ram://cache-{tmp_path.name}")
  assert local.is_local and not remote.is_local
  ids = {name: hashlib.sha256(name.encode()).hexdigest() for name in "abc"}
  for cache in (local, remote):
    assert cache.is_empty() and cache.get(ids["a"]) is None
    cache.put(ids["a"], b"same bytes")
    assert not cache.is_empty()
    cache.put(ids["b"], b"same bytes")  # identical content under two sources
    cache.put(ids["c"], b"other")
    assert [cache.get(ids[name]) for name in "abc"] == [b"same bytes", b"same bytes", b"other"]
    cache.flush()   # local puts wait for their batch's commit (readable before it)
    assert [cache.get(ids[name]) for name in "abc"] == [b"same bytes", b"same bytes", b"other"]
    assert cache.lookup(ids["c"]) == (b"other", hashlib.sha256(b"other").digest())
    assert not cache.is_empty()
  # Locally: no file per source; one pack (this store's), one index (and SQLite's WAL files).
  assert {p.name for p in (tmp_path / "cache").iterdir()} <= {
      "packs", "sources.sqlite", "sources.sqlite-wal", "sources.sqlite-shm"}
  pack, = (tmp_path / "cache" / "packs").iterdir()
  database = sqlite3.connect(tmp_path / "cache" / "sources.sqlite", isolation_level=None)
  (name, offset, length), = database.execute(
      "SELECT pack, offset, length FROM packed WHERE id = ?", (ids["c"],))
  stored = pack.read_bytes()[offset:offset + length]
  assert name == pack.name and stored == hashlib.sha256(b"other").digest() + b"other"
  assert database.execute("SELECT COUNT(*) FROM packed").fetchone() == (3,)
  whole = pack.read_bytes()
  pack.write_bytes(whole[:offset] + stored[:-1] + b"X")       # garbled
  assert local.get(ids["c"]) is None
  pack.write_bytes(whole[:offset + length - 1])                # cut short
  assert local.get(ids["c"]) is None
  database.execute("UPDATE packed SET pack = '../../sources.sqlite' WHERE id = ?", (ids["c"],))
  assert local.get(ids["c"]) is None                           # names no file outside packs/
  local.put(ids["c"], b"other")           # fetched again: whole again
  assert local.get(ids["c"]) == b"other"
  remote_entry = f"ram://cache-{tmp_path.name}/sources/{ids['c'][:2]}/{ids['c']}"
  with tf.io.gfile.GFile(remote_entry, "wb") as f:
    f.write(stored[:-1])
  assert remote.get(ids["c"]) is None


def test_download_cache_commits_local_puts_in_batches_and_counts_a_failed_batch(tmp_path):
  """Local puts are committed BATCH_ENTRIES at a time (and at flush); a batch that cannot be
  committed raises NotStored with all its entries, and the database keeps none of them."""
  import sqlite3

  from pipeline import download_cache
  cache = download_cache.DownloadCache(str(tmp_path / "cache"))
  database = tmp_path / "cache" / download_cache.DATABASE_NAME

  def stored() -> int:
    if not database.exists():
      return 0
    with contextlib.closing(sqlite3.connect(database)) as connection:
      return connection.execute("SELECT COUNT(*) FROM packed").fetchone()[0]

  ids = [hashlib.sha256(str(i).encode()).hexdigest()
         for i in range(3 * download_cache.BATCH_ENTRIES)]
  for source in ids[:download_cache.BATCH_ENTRIES - 1]:
    cache.put(source, source.encode())
  assert stored() == 0 and cache.get(ids[0]) == ids[0].encode()   # waiting, yet readable
  cache.put(ids[download_cache.BATCH_ENTRIES - 1], b"x")           # completes the batch
  assert stored() == download_cache.BATCH_ENTRIES
  cache.put(ids[download_cache.BATCH_ENTRIES], b"y")
  cache.flush()
  assert stored() == download_cache.BATCH_ENTRIES + 1
  cache.flush()                                                      # nothing waits: a no-op
  # A batch that cannot be committed (another connection holds the write lock past the busy
  # timeout): every entry of it is reported, none is half-stored.
  blocker = sqlite3.connect(database, isolation_level=None)
  blocker.execute("BEGIN IMMEDIATE")
  store = cache._store  # noqa: SLF001
  store._connection().execute("PRAGMA busy_timeout = 10")  # noqa: SLF001
  for source in ids[download_cache.BATCH_ENTRIES + 1:download_cache.BATCH_ENTRIES + 6]:
    cache.put(source, b"z")
  with pytest.raises(download_cache.NotStored) as raised:
    cache.flush()
  assert raised.value.entries == 5
  blocker.execute("ROLLBACK")
  blocker.close()
  assert stored() == download_cache.BATCH_ENTRIES + 1


def test_download_cache_writers_of_identical_bytes_never_collide(tmp_path):
  """Issue 16.0 at the unit: many threads, and two processes' worth of caches on one folder,
  store identical bytes under different ids at once."""
  import concurrent.futures

  from pipeline import download_cache

  caches = [download_cache.DownloadCache(str(tmp_path / "cache")) for _ in range(2)]
  data = bytes(range(256)) * 400
  ids = [hashlib.sha256(f"{r}-{i}".encode()).hexdigest() for r in range(20) for i in range(16)]
  for round_ in range(20):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      list(pool.map(lambda i: caches[i % 2].put(ids[round_ * 16 + i], data), range(16)))
  assert all(caches[0].get(source) == data for source in ids)
  assert all(caches[1].get(source) == data for source in ids[::7])


def test_identical_bytes_under_many_urls_fetched_concurrently(tmp_path, http_server):
  """Issue 16.0: mirrors of one image (identical bytes, distinct URLs) fetched at the same time
  all land in the dataset; repeated, since the race is timing-dependent."""
  body = _png(make_image((48, 48), 0, 7))

  def delayed(handler):
    time.sleep(0.02)  # keeps many fetches of the same bytes in flight together
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)

  http_server.routes = {f"/copy{i}.png": delayed for i in range(32)}
  manifest = tmp_path / "m.csv"
  manifest.write_text("image_url,label\n" + "".join(
      f"{http_server.url}/copy{i}.png,{'ab'[i % 2]}\n" for i in range(32)))
  for attempt in range(3):
    summary = ingest.run(["--source", str(manifest), "--out", str(tmp_path / f"out{attempt}"),
                          "--image-size", "32", "--allow-network", "127.0.0.1/32"])
    assert summary["written"] == 32 and summary["balanced"], summary


def test_a_rerun_reads_every_source_from_the_download_cache(tmp_path, http_server):
  """The puts of a job are committed by the time it ends (batches close with each bundle): a
  second job on the same cache sends no request and writes the same images."""
  http_server.routes = {f"/{i}.png": (200, {}, _png(make_image((40, 40), i % 2, i)))
                        for i in range(5)}
  manifest = tmp_path / "m.csv"
  manifest.write_text("image_url,label\n" + "".join(
      f"{http_server.url}/{i}.png,{'ab'[i % 2]}\n" for i in range(5)))
  common = ["--source", str(manifest), "--image-size", "32", "--allow-network", "127.0.0.1/32",
            "--download-cache", str(tmp_path / "cache")]
  first = ingest.run([*common, "--out", str(tmp_path / "first")])
  assert first["written"] == 5 and len(http_server.hits) == 5
  http_server.hits.clear()
  second = ingest.run([*common, "--out", str(tmp_path / "second")])
  assert second["written"] == 5 and http_server.hits == []
  assert second["download_cache"] == {"hits": 5, "not_written": 0}
  # The first run's content_sha256 came from hashing each download for its cache entry, the
  # second's from the digest the cache checked on reading it: the same records.
  shards = {run: {p.name: p.read_bytes() for p in (tmp_path / run).rglob("*.tfrecord*")}
            for run in ("first", "second")}
  assert shards["first"] and shards["first"] == shards["second"]


def test_a_download_cache_that_cannot_be_written_loses_no_row(tmp_path, http_server, monkeypatch):
  """Issue 16.0: any error while caching a row skips the cache for that row, never the job."""
  import sqlite3

  from pipeline import download_cache

  def broken(self, source_id, entry):
    raise sqlite3.OperationalError(f"database or disk is full writing {source_id}")

  monkeypatch.setattr(download_cache._PackStore, "write", broken)  # noqa: SLF001
  http_server.routes = {f"/{i}.png": (200, {}, _png(make_image((40, 40), i % 2, i)))
                        for i in range(4)}
  manifest = tmp_path / "m.csv"
  manifest.write_text("image_url,label\n" + "".join(
      f"{http_server.url}/{i}.png,{'ab'[i % 2]}\n" for i in range(4)))
  summary = ingest.run(["--source", str(manifest), "--out", str(tmp_path / "out"),
                        "--image-size", "32", "--allow-network", "127.0.0.1/32"])
  assert summary["written"] == 4 and summary["by_reason"] == {}


def test_a_damaged_download_cache_warns_once_and_loses_no_row(tmp_path, http_server, caplog):
  """A cache file that is not a database fails every put: the rows are all written, and the
  worker says so once, not once per row."""
  from pipeline import download_cache

  cache = tmp_path / "out" / "download_cache"
  cache.mkdir(parents=True)
  (cache / download_cache.DATABASE_NAME).write_bytes(bytes(range(256)) * 3)
  http_server.routes = {f"/{i}.png": (200, {}, _png(make_image((40, 40), i % 2, i)))
                        for i in range(6)}
  manifest = tmp_path / "m.csv"
  manifest.write_text("image_url,label\n" + "".join(
      f"{http_server.url}/{i}.png,{'ab'[i % 2]}\n" for i in range(6)))
  with caplog.at_level(logging.WARNING, logger="headstart"):
    summary = ingest.run(["--source", str(manifest), "--out", str(tmp_path / "out"),
                          "--image-size", "32", "--allow-network", "127.0.0.1/32"])
  assert summary["written"] == 6 and summary["by_reason"] == {}
  assert summary["download_cache"] == {"hits": 0, "not_written": 6}
  not_written = [r.getMessage() for r in caplog.records
                 if "download cache not written" in r.getMessage()]
  assert len(not_written) == 1 and "not a database" in not_written[0], not_written
  assert any("not written for 6 sources" in r.getMessage() for r in caplog.records)
