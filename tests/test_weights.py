"""Weights tests: resolution order, offline failure, `headstart weights list|stage`, the shipped
MobileNet file end to end, and (real_weights) real ImageNet features beating random ones.

    .venv/bin/python -m pytest tests/test_weights.py -q
"""
from __future__ import annotations

import dataclasses
import shutil

import cv2
import keras
import numpy as np
import pytest

from contracts import datasets
import headstart
from features import backbones, forward, weights_cli
from features import run as extract
from features import weights as weights_lib
from tests.conftest import SHARED_WEIGHTS

SHIPPED_SHA256 = "bcf93bd3ab43986defcd029072955860b674b0451aac82ad698edd82fc11acd4"
SHIPPED_NAME = "mobilenet_1_0_224_imagenet_notop.weights.h5"


@pytest.fixture
def offline(tmp_path, monkeypatch):
  """An empty Keras cache, no weights dir, and a network that is unreachable."""
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  monkeypatch.delenv(weights_lib.WEIGHTS_DIR_ENV, raising=False)

  def unreachable(fname, origin, **_):
    raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known")

  monkeypatch.setattr(keras.utils, "get_file", unreachable)
  monkeypatch.setattr(weights_cli, "_online", lambda url: False)
  return tmp_path


def test_imagenet_resolution_order(offline, monkeypatch):
  shipped = weights_lib.resolve("mobilenet", "imagenet", input_size=224)
  assert (shipped.source, shipped.file_name, shipped.sha256) == ("shipped", SHIPPED_NAME,
                                                                 SHIPPED_SHA256)
  cache = offline / "keras_home" / "models"
  cache.mkdir(parents=True)
  (cache / "mobilenet_1_0_224_tf_no_top.h5").write_bytes(b"cached")
  assert weights_lib.resolve("mobilenet", "imagenet", input_size=224).source == "cache"
  # MobileNet's Keras file depends on the input size: 128 px has its own, so the cache misses.
  assert weights_lib.resolve("mobilenet", "imagenet", input_size=128).source == "shipped"
  staged = offline / "staged"
  staged.mkdir()
  (staged / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"staged")
  monkeypatch.setenv(weights_lib.WEIGHTS_DIR_ENV, str(staged))
  vgg = weights_lib.resolve("vgg16", "imagenet", input_size=300)
  assert vgg.source == "dir" and vgg.path.startswith(str(staged))
  flag_dir = offline / "flag"
  flag_dir.mkdir()
  (flag_dir / "mobilenet_1_0_224_tf_no_top.h5").write_bytes(b"from the flag")
  flagged = weights_lib.resolve("mobilenet", "imagenet", input_size=224, weights_dir=str(flag_dir))
  assert flagged.source == "dir" and flagged.path.startswith(str(flag_dir))
  # --weights PATH: kind `file`, its own sha256; the same file goes into every worker.
  own_file = staged / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
  own = weights_lib.resolve("mobilenet", str(own_file), input_size=224)
  assert (own.kind, own.source, own.sha256) == ("file", "file", datasets.file_sha256(own.path))
  with pytest.raises(ValueError, match="'missing.h5'"):
    weights_lib.resolve("mobilenet", "missing.h5", input_size=224)


def test_offline_imagenet_fails_in_one_sentence_naming_the_alternatives(
    offline, tiny_image_dataset, capsys):
  with pytest.raises(ValueError) as error:
    weights_lib.resolve("vgg16", "imagenet", input_size=300)
  message = str(error.value)
  assert "\n" not in message and "--weights-dir" in message and "--weights none" in message
  assert "Name or service not known" in message
  code = headstart.main(["extract", "--images", str(tiny_image_dataset), "--out",
                         str(offline / "out"), "--backbones", "vgg16", "--input-size", "32"])
  lines = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and "headstart extract: error: ImageNet weights for 'vgg16'" in lines[-1]


def test_worker_finds_the_same_file_by_name_and_checks_its_hash(offline):
  staged = offline / "staged"
  staged.mkdir()
  shutil.copy(weights_lib.SHIPPED_DIR + "/" + SHIPPED_NAME, staged / SHIPPED_NAME)
  driver = weights_lib.WeightsChoice("imagenet", "dir", "/driver/only/" + SHIPPED_NAME,
                                     SHIPPED_NAME, SHIPPED_SHA256)
  found = weights_lib.localize(driver, backbone="mobilenet", input_size=224,
                               weights_dir=str(staged))
  assert found == str(staged / SHIPPED_NAME)
  (offline / "other").mkdir()
  (offline / "other" / "mobilenet_1_0_224_tf_no_top.h5").write_bytes(b"different bytes")
  with pytest.raises(ValueError, match="differ"):
    weights_lib.localize(driver, backbone="mobilenet", input_size=224,
                         weights_dir=str(offline / "other"))


def test_weights_list_and_stage(offline, capsys):
  assert headstart.main(["weights", "list"]) == 0
  rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
  assert set(rows) == set(backbones.BACKBONES)
  assert rows["mobilenet"][1] == "shipped" and rows["mobilenet"][-1] == f"sha256={SHIPPED_SHA256}"
  assert rows["vgg16"][1] == "unavailable"
  target = offline / "bucket"
  assert headstart.main(["weights", "stage", "--backbones", "mobilenet", "--to", str(target)]) == 0
  assert datasets.file_sha256(str(target / SHIPPED_NAME)) == SHIPPED_SHA256
  headstart.main(["weights", "list", "--weights-dir", str(target)])
  assert "mobilenet        dir" in capsys.readouterr().out
  code = headstart.main(["weights", "stage", "--backbones", "vgg16", "--to", str(target)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and "vgg16" in err[-1] and "--weights none" in err[-1]


def test_extract_mobilenet_imagenet_offline_uses_the_shipped_file(offline, tiny_image_dataset):
  out = offline / "features"
  extract.run(["--images", str(tiny_image_dataset), "--out", str(out), "--backbones",
               "mobilenet", "--weights", "imagenet", "--input-size", "64"])
  (path,) = [p for p in out.iterdir() if p.is_dir()]
  manifest = datasets.read_manifest(str(path))
  assert path.name.startswith("mobilenet-imagenet-")
  assert manifest["weights_source"] == "shipped" and manifest["weights_file"] == SHIPPED_NAME
  assert manifest["weights_sha256"] == SHIPPED_SHA256
  assert manifest["cache_key_fields"]["weights_sha256"] == SHIPPED_SHA256
  assert manifest["health"]["ok"] and manifest["feature_map_shape"] == [2, 2, 1024]


def _shape_images(count: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  # Disc vs triangle, random colours and positions: the label is in the shape, not the colour.
  rng = np.random.default_rng(seed)
  images, labels = [], []
  for i in range(count):
    image = rng.integers(0, 256, 3)[None, None, :] * np.ones((size, size, 3))
    image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    radius = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(radius, size - radius, 2))
    if i % 2 == 0:
      cv2.circle(image, (cx, cy), radius, colour, -1)
    else:
      points = np.array([[cx, cy - radius], [cx - radius, cy + radius],
                         [cx + radius, cy + radius]], np.int32)
      cv2.fillPoly(image, [points], colour)
    images.append(image)
    labels.append(i % 2)
  return np.stack(images), np.asarray(labels)


def _nearest_centroid_accuracy(train, train_labels, test, test_labels) -> float:
  mean, std = train.mean(axis=0), train.std(axis=0) + 1e-12
  train, test = (train - mean) / std, (test - mean) / std
  centroids = np.stack([train[train_labels == k].mean(axis=0) for k in (0, 1)])
  predicted = np.argmin(((test[:, None, :] - centroids[None]) ** 2).sum(axis=-1), axis=1)
  return float((predicted == test_labels).mean())


@pytest.mark.real_weights
def test_real_mobilenet_features_beat_random_ones():
  weights_file = SHARED_WEIGHTS / SHIPPED_NAME
  if not weights_file.exists():
    pytest.skip(f"{weights_file} is absent (the shared real weights are not on this machine)")
  size = 128
  train, train_labels = _shape_images(60, 1, size)
  test, test_labels = _shape_images(60, 2, size)

  def accuracy(**build) -> float:
    model = backbones.build_extractor("mobilenet", input_size=size, **build)
    function = forward.compile_forward(model, size)
    pooled = lambda x: np.concatenate([function(x[i:i + 32])[1].numpy()
                                       for i in range(0, len(x), 32)])
    return _nearest_centroid_accuracy(pooled(train), train_labels, pooled(test), test_labels)

  real = accuracy(weights_file=str(weights_file))
  random = np.mean([accuracy(seed=seed) for seed in range(3)])
  assert real >= 0.7 and real - random >= 0.15, (real, random)


def test_a_worker_without_the_staged_weights_fails_at_setup_before_reading_images(
    offline, tiny_image_dataset, monkeypatch):
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  from features import jobs as jobs_lib
  from pipeline import sharding
  staged = offline / "staged"
  staged.mkdir()
  name = backbones.BACKBONES["vgg16"].keras_file_name(32)
  (staged / name).write_bytes(b"staged where the driver sees it")
  config, beam_args = extract.parse_args([
      "--images", str(tiny_image_dataset), "--out", str(offline / "features"), "--backbones",
      "vgg16", "--input-size", "32", "--weights-dir", str(staged)])
  plan = jobs_lib.plan(config)
  jobs = tuple(jobs_lib.prepare(job) for job in plan.jobs)
  (staged / name).unlink()  # what the workers see: the file never reached the weights dir
  reads = []
  real_read_range = sharding.read_range
  monkeypatch.setattr(sharding, "read_range",
                      lambda *args: reads.append(args) or real_read_range(*args))
  pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
  extract.build_pipeline(pipeline, dataclasses.replace(plan, jobs=jobs))
  with pytest.raises(Exception) as error:
    pipeline.run().wait_until_finish()
  sentence = weights_lib.missing_on_worker("vgg16", name, str(staged))
  assert sentence in str(error.value) and "\n" not in sentence
  assert reads == []  # setup() failed before the first record range was read


def test_remote_runs_refuse_weights_workers_cannot_reach(offline, tiny_image_dataset):
  cache = offline / "keras_home" / "models"
  cache.mkdir(parents=True)
  (cache / backbones.BACKBONES["vgg16"].keras_file_name(32)).write_bytes(b"driver's cache only")
  args = ["--images", str(tiny_image_dataset), "--out", str(offline / "features"), "--input-size",
          "32", "--runner", "DataflowRunner", "--backbones"]
  with pytest.raises(ValueError, match=r"would not find the ImageNet weights of vgg16: .*"
                                       r"headstart weights stage --backbones vgg16"):
    extract.run([*args, "vgg16,mobilenet"])  # mobilenet ships with the package: not named
