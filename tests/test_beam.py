"""Beam seams tested the Beam way: both `build_pipeline`s under `TestPipeline` + `assert_that`
with inputs made in the test, and `process()` of the DoFns that hold logic, without a runner."""
from __future__ import annotations

import json
import pathlib

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing import test_pipeline as beam_testing
from apache_beam.testing.util import assert_that, equal_to

from contracts import cli, datasets
from contracts import schema as schema_lib
from pipeline import job
from pipeline import image_decode, sources, transforms
from tests.conftest import write_image_set


def _test_pipeline() -> beam_testing.TestPipeline:
  return beam_testing.TestPipeline(options=PipelineOptions(cli.with_default_runner([])))


def _split_outputs(outputs) -> tuple[list, dict[str, list]]:
  main, tagged = [], {}
  for output in outputs:
    if isinstance(output, TaggedOutput):
      tagged.setdefault(output.tag, []).append(output.value)
    else:
      main.append(output)
  return main, tagged


@pytest.fixture
def csv_source(tmp_path) -> tuple[sources.CsvSpec, pathlib.Path]:
  manifest = write_image_set(tmp_path / "src", 6, 40)
  with manifest.open("a") as f:
    f.write("img/missing.png,a\n")
  return sources.inspect_csv(str(manifest), url_column="image_url", label_column="label"), manifest


# ---------------------------------------------------------------------------------------------
# Stage 1


def test_ingest_build_pipeline_under_test_pipeline(csv_source, tmp_path):
  spec, manifest = csv_source
  out = str(tmp_path / "images")
  cfg = transforms.IngestConfig(image_size=32, decode_timeout=0)
  settings = {"image_size": 32, "resize": "stretch", "format": "jpeg",
              "background": [255, 255, 255], "source_manifest": str(manifest),
              "label_column": "label", "group_column": None, "split_weights": "train=100"}
  with _test_pipeline() as root:
    summary = job.build_pipeline(root, out_dir=out, cfg=cfg, spec=spec, tree=None,
                                 max_error_fraction=0.5, settings=settings)
    assert_that(summary | beam.Map(lambda s: (s["status"], s["written"], s["dead_lettered"],
                                              s["balanced"], s["by_reason"])),
                equal_to([("ok", 6, 1, True, {"not_found": 1})]))
  manifest_written = datasets.read_manifest(out)
  assert manifest_written["counts"]["written"] == 6


def test_read_csv_source_and_dedupe(csv_source):
  spec, manifest = csv_source
  with manifest.open("a") as f:
    f.write("img/0000.png,a\nimg/0001.jpg,a\n")   # a duplicate, and a conflicting label
  with _test_pipeline() as root:
    rows, dead, count = root | transforms.ReadCsvSource(spec)
    unique = (rows | beam.Map(lambda row: (row["id"], row)) | beam.GroupByKey()
              | beam.ParDo(transforms.KeepOnePerIdFn()).with_outputs(transforms.DEAD, main="rows"))
    assert_that(count, equal_to([9]), label="CountAll")
    assert_that(dead, equal_to([]), label="NoParseErrors")
    assert_that(unique.rows | beam.Map(lambda row: row["source"]),
                equal_to(["img/0000.png", "img/0002.png", "img/0003.jpg", "img/0004.png",
                          "img/0005.jpg", "img/missing.png"]), label="KeptRows")
    assert_that(unique[transforms.DEAD] | beam.Map(lambda line: json.loads(line)["reason"]),
                equal_to(["duplicate", "conflicting_label", "conflicting_label"]),
                label="DeadLetters")


def test_parse_csv_line_fn_process(csv_source):
  spec, _ = csv_source
  fn = transforms.ParseCsvLineFn(spec)
  (row,) = fn.process(b"img/0000.png,a")
  assert row["source"] == "img/0000.png" and row["label"] == "a" and len(row["id"]) == 64
  assert list(fn.process(b"   ")) == []
  (dead,) = fn.process(b"\xff\xfe,a")
  assert dead.tag == transforms.DEAD and json.loads(dead.value)["reason"] == "malformed_row"
  (outside,) = fn.process(b"../../etc/passwd.png,a")
  assert json.loads(outside.value)["reason"] == "outside_root"


def test_fetch_decode_fn_process(csv_source):
  """Rows go in one by one; images come out as lists in input order (with a later row or at
  the end of the bundle), failures as dead letters."""
  spec, _ = csv_source
  lines = ("img/0000.png,a", "img/missing.png,b", "img/0002.png,a", "img/0003.jpg,b")
  rows = [sources.parse_csv_line(line, spec) for line in lines]
  fn = transforms.FetchDecodeFn(transforms.IngestConfig(image_size=24, decode_timeout=0))
  fn.setup()
  try:
    fn.start_bundle()
    outputs = [output for row in rows for output in fn.process(row)]
    outputs += [TaggedOutput(o.tag, o.value.value) if isinstance(o, TaggedOutput) else o.value
                for o in fn.finish_bundle()]  # WindowedValues there
  finally:
    fn.teardown()
  batches, tagged = _split_outputs(outputs)
  images = [image for batch in batches for image in batch]
  assert [image["id"] for image in images] == [rows[0]["id"], rows[2]["id"], rows[3]["id"]]
  assert images[0]["image"][:2] == b"\xff\xd8"   # stored as JPEG at the image size
  assert image_decode.PHASES_KEY not in images[0]
  assert [json.loads(line)["reason"] for line in tagged[transforms.DEAD]] == ["not_found"]


def test_to_example_fn_process():
  fn = transforms.ToExampleFn(transforms.IngestConfig(image_size=8, image_format="png",
                                                      splits=(("train", 1.0),)))
  fn.setup()
  item = {"id": "i" * 64, "image": b"\x89PNG", "source": "a.png", "content_sha256": "c",
          "height": 10, "width": 12, "label": "b"}
  main, tagged = _split_outputs(fn.process([item, {**item, "id": "j" * 64}], ["a", "b"]))
  (split, (serialized, _)), = main
  assert split == "train" and tagged[transforms.STATS] == [(("train", "b"), 2)]
  schema = schema_lib.image_schema(image_size=8, image_format="png", class_names=["a", "b"],
                                   num_keypoints=0)
  assert schema.decode(serialized, ("id", "label", "width")) == {"id": "i" * 64, "label": 1,
                                                                "width": 12}
  main, tagged = _split_outputs(fn.process([{**item, "label": "zebra"}], ["a", "b"]))
  assert main == [] and json.loads(tagged[transforms.DEAD][0])["reason"] == "unknown_label"


# ---------------------------------------------------------------------------------------------
# Stage 2


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> pathlib.Path:
  import keras
  inputs = keras.Input((None, None, 3))
  x = keras.layers.Conv2D(4, 3, strides=4, activation="relu", name="conv")(
      keras.layers.Rescaling(1 / 255.0)(inputs))
  path = tmp_path_factory.mktemp("backbone") / "tiny.keras"
  keras.Model(inputs, x).save(path)
  return path


def test_extract_build_pipeline_under_test_pipeline(tiny_image_dataset, tiny_backbone, tmp_path):
  import dataclasses

  from features import jobs as jobs_lib
  from features import run as extract_run
  config = jobs_lib.ExtractConfig(images=str(tiny_image_dataset), out=str(tmp_path / "features"),
                                  backbones=(str(tiny_backbone),), input_size=32, batch_size=8)
  plan = jobs_lib.plan(config)
  jobs = tuple(jobs_lib.prepare(job) for job in plan.jobs)
  with _test_pipeline() as root:
    outputs = extract_run.build_pipeline(root, dataclasses.replace(plan, jobs=jobs))
    merged = outputs | beam.Flatten()
    assert_that(merged, equal_to([job.out_dir for job in jobs]))
  manifest = datasets.read_manifest(jobs[0].out_dir)
  image_manifest = datasets.read_manifest(str(tiny_image_dataset))
  assert {s: v["num_examples"] for s, v in manifest["splits"].items()} == {
      s: v["num_examples"] for s, v in image_manifest["splits"].items()}


def test_decode_image_fn_process(tiny_image_dataset):
  from features import transforms as extract_transforms
  image_manifest = datasets.read_manifest(str(tiny_image_dataset))
  schema = schema_lib.from_manifest(image_manifest)
  shard = datasets.shard_paths(str(tiny_image_dataset), image_manifest, "train")[0]
  serialized = next(iter(tf.data.TFRecordDataset(shard))).numpy()
  fn = extract_transforms.DecodeImageFn(schema, views=2, seed=0, image_size=64)
  name = shard.rsplit("/", 1)[-1]
  records, tagged = _split_outputs(fn.process((name, serialized)))
  assert [r.view for r in records] == [0, 1, 2] and not tagged
  assert records[0].image.shape == (64, 64, 3) and records[0].image.dtype == np.uint8
  assert not np.array_equal(records[0].image, records[1].image)   # an augmented view
  records, tagged = _split_outputs(fn.process((name, b"not an example")))
  assert records == []
  assert tagged[extract_transforms.DEAD_LETTERS][0]["reason"] == "schema_mismatch"
