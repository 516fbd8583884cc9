"""Smoke test of the benchmark harness on tiny inputs (structure only, no timing assertions).

    .venv/bin/python -m pytest tests/test_benchmarks.py
"""
from __future__ import annotations

import json

import pytest

from benchmarks import images, measure, storage_bench

RATIO_KEYS = {"name", "value", "target", "comparison", "meets_target", "numerator",
              "denominator", "details", "notes", "reason"}


def test_r7_on_tiny_records_has_the_json_structure(tmp_path):
  ratio = storage_bench.r7(tmp_path, count=4, map_shape=(2, 2, 8))
  record = json.loads(json.dumps(ratio.to_dict()))
  assert set(record) == RATIO_KEYS
  assert record["comparison"] == "<=" and record["target"] == 1.01
  assert record["denominator"]["value"] == 2 * 2 * 8 * 2 + 8 * 4
  assert record["numerator"]["value"] > record["denominator"]["value"]
  assert isinstance(record["meets_target"], bool)
  assert ratio.line().startswith("R7 ")


def test_ratio_verdicts_and_bad_arguments():
  figure = measure.Figure("a", 2.0, "x/s")
  assert measure.Ratio("R1", "n", 0.97, figure, figure, 0.95).meets_target
  assert not measure.Ratio("R4", "n", 1.2, figure, figure, 1.0, "<=").meets_target
  assert not measure.Ratio("R2", "n", None, figure, figure, 8.0).meets_target
  with pytest.raises(ValueError, match="'=='"):
    measure.Ratio("R1", "n", 1.0, figure, figure, 1.0, "==")
  with pytest.raises(ValueError, match="'bogus'"):
    storage_bench.raw_tensor_bytes((1, 1, 1), 1, "bogus")


def test_corpus_is_photo_like_and_hard_linked(tmp_path):
  jpegs = images.distinct_jpegs([(64, 48)], per_size=2)
  manifest = images.write_corpus(tmp_path, jpegs, 5)
  rows = manifest.read_text().splitlines()
  assert rows[0] == "image_url,label" and len(rows) == 6
  assert (tmp_path / "img" / "00004.jpg").read_bytes() == jpegs[0]
  with pytest.raises(ValueError, match="8x8"):
    images.photo_like(8, 8, 0)


def test_markdown_table_lists_every_ratio_and_memory_check(tmp_path):
  from benchmarks import suite
  record = storage_bench.r7(tmp_path, count=2, map_shape=(1, 1, 4)).to_dict()
  memory = suite._memory_entry("ingest", {
      10: {"tree_rss_mb": 100.0, "max_rss_mb": 90.0, "processes": 1},
      50: {"tree_rss_mb": 104.0, "max_rss_mb": 92.0, "processes": 1}})
  assert memory["flat"] and memory["growth_mb_per_1000_images"] == 100.0
  table = suite.markdown_table({**{key: record for key in suite.RATIO_KEYS}, "memory": [memory]})
  assert all(f"| {key} " in table for key in suite.RATIO_KEYS) and "peak RSS ingest" in table


def test_driver_entry_judges_rss_and_proto_growth():
  from benchmarks import driver_bench, suite
  entry = driver_bench._entry("CSV manifest", {
      20: {"max_rss_mb": 700.0, "proto_bytes": 1000.0},
      200: {"max_rss_mb": 720.0, "proto_bytes": 1200.0}})
  assert not entry["flat"] and round(entry["proto_growth"], 3) == 0.2
  assert "NOT flat" in driver_bench.line(entry) and "200 rows 720 MB" in driver_bench.line(entry)
  table = suite.markdown_table({"memory": [], "driver": [entry], **{
      f"R{i}": storage_bench_record() for i in range(1, 9)}})
  assert "| ingest launcher, CSV manifest | RSS +2.9%, proto +20.0%" in table


def storage_bench_record() -> dict:
  figure = measure.Figure("a", 1.0, "x")
  return measure.Ratio("R7", "n", 1.0, figure, figure, 1.0).to_dict()


def test_heads_scale_benchmark_on_a_tiny_grid(tmp_path):
  """R8 and the read counts on a small synthetic dataset (the suite runs it at full size)."""
  from benchmarks import heads_scale_bench
  ratio, reads = heads_scale_bench.r8(tmp_path, 60, seeds=1, epochs=1, repeats=1)
  assert ratio.key == "R8" and ratio.value is not None and ratio.details["runs"] == 2
  assert reads == {"train": 1.0, "validation": 1.0, "test": 1.0}


def test_http_source_serves_distinct_urls_on_many_hosts_to_the_fetcher(tmp_path):
  """The HTTP benchmark's loopback server: distinct URLs over a few files, one address per
  host, and the manifest spreads rows over them; fetched with ingest's own client."""
  from benchmarks import http_source, ingest_http_bench
  from pipeline import fetch
  served = tmp_path / "served"
  served.mkdir()
  bodies = [images.encode_jpeg(images.photo_like(40, 40, seed)) for seed in range(3)]
  for index, data in enumerate(bodies):
    (served / f"{index:03d}.jpg").write_bytes(data)
  with http_source.serve(served, latency=0.0, hosts=3) as urls:
    assert [u.split(":")[1] for u in urls] == ["//127.0.0.1", "//127.0.0.2", "//127.0.0.3"]
    manifest = ingest_http_bench.write_url_manifest(tmp_path / "m.csv", urls, 7)
    rows = manifest.read_text().splitlines()
    assert rows[0] == "image_url,label" and len(rows) == 8
    fetcher = fetch.Fetcher(fetch.FetchConfig(allowed_networks=("127.0.0.0/8",)))
    try:
      got = [fetcher.fetch(row.split(",")[0]) for row in rows[1:]]
      with pytest.raises(fetch.FetchError) as missing:
        fetcher.fetch(f"{urls[0]}/nothing.png")
    finally:
      fetcher.close()
  assert got == [bodies[i % 3] for i in range(7)]
  assert {row.split("/")[2].split(":")[0] for row in rows[1:]} == {
      "127.0.0.1", "127.0.0.2", "127.0.0.3"}
  assert missing.value.reason == "not_found"


def test_ingest_subjob_reports_the_cpu_of_its_pipeline_run(tmp_path):
  """R3s's marginal CPU comes from `run_cpu_seconds`: the pipeline's run, decoder processes
  included, without the imports and planning before it."""
  from tests.conftest import write_image_set
  manifest = write_image_set(tmp_path / "src", 6, 48)
  child = measure.run_child("ingest", ["--source", str(manifest), "--out", str(tmp_path / "out"),
                                       "--image-size", "32"])
  run_cpu = child.usage["run_cpu_seconds"]
  assert child.usage["written"] == 6
  # Start-up (TensorFlow and Beam imports) is seconds of CPU; the run of 6 images is less.
  assert 0 < run_cpu < child.cpu_seconds - 1.0, (run_cpu, child.cpu_seconds)
