"""Shard layout tests: the shard-count rule, cutting parts into balanced shards, the Beam sink
(`pipeline/sinks.py`), record-range reads, and `headstart ingest --num-shards`.

    .venv/bin/python -m pytest tests/test_sharding.py -q
"""
from __future__ import annotations

import json
import re

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from contracts import datasets
from pipeline import run as ingest
from pipeline import sharding, sinks
from tests.conftest import write_image_set

MIB = 1 << 20


def test_shard_count_follows_the_flag_or_the_size_rule():
  assert sharding.shard_count(40, 10 * MIB, num_shards=4) == 4
  assert sharding.shard_count(3, 10 * MIB, num_shards=4) == 3  # fewer records than shards
  assert sharding.shard_count(0, 0) == 0
  assert sharding.shard_count(1000, 150 * MIB) == 1
  for total in (201, 450, 999, 4096):
    count = sharding.shard_count(100_000, total * MIB)
    assert 100 * MIB < total * MIB / count <= 200 * MIB, (total, count)
  with pytest.raises(ValueError, match="-1"):
    sharding.shard_count(10, 10, num_shards=-1)


def test_plan_cuts_parts_into_balanced_shards_at_record_boundaries():
  parts = [{"split": "train", "path": "p/b", "records": 3, "bytes": 30, "order": "2"},
           {"split": "train", "path": "p/a", "records": 5, "bytes": 50, "order": "1"},
           {"split": "train", "path": "p/c", "records": 2, "bytes": 20, "order": "3"},
           {"split": "test", "path": "p/t", "records": 1, "bytes": 9, "order": "0"},
           {"split": "validation", "path": "p/empty", "records": 0, "bytes": 0, "order": "0"}]
  plans = sharding.plan_shards(parts, name="images", num_shards=4)
  train = [p for p in plans if p["split"] == "train"]
  assert [p["file"] for p in train] == [f"images-train.tfrecord-0000{i}-of-00004" for i in range(4)]
  assert [p["records"] for p in train] == [2, 3, 2, 3]
  # Parts in `order` (a, b, c): records 0-4 in a, 5-7 in b, 8-9 in c.
  assert [p["segments"] for p in train] == [
      [("p/a", 0, 2)], [("p/a", 2, 5)], [("p/b", 0, 2)], [("p/b", 2, 3), ("p/c", 0, 2)]]
  assert [(p["file"], p["records"]) for p in plans if p["split"] != "train"] == [
      ("images-test.tfrecord-00000-of-00001", 1)]  # fewer records than --num-shards; no empty split


def _written(tmp_path, records, num_shards):
  out = tmp_path / "out"
  with test_pipeline.TestPipeline(options=beam.options.pipeline_options.PipelineOptions(
      ["--runner=FnApiRunner"])) as root:
    described = (root
                 | beam.Create(records)
                 | sinks.WriteSplits(str(out), "things", num_shards=num_shards))
    assert_that(described | beam.Map(lambda d: (d["split"], d["num_examples"])),
                equal_to([("train", 4), ("train", 3), ("train", 3), ("test", 1), ("test", 1)]))
  return out


def test_sink_writes_exact_shards_that_read_back_whole_and_by_range(tmp_path):
  records = [("train", f"record {i} ".encode() * (i + 1)) for i in range(10)]
  records += [("test", b"t1"), ("test", b"t2 longer")]
  out = _written(tmp_path, records, num_shards=3)
  names = sorted(p.name for p in out.iterdir())
  assert names == [*[f"things-test.tfrecord-0000{i}-of-00002" for i in range(2)],
                   *[f"things-train.tfrecord-0000{i}-of-00003" for i in range(3)]]  # parts gone
  train = [str(out / n) for n in names if "train" in n]
  read = [r.numpy() for path in train for r in tf.data.TFRecordDataset(path)]
  assert sorted(read) == sorted(r for s, r in records if s == "train")
  first = [r.numpy() for r in tf.data.TFRecordDataset(train[0])]
  assert list(sharding.read_range(train[0], 1, 3, len(first))) == first[1:3]
  described = datasets.describe_shard(train[0], "train")
  assert described["num_examples"] == len(first)


def test_a_shard_that_is_one_whole_part_is_moved_and_a_retry_finds_it(tmp_path):
  import hashlib
  parts_dir, out = tmp_path / "things.parts", tmp_path / "out"
  out.mkdir()
  write = sinks.WritePartsFn(str(parts_dir))
  write.setup()
  write.start_bundle()
  records = [f"record {i} ".encode() * (i + 1) for i in range(6)]
  write.process(("train", records[:2]))
  write.process(("train", records[2:]))
  parts = [part.value for part in write.finish_bundle()]
  (plan,) = sharding.plan_shards(parts, name="things")
  assert plan["segments"] == [(parts[0]["path"], 0, 6)]
  assemble = sinks.AssembleShardFn(str(out))
  (first,) = assemble.process(plan)
  (again,) = assemble.process(plan)  # a retried bundle: the part is gone, the shard is there
  shard = out / plan["file"]
  assert first == again and not tf.io.gfile.exists(parts[0]["path"])
  assert first["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
  assert first["num_bytes"] == shard.stat().st_size == parts[0]["bytes"]
  assert [r.numpy() for r in tf.data.TFRecordDataset(str(shard))] == records


def test_range_reads_name_the_shard_on_corruption_and_wrong_counts(tmp_path):
  path = tmp_path / "x-train.tfrecord-00000-of-00001"
  with tf.io.TFRecordWriter(str(path)) as writer:
    for i in range(4):
      writer.write(b"payload %d" % i * 50)
  assert len(list(sharding.read_range(str(path), 0, 4, 4))) == 4
  with pytest.raises(sharding.ShardError, match=re.escape(path.name) + ".*manifest says 5"):
    list(sharding.read_range(str(path), 2, 5, 5))
  with pytest.raises(sharding.ShardError, match="more than the 3 records"):
    list(sharding.read_range(str(path), 2, 3, 3))
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(sharding.ShardError, match=re.escape(path.name) + r".*corrupt after \d"):
    list(sharding.read_range(str(path), 0, 4, 4))


def test_ingest_num_shards_per_split_and_fewer_for_small_splits(tmp_path):
  manifest = write_image_set(tmp_path / "src", 30, 40)
  out = tmp_path / "images"
  ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", "32",
              "--splits", "train=75,test=25", "--num-shards", "12"])
  splits = json.loads((out / "manifest.json").read_text())["splits"]
  train, test = splits["train"], splits["test"]
  assert train["num_examples"] >= 12 and test["num_examples"] < 12
  assert len(train["shards"]) == 12 and len(test["shards"]) == test["num_examples"]
  counts = [s["num_examples"] for s in train["shards"]]
  assert max(counts) - min(counts) <= 1 and all(s["num_examples"] == 1 for s in test["shards"])
  assert sorted(p.name for p in out.glob("images-*")) == sorted(
      s["file"] for split in splits.values() for s in split["shards"])
  with pytest.raises(ValueError, match="--num-shards: '-2' must be >= 0"):
    ingest.run(["--source", str(manifest), "--out", str(out), "--num-shards", "-2"])
