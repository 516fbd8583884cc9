"""Stage 2 spread over workers: record ranges give two workers work from one image shard, and
`--share-models machine` builds one backbone copy per machine instead of one per process.

    .venv/bin/python -m pytest tests/test_extract_workers.py -q     # ~1 min on 2 cores
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from contracts import datasets, layout
from features import jobs as jobs_lib
from features import model_host, records, transforms
from features import run as extract
from pipeline import run as ingest
from tests.conftest import write_image_set

SIZE = 32


@pytest.fixture(scope="module")
def one_shard_images(tmp_path_factory):
  """16 images, all in one train shard (fewer shards than the two workers below)."""
  folder = tmp_path_factory.mktemp("one_shard")
  manifest = write_image_set(folder / "src", 16, 40)
  out = folder / "images"
  ingest.run(["--source", str(manifest), "--out", str(out), "--image-size", str(SIZE),
              "--splits", "train=100", "--num-shards", "1"])
  assert len(datasets.read_manifest(str(out))["splits"]["train"]["shards"]) == 1
  return out


def _manifests(out) -> list[dict]:
  index = json.loads((out / layout.INDEX_NAME).read_text())["datasets"]
  return [datasets.read_manifest(str(out / entry["dir"])) for entry in index]


def test_two_workers_share_one_model_copy_and_both_work_on_one_shard(one_shard_images, tmp_path):
  out = tmp_path / "features"
  extract.run(["--images", str(one_shard_images), "--out", str(out), "--backbones",
               "mobilenet_v2,vgg16", "--weights", "none", "--input-size", str(SIZE),
               "--batch-size", "4", "--share-models", "machine",
               "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
  for manifest in _manifests(out):
    # Both SDK processes read, decoded and wrote (ranges of 4 records, not the whole shard)...
    assert len(manifest["workers"]) == 2 and all(n > 0 for n in manifest["workers"].values())
    assert sum(manifest["workers"].values()) == manifest["splits"]["train"]["num_examples"] == 16
    # ...through one copy of the backbones, built by whichever process came first.
    assert manifest["model_sharing"] == "machine" and manifest["model_copies"] == 1
    assert 0 < manifest["processing_seconds"] < manifest["extraction_seconds"]
    assert len(manifest["splits"]["train"]["shards"]) == 1  # 16 small records: one shard
  assert not list(tmp_path.glob("features/*/features.parts"))


def test_a_copy_shared_over_the_socket_computes_what_a_local_copy_computes(tiny_image_dataset,
                                                                          tmp_path):
  from apache_beam.utils import shared
  config, _ = extract.parse_args([
      "--images", str(tiny_image_dataset), "--out", str(tmp_path), "--backbones", "mobilenet",
      "--weights", "imagenet", "--input-size", str(SIZE)])  # the shipped weights: no download
  (job,) = [jobs_lib.prepare(job) for job in jobs_lib.plan(config).jobs]
  side = job.image_info["image_size"]   # the forward takes stored images and resizes them
  images = np.random.default_rng(0).integers(0, 256, (3, side, side, 3), np.uint8)
  tag = model_host.new_run_tag()
  try:
    local = model_host.acquire([job], jit_compile=False, batch_size=3, sharing="process",
                               tag=tag, handle=shared.Shared())
    served = model_host.acquire([job], jit_compile=False, batch_size=3, sharing="machine",
                                tag=tag, handle=None)
    (local_copy, local_out), (served_copy, served_out) = (
        local.forward(images, 2), served.forward(images, 2))
  finally:
    model_host.remove_rendezvous_files(tag)
  assert local_copy != served_copy  # two copies: one here, one behind the socket
  for mine, theirs in zip(local_out[job.tag][:3], served_out[job.tag][:3]):
    assert len(mine) == 2 and np.array_equal(mine, theirs)  # padding row dropped, same values


def test_setup_turns_on_gpu_memory_growth_before_building(monkeypatch):
  import tensorflow as tf
  grown, order = [], []
  monkeypatch.setattr(tf.config, "list_physical_devices",
                      lambda kind=None: ["GPU:0", "GPU:1"] if kind == "GPU" else [])
  monkeypatch.setattr(tf.config.experimental, "set_memory_growth",
                      lambda device, on: grown.append((device, on)) or order.append("growth"))

  class FakeModels:
    def forward(self, images, count):
      maps = np.ones((len(images), 1, 1, 2), np.float16)
      return "copy-1", {"b0": (maps[:count], np.ones((count, 2), np.float32),
                               np.zeros((count, 6), np.float32), 0.01)}

  def acquire(*args, **kwargs):
    order.append("build")
    return FakeModels()

  monkeypatch.setattr(model_host, "acquire", acquire)
  job = jobs_lib.FeatureJob(
      backbone="fake", tag="b0", out_dir="unused", cache_key="k", cache_key_fields={},
      weights=None, input_size=4, layer=None, preprocess="none", precision="float32", seed=0,
      store="pooled", views=0, image_info={"class_names": ["a", "b"], "num_keypoints": 0},
      map_shape=(1, 1, 2), pooled_dim=2)
  fn = transforms.RunBackbonesFn([job], batch_size=2, jit_compile=False, sharing="machine",
                                 tag="t", shared_handle=None)
  fn.setup()
  assert grown == [("GPU:0", True), ("GPU:1", True)] and order == ["growth", "growth", "build"]
  fn.start_bundle()
  batch = [records.ImageRecord(f"id{i}", "train", 0, np.zeros((4, 4, 3), np.uint8), 1)
           for i in range(2)]
  # Batch 1's forward runs while batch 2 is decoded: its outputs come with the next batch or at
  # the end of the bundle.
  assert list(fn.process(batch, timestamp=Timestamp(0), window=GlobalWindow())) == []
  outputs = [(o.tag, o.value.value) for o in fn.finish_bundle()]
  fn.teardown()
  assert [tag for tag, _ in outputs] == ["health_b0", "stats_b0", "b0", "b0", transforms.USAGE]
  worker, copy_id, count, started, ended = outputs[-1][1]
  assert (worker, copy_id, count) == (model_host.worker_id(), "copy-1", 2) and started <= ended
