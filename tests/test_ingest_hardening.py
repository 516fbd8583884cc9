"""Issue 16: stage 1 hardening, through the real `headstart ingest` job (in process).

    .venv/bin/python -m pytest tests/test_ingest_hardening.py -q

Paths (point 1), staging (4), secrets (5), the address guard (6), decoder isolation (7), polite
fetching (3), retrying failed rows (8) and in-pipeline listing of folder trees (2).
"""
from __future__ import annotations

import json
import pathlib

import cv2
import pytest
import tensorflow_datasets as tfds

from contracts import datasets, layout
from pipeline import sources
from pipeline import run as ingest
from tests.conftest import make_image, send, write_image_set


def _records(out: pathlib.Path) -> dict[str, dict]:
  """id -> record (split added) of a dataset, read through TFDS."""
  builder = tfds.builder_from_directory(str(out))
  return {r["id"].decode(): {**r, "split": split}
          for split in builder.info.splits
          for r in tfds.as_numpy(builder.as_dataset(split=split))}


def _errors(out: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines() if line]


def _comparable(out: pathlib.Path) -> dict[str, tuple]:
  """id -> every stored field (decoded pixels as bytes) and the split, for equality checks."""
  fields = ("split", "image", "label", "source", "group", "content_sha256", "height", "width")
  return {i: tuple(r[f].tobytes() if hasattr(r[f], "tobytes") else r[f] for f in fields)
          for i, r in _records(out).items()}


def _shards(out: pathlib.Path) -> dict[str, str]:
  manifest = datasets.read_manifest(str(out))
  return {s["file"]: s["sha256"] for entry in manifest["splits"].values() for s in entry["shards"]}


# --- 1. paths ------------------------------------------------------------------------------------


def test_manifest_in_the_current_folder_and_any_spelling_give_one_dataset(tmp_path, monkeypatch):
  """`cd data && headstart ingest --source manifest.csv` works; `./src/m.csv`, `src/m.csv`, an
  absolute path and a symlinked folder give identical ids, splits and shard bytes, and the ids
  are those of earlier releases (sha256 of the path relative to the manifest's folder)."""
  write_image_set(tmp_path / "src", 10, 40)
  (tmp_path / "alias").symlink_to(tmp_path / "src")
  common = ["--image-size", "32", "--download-cache", "none"]
  monkeypatch.chdir(tmp_path / "src")
  summary = ingest.run(["--source", "manifest.csv", "--out", str(tmp_path / "cwd"), *common])
  assert summary["written"] == 10 and summary["by_reason"] == {}
  monkeypatch.chdir(tmp_path)
  for name, spelling in [("dot", "./src/manifest.csv"), ("plain", "src/manifest.csv"),
                         ("absolute", str(tmp_path / "src" / "manifest.csv")),
                         ("symlink", "alias/../alias/manifest.csv")]:
    ingest.run(["--source", spelling, "--out", str(tmp_path / name), *common])
  reference = _records(tmp_path / "cwd")
  assert sources.source_id("img/0000.png") in reference and len(reference) == 10
  for name in ("dot", "plain", "absolute", "symlink"):
    records = _records(tmp_path / name)
    assert {i: r["split"] for i, r in records.items()} == {
        i: r["split"] for i, r in reference.items()}, name
    assert _shards(tmp_path / name) == _shards(tmp_path / "cwd"), name


def test_symlinks_leaving_the_root_are_refused(tmp_path):
  """A link inside the manifest's folder (file or folder) that points out of it is
  `outside_root`, in a CSV manifest and in a folder tree (matched on the workers, run under
  multi_processing as on Dataflow); links that stay inside are fine."""
  src = write_image_set(tmp_path / "src", 4, 40).parent
  outside = tmp_path / "secrets"
  outside.mkdir()
  cv2.imwrite(str(outside / "key.png"), make_image((40, 40), 0, 9))
  (src / "img" / "leak.png").symlink_to(outside / "key.png")
  (src / "linked").symlink_to(outside)
  (src / "img" / "inside.png").symlink_to(src / "img" / "0000.png")
  with (src / "manifest.csv").open("a") as f:
    f.write("img/leak.png,a\nlinked/key.png,b\nimg/inside.png,a\n")
  summary = ingest.run(["--source", str(src / "manifest.csv"), "--out", str(tmp_path / "out"),
                        "--image-size", "32", "--max-error-fraction", "0.9"])
  assert summary["written"] == 5 and summary["by_reason"] == {"outside_root": 2}
  assert sources.source_id("img/inside.png") in _records(tmp_path / "out")

  tree = tmp_path / "tree"
  for label in ("cat", "dog"):
    (tree / label).mkdir(parents=True)
    cv2.imwrite(str(tree / label / "1.png"), make_image((40, 40), label == "dog", 1))
  (tree / "cat" / "leak.png").symlink_to(outside / "key.png")
  summary = ingest.run(["--source", str(tree), "--out", str(tmp_path / "tree_out"),
                        "--image-size", "32", "--max-error-fraction", "0.9",
                        "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
  assert summary["written"] == 2 and summary["by_reason"] == {"outside_root": 1}
  summary = ingest.run(["--source", str(tree), "--out", str(tmp_path / "tree_allowed"),
                        "--image-size", "32", "--allow-root", str(outside)])
  assert summary["written"] == 3


def test_two_allowed_roots_with_one_base_name_keep_their_files_apart(tmp_path):
  """`--allow-root a/photos --allow-root b/photos`: a/photos/x.png and b/photos/x.png are two
  records with two ids (the id is the path relative to the manifest's folder)."""
  for i, side in enumerate(("a", "b")):
    (tmp_path / side / "photos").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / side / "photos" / "x.png"), make_image((40, 40), i, i))
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "manifest.csv").write_text(
      "image_url,label\n../a/photos/x.png,a\n../b/photos/x.png,b\n")
  summary = ingest.run(["--source", str(tmp_path / "m" / "manifest.csv"),
                        "--out", str(tmp_path / "out"), "--image-size", "32",
                        "--allow-root", str(tmp_path / "a" / "photos"),
                        "--allow-root", str(tmp_path / "b" / "photos")])
  assert summary["written"] == 2 and summary["by_reason"] == {}
  records = _records(tmp_path / "out")
  assert {r["source"].decode() for r in records.values()} == {"../a/photos/x.png",
                                                               "../b/photos/x.png"}


# --- 5. secrets ----------------------------------------------------------------------------------

_SECRETS = ("p@ss", "ss@127", "SIGSECRET1", "CREDSECRET2", "SASSECRET3", "TOKENSECRET4",
            "AMZSECRET5", "KEYSECRET6")


def test_no_secret_reaches_any_output_file_or_log(tmp_path, http_server, caplog, capsys):
  """Credentials (a password holding an '@') and signed-URL parameters are redacted in
  errors.jsonl, the records' `source`, the summary, manifest and every log line (the fetcher's
  DEBUG request lines included); ids are still sha256 of the URLs exactly as written."""
  good = cv2.imencode(".png", make_image((40, 40), 0, 1))[1].tobytes()
  http_server.routes = {"/ok.png": (200, {}, good), "/ok2.png": (200, {}, good + b"\0"),
                        "/gone.png": (404, {}, b""), "/busy.png": (503, {}, b"")}
  base = http_server.url.replace("http://", "")
  urls = [f"http://alice:p@ss@{base}/ok.png",
          f"http://{base}/ok2.png?X-Goog-Signature=SIGSECRET1&X-Goog-Credential=CREDSECRET2&w=1",
          f"http://{base}/gone.png?sig=SASSECRET3&access_token=TOKENSECRET4",
          f"http://{base}/busy.png?X-Amz-Signature=AMZSECRET5&key=KEYSECRET6",
          f"ftp://bob:p@ss@{base}/x.png?token=TOKENSECRET4"]
  manifest = tmp_path / "m.csv"
  manifest.write_text("image_url,label\n" + "".join(f"{u},{'ab'[i % 2]}\n"
                                                   for i, u in enumerate(urls)))
  out = tmp_path / "out"
  for logger in (None, "headstart", "headstart.fetch"):
    caplog.set_level("DEBUG", logger=logger)
  summary = ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", "32",
                        "--allow-network", "127.0.0.1/32", "--retries", "0",
                        "--max-error-fraction", "1"])
  assert summary["written"] == 2 and summary["by_reason"] == {
      "not_found": 1, "http_503": 1, "unsupported_scheme": 1}
  records = _records(out)
  assert set(records) == {sources.source_id(urls[0]), sources.source_id(urls[1])}
  assert {r["source"].decode() for r in records.values()} == {
      f"http://***@{base}/ok.png",
      f"http://{base}/ok2.png?X-Goog-Signature=***&X-Goog-Credential=***&w=1"}
  captured = capsys.readouterr()
  texts = {"log": caplog.text, "stdout": captured.out, "stderr": captured.err}
  texts.update({str(p): p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()})
  assert len(texts) > 8
  leaks = {name: [s for s in _SECRETS if s in text] for name, text in texts.items()}
  assert {name: found for name, found in leaks.items() if found} == {}
  assert "GET /ok2.png?X-Goog-Signature=***" in caplog.text  # the request line, redacted


# --- 6. address guard ----------------------------------------------------------------------------


@pytest.mark.parametrize("address,refused", [
    ("93.184.216.34", None), ("2606:2800:220:1:248:1893:25c8:1946", None),
    ("64:ff9b::5db8:d822", None),                      # NAT64 of a public address
    ("127.0.0.1", "loopback"), ("169.254.169.254", "link-local"), ("100.64.0.1", "shared"),
    ("192.0.0.170", "IETF"), ("::ffff:169.254.169.254", "link-local"),
    ("2002:7f00:1::", "6to4"), ("2002:5db8:d822::1", "6to4"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo"), ("2001:db8::1", "documentation"), ("2001:2::1", "IETF"),
    ("fec0::1", "site-local"), ("fc00::1", "unique-local"), ("fe80::1%eth0", "link-local"),
    ("64:ff9b::7f00:1", "NAT64"), ("64:ff9b::a9fe:a9fe", "NAT64"), ("64:ff9b:1::1", "NAT64"),
    ("::1", "loopback"), ("::", "unspecified"), ("::7f00:1", "outside IPv6 global"),
])
def test_address_verdicts_are_explicit(address, refused):
  """The verdict rests on named ranges, not on `is_global` (which moved between patch releases)."""
  from pipeline import address_guard
  verdict = address_guard.refusal(address)
  assert (verdict is None) if refused is None else (refused in (verdict or "")), verdict
  import ipaddress
  loopback = (ipaddress.ip_network("127.0.0.1/32"),)
  assert address_guard.refusal("::ffff:127.0.0.1", loopback) is None
  assert "NAT64" in address_guard.refusal("64:ff9b::7f00:1", loopback)  # not via its IPv4


def test_tunnelled_and_translated_addresses_are_refused_before_any_connection(
    tmp_path, http_server, monkeypatch):
  """6to4, Teredo, site-local and NAT64 spellings of loopback and the metadata address, as
  literals and as DNS answers, are `blocked_address` with zero connection attempts; a host whose
  first vetted address refuses the connection is fetched from its next one; a hanging DNS
  lookup ends at the deadline (`dns_timeout`)."""
  import socket
  import time

  from pipeline import fetch, http_client

  port = http_server.server_address[1]
  good = cv2.imencode(".png", make_image((40, 40), 0, 1))[1].tobytes()
  http_server.routes = {"/x.png": (200, {}, good)}
  answers = {"tunnel.example": ["2002:7f00:1::1"], "nat64.example": ["64:ff9b::a9fe:a9fe"],
             "fallback.example": ["127.0.0.3", "127.0.0.1"]}
  real_getaddrinfo = socket.getaddrinfo

  def fake_getaddrinfo(host, port_, *args, **kwargs):
    if host == "hang.example":
      time.sleep(3)
    if host in answers:
      return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "",
               (ip, port_)) for ip in answers[host]]
    return real_getaddrinfo(host, port_, *args, **kwargs)

  attempts = []
  real_connect = http_client.ConnectionPool._connect

  async def recording_connect(pool, timeout):
    attempts.append(pool.address)
    return await real_connect(pool, timeout)

  monkeypatch.setattr(fetch.socket, "getaddrinfo", fake_getaddrinfo)
  monkeypatch.setattr(http_client.ConnectionPool, "_connect", recording_connect)  # every one
  blocked = ["[2002:7f00:1::]", "[2002:a9fe:a9fe::]", "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
             "[fec0::1]", "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]", "[::7f00:1]",
             "tunnel.example", "nat64.example"]
  rows = [f"http://{host}:{port}/x.png" for host in blocked]
  rows += [f"http://fallback.example:{port}/x.png", f"http://hang.example:{port}/x.png"]
  manifest = tmp_path / "m.csv"
  manifest.write_text("image_url,label\n" + "".join(f"{r},a\n" for r in rows))
  started = time.monotonic()
  summary = ingest.run(["--source", str(manifest), "--out", str(tmp_path / "out"),
                        "--image-size", "32", "--allow-network", "127.0.0.0/8",
                        "--timeout", "1", "--retries", "0", "--max-error-fraction", "1"])
  assert time.monotonic() - started < 30
  assert summary["written"] == 1
  assert summary["by_reason"] == {"blocked_address": len(blocked), "dns_timeout": 1}
  assert attempts == ["127.0.0.3", "127.0.0.1"] and http_server.hits == ["/x.png"]


# --- 7. decoder isolation ------------------------------------------------------------------------


def test_hostile_decoders_are_contained_and_the_job_finishes(tmp_path):
  """A decoder that allocates without bound, writes half a reply and stalls, or forges a reply
  frame costs one dead letter each; the other images are written."""
  manifest = write_image_set(tmp_path / "src", 4, 40)
  for marker in ("ALLOC", "HALF", "FORGE"):
    (tmp_path / "src" / "img" / f"{marker.lower()}.png").write_bytes(marker.encode())
  with manifest.open("a") as f:
    f.write("img/alloc.png,a\nimg/half.png,b\nimg/forge.png,a\n")
  summary = ingest.run(["--source", str(manifest), "--out", str(tmp_path / "out"),
                        "--image-size", "32", "--decoder", "tests.decoders:crash_or_hang",
                        "--decode-timeout", "3", "--decode-memory-mb", "2048",
                        "--decode-processes", "1", "--max-error-fraction", "0.9"])
  assert summary["written"] == 4 and summary["balanced"]
  assert summary["by_reason"] == {"decode_out_of_memory": 1, "decode_timeout": 1,
                                  "decoder_crash": 1}
  messages = {e["reason"]: e["message"] for e in _errors(tmp_path / "out")}
  assert "malformed reply" in messages["decoder_crash"]


def test_cpu_time_limit_ends_a_spinning_decoder_before_the_wall_deadline():
  """RLIMIT_CPU per call: a decoder spinning on the CPU is ended by the kernel (SIGXCPU) even
  when the wall-clock deadline is far away; the worker is replaced and serves the next call."""
  import time

  from pipeline import decoder_pool, image_decode
  from tests import decoders

  decode = decoder_pool.IsolatedDecoder(decoders.crash_or_hang, processes=1, timeout=60,
                                        cpu_seconds=1)
  good = cv2.imencode(".png", make_image((40, 40), 0, 1))[1].tobytes()
  settings = image_decode.DecodeSettings(32)
  try:
    assert decode({"id": "a"}, good, settings)["width"] == 40
    started = time.monotonic()
    with pytest.raises(image_decode.ImageError) as error:
      decode({"id": "b"}, b"SPIN", settings)
    assert error.value.reason == "decode_timeout" and "CPU time" in str(error.value)
    assert time.monotonic() - started < 15
    assert decode({"id": "c"}, good, settings)["width"] == 40
  finally:
    decode.close()


# --- 4. staging: a failed re-run never destroys a good dataset -----------------------------------


def _fingerprint_and_load(out: pathlib.Path) -> tuple[str, int]:
  from pipeline import verify
  assert verify.verify(str(out))
  return datasets.read_manifest(str(out))["fingerprint"], len(_records(out))


def test_failed_interrupted_and_cut_short_reruns_keep_a_loadable_dataset(tmp_path, monkeypatch):
  """A re-run that fails its error threshold, one that dies mid-write and one whose final swap
  is cut short all leave a complete dataset in OUT: the old one, or (after the cut-short swap,
  finished by the next run) the new one."""
  from pipeline import publish, sharding
  good = write_image_set(tmp_path / "src", 6, 40)
  bigger = write_image_set(tmp_path / "src2", 9, 40)
  broken = tmp_path / "src" / "broken.csv"
  broken.write_text("image_url,label\n" + "".join(f"img/missing{i}.png,a\n" for i in range(5)))
  out = tmp_path / "out"
  common = ["--out", str(out), "--image-size", "32"]
  ingest.run(["--source", str(good), *common])
  before = _fingerprint_and_load(out)

  def dies(*args, **kwargs):
    raise RuntimeError("worker lost")
  with monkeypatch.context() as patch:
    patch.setattr(sharding, "plan_shards", dies)   # the job dies while writing its shards
    with pytest.raises(Exception, match="worker lost"):
      ingest.run(["--source", str(bigger), *common])
  assert _fingerprint_and_load(out) == before

  real_swap, real_rename = publish.swap_in, publish.tf.io.gfile.rename
  moves = []

  def cut_short(staging, out_dir):
    def rename(src, dst, overwrite=False):
      if len(moves) == 2:
        raise OSError("machine lost during the swap")
      moves.append(src)
      real_rename(src, dst, overwrite=overwrite)
    with monkeypatch.context() as patch:
      patch.setattr(publish.tf.io.gfile, "rename", rename)
      real_swap(staging, out_dir)
  with monkeypatch.context() as patch:
    patch.setattr(publish, "swap_in", cut_short)
    with pytest.raises(OSError, match="machine lost"):
      ingest.run(["--source", str(bigger), *common])
  assert not (out / "manifest.json").exists()  # half swapped: refused, never read as a mix
  with pytest.raises(ValueError, match="unchanged") as failed:
    ingest.run(["--source", str(broken), *common])  # finishes the swap first, then fails
  assert ".staging/errors.jsonl" in str(failed.value)
  assert _fingerprint_and_load(out)[1] == 9 and len(_errors(out / ".staging")) == 5


# --- 3. polite, bounded fetching -----------------------------------------------------------------


def _counting_route(body: bytes, seconds: float, state: dict):
  """A route that answers after `seconds`, recording the most requests in flight at once and
  the User-Agent of each."""
  import threading
  import time
  lock = threading.Lock()

  def route(handler):
    with lock:
      state["now"] = state.get("now", 0) + 1
      state["peak"] = max(state.get("peak", 0), state["now"])
      state.setdefault("agents", set()).add(handler.headers.get("User-Agent"))
    time.sleep(seconds)
    with lock:
      state["now"] -= 1
    send(handler, 200, body)
  return route


def test_per_host_limit_is_shared_by_a_workers_threads_and_pools_never_overflow(
    tmp_path, http_server, caplog):
  """--max-per-host bounds the requests one worker process has in flight to a host, across its
  bundle threads (two DoFn instances here); with the limit at the thread count, pools hold
  every connection in flight (urllib3 never says 'Connection pool is full'). The User-Agent
  names headstart and its version, or what --user-agent says."""
  body = cv2.imencode(".png", make_image((40, 40), 0, 1))[1].tobytes()
  limited, open_ = {}, {}
  http_server.routes = {f"/{kind}/{i}.png": _counting_route(body, 0.1, state)
                        for kind, state in (("limited", limited), ("open", open_))
                        for i in range(64)}
  for kind in ("limited", "open"):
    (tmp_path / f"{kind}.csv").write_text("image_url,label\n" + "".join(
        f"{http_server.url}/{kind}/{i}.png,{'ab'[i % 2]}\n" for i in range(64)))
  common = ["--image-size", "32", "--allow-network", "127.0.0.1/32", "--fetch-threads", "16"]
  summary = ingest.run(["--source", str(tmp_path / "limited.csv"), "--out",
                        str(tmp_path / "limited"), *common, "--max-per-host", "2",
                        "--direct_running_mode=multi_threading", "--direct_num_workers=2"])
  assert summary["written"] == 64 and limited["peak"] == 2
  assert limited["agents"] == {f"headstart/{layout.CODE_VERSION} (image dataset ingest)"}
  caplog.set_level("WARNING", logger="urllib3.connectionpool")
  summary = ingest.run(["--source", str(tmp_path / "open.csv"), "--out", str(tmp_path / "open"),
                        *common, "--max-per-host", "16", "--user-agent", "lab-crawler/2 (me@x)"])
  assert summary["written"] == 64 and open_["peak"] > 4  # more than the old pools' maxsize
  assert "Connection pool is full" not in caplog.text
  assert open_["agents"] == {"lab-crawler/2 (me@x)"}


def test_retry_after_in_both_forms_is_honoured_and_opt_outs_are_dead_lettered(
    tmp_path, http_server):
  """503 + `Retry-After: <HTTP-date>` and 429 + `Retry-After: 1` are retried no sooner than
  asked; a Retry-After beyond the download's deadline (from another host: it pauses its host
  for every thread) is not waited for. X-Robots-Tag noai,
  noimageai, noindex, none (unscoped or scoped to headstart) are `opted_out`; a tag scoped to
  another crawler is not; --no-respect-opt-out ingests them all."""
  import email.utils
  import http.server
  import threading
  import time

  from tests.conftest import _Handler

  other = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Handler)
  other.routes, other.hits = {"/hour.png": (429, {"Retry-After": "3600"}, b"")}, []
  threading.Thread(target=other.serve_forever, daemon=True).start()
  body = cv2.imencode(".png", make_image((40, 40), 0, 1))[1].tobytes()
  seen: dict[str, list[float]] = {}

  def busy_once(status: int, retry_after):
    def route(handler):
      seen.setdefault(handler.path, []).append(time.monotonic())
      if len(seen[handler.path]) == 1:
        send(handler, status, headers={"Retry-After": retry_after()})
      else:
        send(handler, 200, body)
    return route

  tags = {"noai": "noai", "noimageai": "noarchive, noimageai", "noindex": "noindex",
          "none": "none", "scoped": "headstart: noai", "other": "googlebot: noindex, nofollow",
          "unrelated": "unavailable_after: 25 Jun 2030 15:00:00 PST"}
  http_server.routes = {
      "/date.png": busy_once(503, lambda: email.utils.formatdate(time.time() + 2, usegmt=True)),
      "/seconds.png": busy_once(429, lambda: "1"),
      **{f"/{name}.png": (200, {"X-Robots-Tag": tag}, body) for name, tag in tags.items()}}
  names = ["date", "seconds", *tags]
  manifest = tmp_path / "m.csv"
  manifest.write_text("image_url,label\n" + "".join(
      f"{http_server.url}/{name}.png,{'ab'[i % 2]}\n" for i, name in enumerate(names))
      + f"http://127.0.0.2:{other.server_address[1]}/hour.png,a\n")
  common = ["--image-size", "32", "--allow-network", "127.0.0.0/8", "--timeout", "20",
            "--max-error-fraction", "1"]
  started = time.monotonic()
  summary = ingest.run(["--source", str(manifest), "--out", str(tmp_path / "out"), *common])
  assert time.monotonic() - started < 20
  by_source = {e["row"]["source"].rsplit("/", 1)[-1]: e["reason"]
               for e in _errors(tmp_path / "out")}
  assert by_source == {"hour.png": "http_429", "noai.png": "opted_out",
                       "noimageai.png": "opted_out", "noindex.png": "opted_out",
                       "none.png": "opted_out", "scoped.png": "opted_out"}
  assert summary["written"] == 4
  assert seen["/date.png"][1] - seen["/date.png"][0] >= 1.0   # an HTTP-date 2 s ahead
  assert seen["/seconds.png"][1] - seen["/seconds.png"][0] >= 1.0
  summary = ingest.run(["--source", str(manifest), "--out", str(tmp_path / "all"), *common,
                        "--no-respect-opt-out"])
  other.shutdown()
  assert summary["written"] == 9 and summary["by_reason"] == {"http_429": 1}


def test_retry_after_backoff_pools_and_download_cache_defaults():
  """The pure parts: Retry-After parsing, jittered backoff, the LRU pool bound, and the download
  cache default (on for local runners, off for remote ones unless --download-cache is given)."""
  import asyncio
  import random

  from apache_beam.options.pipeline_options import PipelineOptions

  from pipeline import hosts
  assert hosts.retry_after_seconds("120") == 120.0
  assert hosts.retry_after_seconds("Thu, 01 Jan 2026 00:01:00 GMT",
                                   now=1767225600.0) == 60.0
  assert hosts.retry_after_seconds("soon") is None and hosts.retry_after_seconds(None) is None
  rng = random.Random(0)
  waits = [hosts.backoff_seconds(3, 0.5, None, rng) for _ in range(200)]
  assert 1.0 <= min(waits) < max(waits) <= 2.0 and len(set(waits)) > 100
  assert all(5.0 <= hosts.backoff_seconds(1, 0.5, 5.0, rng) <= 6.25 for _ in range(50))
  async def limits():
    limiter = hosts.HostLimiter(per_host=1)
    limiter.pause("h", 0.3)
    with pytest.raises(hosts.HostPaused):
      async with limiter.slot("h", max_wait=0.1):
        pass
    async with limiter.slot("h", max_wait=1.0), limiter.slot("other", max_wait=0.0):
      assert limiter.in_flight("h") == 1
  asyncio.run(limits())

  closed = []

  class Pool:
    def __init__(self, key):
      self.key = key

    def close(self):
      closed.append(self.key)

  pools = hosts.PoolCache(2, Pool)
  a = pools.get(("a",))
  pools.get(("b",))
  assert pools.get(("a",)) is a
  pools.get(("c",))
  assert closed == [("b",)] and len(pools) == 2

  def cache_for(*argv):
    args, beam_args = ingest.build_parser().parse_known_args(
        ["--source", "m.csv", "--out", "gs://b/out", *argv])
    return ingest._download_cache(args, PipelineOptions(beam_args))
  assert cache_for() == "gs://b/out/download_cache"
  assert cache_for("--runner=DataflowRunner") is None
  assert cache_for("--runner", "DataflowRunner", "--download-cache", "gs://b/c") == "gs://b/c"
  assert cache_for("--download-cache", "none") is None


# --- 8. retry only what failed -------------------------------------------------------------------


def test_retry_failed_fetches_only_transient_failures_and_equals_a_clean_run(tmp_path,
                                                                             http_server):
  """Run 1 meets 503s, a timeout and a 404; once the sources recover, `--retry-failed` (under
  multi_processing, as on Dataflow) fetches exactly the 503/timeout rows again (a duplicate of
  one included) and ends equal to a clean run: records (bytes, splits), class names, counts
  and dead letters."""
  import time
  state = {"sick": True}

  def image(i: int) -> bytes:
    return cv2.imencode(".png", make_image((40, 40), i % 2, i))[1].tobytes()

  def sometimes(i: int, failure: str):
    def route(handler):
      if state["sick"] and failure == "503":
        send(handler, 503)
        return
      if state["sick"]:
        time.sleep(1.5)  # past --timeout: the client gives up
      send(handler, 200, image(i))
    return route

  http_server.routes = {**{f"/good{i}.png": (200, {}, image(i)) for i in range(5)},
                        "/flaky0.png": sometimes(10, "503"), "/flaky1.png": sometimes(11, "503"),
                        "/slow.png": sometimes(12, "timeout"), "/gone.png": (404, {}, b"")}
  lines = [f"{http_server.url}/good{i}.png,{'ab'[i % 2]}" for i in range(5)]
  lines += [f"{http_server.url}/{name}.png,{label}" for name, label in (
      ("flaky0", "a"), ("flaky1", "b"), ("slow", "a"), ("gone", "b"), ("flaky0", "a"))]
  manifest = tmp_path / "m.csv"
  manifest.write_text("image_url,label\n" + "\n".join(lines) + "\ntoo,many,fields\n")
  common = ["--source", str(manifest), "--image-size", "32", "--allow-network", "127.0.0.1/32",
            "--retries", "0", "--timeout", "1", "--download-cache", "none",
            "--max-error-fraction", "0.9"]
  out = tmp_path / "out"
  first = ingest.run([*common, "--out", str(out)])
  assert first["by_reason"] == {"http_503": 2, "timeout": 1, "not_found": 1, "duplicate": 1,
                                "malformed_row": 1}
  state["sick"] = False
  http_server.hits.clear()
  retried = ingest.run([*common, "--out", str(out), "--retry-failed",
                        "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
  assert sorted(http_server.hits) == ["/flaky0.png", "/flaky1.png", "/slow.png"]
  clean = ingest.run([*common, "--out", str(tmp_path / "clean")])
  keys = ("input_rows", "written", "dead_lettered", "by_reason", "by_split", "by_class")
  assert {k: retried[k] for k in keys} == {k: clean[k] for k in keys}
  assert retried["written"] == 8 and retried["by_reason"] == {
      "not_found": 1, "duplicate": 1, "malformed_row": 1}
  assert _comparable(out) == _comparable(tmp_path / "clean")
  assert sorted(map(json.dumps, _errors(out))) == sorted(map(json.dumps,
                                                             _errors(tmp_path / "clean")))
  assert (datasets.read_manifest(str(out))["class_names"]
          == datasets.read_manifest(str(tmp_path / "clean"))["class_names"])
  with pytest.raises(ValueError, match="--image-size 48"):
    ingest.run([*common, "--out", str(out), "--retry-failed", "--image-size", "48"])


# --- 2. the launcher does not grow with the rows -------------------------------------------------


def test_folder_trees_are_listed_inside_the_pipeline_not_by_the_launcher(tmp_path):
  """The submitted pipeline of a 40-file and a 2,000-file tree (and of 40- and 2,000-row CSVs)
  has the same size: files are matched by fileio.MatchAll on the workers (the launcher lists
  only the class folders), and CSV rows are read by the workers. The tree job then ingests
  every matched file (see the tree tests)."""
  from benchmarks import driver_bench

  sizes = {}
  for n, name in ((40, "small"), (2000, "large")):  # names of one length: paths are in the proto
    for kind, source in (("tree", driver_bench.write_tree(tmp_path / f"tree_{name}", n)),
                         ("csv", driver_bench.write_csv(tmp_path / f"csv_{name}" / "m.csv", n))):
      job = ingest.plan(["--source", str(source), "--out", str(tmp_path / f"o{kind}_{name}")])
      sizes[kind, n] = len(job.pipeline.to_runner_api().SerializeToString())
      assert not list((tmp_path / f"o{kind}_{name}").glob("*.tfrecord*"))  # planned, not run
  for kind in ("tree", "csv"):  # listing 1,960 more rows into the job would add ~200 KB
    assert abs(sizes[kind, 2000] - sizes[kind, 40]) < 0.01 * sizes[kind, 40], sizes


def test_rows_in_flight_keep_to_the_byte_budget_before_their_sizes_are_known():
  """Rows of 1 MB against an 8 MB budget: the window may not start a row whose bytes would
  overrun it, though a row's size is known only once it arrives (256 rows may be in flight)."""
  import asyncio
  import threading

  from pipeline import fetch, inflight

  engine = inflight.Engine(fetch.Fetcher(fetch.FetchConfig()), max_in_flight=256,
                           max_bytes=8 << 20, file_threads=2)
  peak, fetching = [0], [0]
  guard = threading.Lock()

  async def one_megabyte(slot):
    with guard:
      fetching[0] += 1
    await asyncio.sleep(0.002)
    with guard:
      fetching[0] -= 1
      with engine.changed:   # bytes held plus bytes on their way
        peak[0] = max(peak[0], engine.held + (fetching[0] + 1) * (1 << 20))
    return b"x" * (1 << 20)

  decoding = inflight.DecodeStage(lambda slots: [{"image": b"y" * 100} for _ in slots],
                                  workers=1)
  window = inflight.Window(engine, decoding, one_megabyte)
  try:
    out = [slot for index in range(200) for slot in window.push({"i": index})]
    out += window.drain()
  finally:
    decoding.close()
    engine.close()
  assert [slot.row["i"] for slot in out] == list(range(200))
  # The budget, plus the rows of the slow start (16 before any size is known) and one row.
  assert peak[0] <= (8 << 20) + (17 << 20), peak[0] >> 20


def test_a_failed_bundle_gives_its_bytes_back_to_the_budget():
  """A bundle that fails mid-window (Beam then retries it on the same worker) must not leave
  its rows' bytes counted: a worker would otherwise stop starting rows once failures added up."""
  import asyncio
  import time

  from pipeline import fetch, inflight

  engine = inflight.Engine(fetch.Fetcher(fetch.FetchConfig()), max_in_flight=64,
                           max_bytes=1 << 20, file_threads=2)

  async def slow(slot):
    await asyncio.sleep(0.05 if slot.row["i"] % 2 else 0.0)
    return b"x" * 10_000

  decoding = inflight.DecodeStage(lambda slots: [{"image": b"y" * 5_000} for _ in slots],
                                  workers=1)
  try:
    failed = inflight.Window(engine, decoding, slow)
    for index in range(40):
      failed.push({"i": index})
    assert engine.held > 0
    failed.abandon()
    deadline = time.monotonic() + 10
    while (engine.fetching or failed.unfinished) and time.monotonic() < deadline:
      time.sleep(0.01)
    assert (engine.held, engine.fetching, failed.unfinished) == (0, 0, 0)
    retry = inflight.Window(engine, decoding, slow)
    out = [slot for index in range(40) for slot in retry.push({"i": index})] + retry.drain()
    assert [slot.row["i"] for slot in out] == list(range(40))
    assert all(slot.result == {"image": b"y" * 5_000} for slot in out)
    assert engine.held == 0
  finally:
    decoding.close()
    engine.close()
