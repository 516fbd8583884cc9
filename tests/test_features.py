"""Stage 2 tests: the real `headstart extract` job on the tiny ingested dataset, and its parts.

    .venv/bin/python -m pytest tests/test_features.py -q      # ~1.5 min on 2 cores

Backbones are built with random weights at 32 px (VGG16 -> 1x1x512), so nothing is downloaded.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from contracts import datasets
from contracts import schema as schema_lib
import headstart
from features import backbones, cache_key, forward, health, records, views
from features import run as extract
from tests.conftest import REPO_ROOT

SIZE = 32
BASE_ARGS = ["--weights", "none", "--input-size", str(SIZE), "--batch-size", "8"]


def _fields(**overrides):
  fields = dict(image_fingerprint="f" * 64, backbone="vgg16", weights_kind="imagenet",
                weights_sha256="a" * 64, seed=0, layer=None, input_size=300, resize="stretch",
                input_resize="none", preprocess="caffe", dtype="float32", store="both", views=0)
  fields.update(overrides)
  return cache_key.cache_key_fields(**fields)


def _datasets(out: pathlib.Path) -> dict[str, pathlib.Path]:
  index = json.loads((out / "index.json").read_text())
  return {entry["backbone"]: out / entry["dir"] for entry in index["datasets"]}


def _load(path: pathlib.Path, split: str = "train") -> list[dict]:
  builder = tfds.builder_from_directory(str(path))
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


@pytest.fixture(scope="session")
def extracted(tiny_image_dataset, tmp_path_factory):
  """vgg16 + mobilenet_v2 (random weights, 32 px, 2 augmented views) over the tiny dataset."""
  out = tmp_path_factory.mktemp("features")
  extract.run(["--images", str(tiny_image_dataset), "--out", str(out),
               "--backbones", "vgg16,mobilenet_v2", "--views", "2", *BASE_ARGS])
  return out


@pytest.fixture(scope="session")
def tiny_keras_model(tmp_path_factory) -> pathlib.Path:
  """A one-Conv2D stand-in backbone saved as .keras (takes any input size)."""
  inputs = keras.Input((None, None, 3))
  x = keras.layers.Rescaling(1 / 255.0)(inputs)
  x = keras.layers.Conv2D(8, 3, strides=4, activation="relu", name="conv")(x)
  path = tmp_path_factory.mktemp("model") / "tiny_net.keras"
  keras.Model(inputs, x).save(path)
  return path


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_cache_key_is_stable_and_changes_with_every_field():
  key = cache_key.cache_key(_fields())
  assert key == cache_key.cache_key(_fields()) and re.fullmatch(r"[0-9a-f]{64}", key)
  changes = dict(image_fingerprint="e" * 64, backbone="vgg19", weights_sha256="b" * 64,
                 layer="block4_pool", input_size=224, resize="pad", input_resize="cv2_area",
                 preprocess="tf", dtype="mixed_float16", store="pooled", views=2)
  keys = {cache_key.cache_key(_fields(**{name: value})) for name, value in changes.items()}
  assert len(keys) == len(changes) and key not in keys
  # The seed matters only for random weights (or views); it then replaces the weights hash.
  assert cache_key.cache_key(_fields(seed=1)) == key
  random0 = cache_key.cache_key(_fields(weights_kind="none", weights_sha256=None, seed=0))
  assert random0 != cache_key.cache_key(_fields(weights_kind="none", weights_sha256=None, seed=1))
  assert cache_key.dataset_dir_name("vgg16", "none", random0) == f"vgg16-none-{random0[:8]}"
  with pytest.raises(ValueError, match="differ"):
    cache_key.cache_key({**_fields(), "typo": 1})


def test_ibug_flip_permutation_and_views_are_deterministic():
  perm = views.IBUG_68_FLIP
  assert sorted(perm) == list(range(68))
  assert all(perm[perm[i]] == i for i in range(68))  # an involution
  assert perm[36] == 45 and perm[48] == 54 and perm[30] == 30 and perm[0] == 16
  targets = np.random.default_rng(0).uniform(0.2, 0.8, (68, 2)).astype(np.float32)
  mirrored = views.augment_targets(targets, "id", 1, seed=0)
  np.testing.assert_allclose(mirrored[45], [1 - targets[36, 0], targets[36, 1]], rtol=1e-6)
  np.testing.assert_allclose(views.augment_targets(mirrored, "id", 1, 0), targets, rtol=1e-6)
  # Other point counts: no known permutation, x mirrored only.
  five = views.augment_targets(targets[:5], "id", 1, seed=0)
  np.testing.assert_allclose(five[:, 0], 1 - targets[:5, 0], rtol=1e-6)
  image = np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
  np.testing.assert_array_equal(views.augment_image(image, "id", 1, 0), image[:, ::-1])
  crop = views.augment_image(image, "id", 2, 0)
  assert crop.shape == image.shape
  np.testing.assert_array_equal(crop, views.augment_image(image, "id", 2, 0))
  assert views.view_params("id", 2, 0) != views.view_params("id", 2, 1)
  # A point at the crop's corner maps to (0, 0).
  _, x0, y0, _ = views.view_params("id", 2, 0)
  np.testing.assert_allclose(views.augment_targets([[x0, y0]], "id", 2, 0), [[0, 0]], atol=1e-6)


def test_feature_record_stores_raw_float16_and_float32_bytes():
  record = records.ImageRecord("abc", "train", 1, np.zeros((SIZE, SIZE, 3), np.uint8), label=1)
  feature_map = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
  def schema(store):
    return schema_lib.feature_schema(class_names=("a", "b"), num_keypoints=0,
                                     map_shape=(2, 2, 3), pooled_dim=3, store=store)

  example = tf.train.Example.FromString(records.encode_feature_record(
      schema("both"), record, feature_map, feature_map.mean(axis=(0, 1)))).features.feature
  assert example["view"].int64_list.value == [1] and example["label"].int64_list.value == [1]
  stored = np.frombuffer(example["feature_map"].bytes_list.value[0], np.float16).reshape(2, 2, 3)
  np.testing.assert_array_equal(stored, feature_map)
  assert np.frombuffer(example["pooled"].bytes_list.value[0], np.float32).shape == (3,)
  pooled_only = tf.train.Example.FromString(records.encode_feature_record(
      schema("pooled"), record, feature_map, feature_map[0, 0])).features.feature
  assert "feature_map" not in pooled_only
  with pytest.raises(KeyError, match="'view'"):
    schema_lib.image_schema(image_size=2, image_format="png", class_names=None,
                            num_keypoints=0).encode({"view": 1})


def _batch_health(maps: np.ndarray, forward_seconds: float = 0.0) -> dict[str, float]:
  """Health sums of stored maps the way extraction takes them (inside the compiled forward)."""
  sums = health.per_image_sums(tf.constant(maps)).numpy()
  return health.health_from_sums(sums, int(np.prod(maps.shape[1:])), forward_seconds)


def test_health_flags_dead_and_overflowing_features():
  good = health.summarize_health(_batch_health(np.random.default_rng(0).normal(
      size=(4, 2, 2, 8)).astype(np.float16)))
  assert good["ok"] and good["nan_count"] == 0 and abs(good["mean"]) < 0.5
  dead = health.summarize_health(_batch_health(np.zeros((4, 2, 2, 8), np.float16)))
  assert not dead["ok"] and dead["zero_fraction"] == 1.0
  with np.errstate(over="ignore"):  # 1e6 overflows float16 storage: that is the point
    broken = (np.ones((2, 1, 1, 4), np.float32) * 1e6).astype(np.float16)
  acc = health.merge_health(_batch_health(broken), health.empty_health())
  assert health.summarize_health(acc)["inf_count"] == 8


@pytest.mark.parametrize("mode, function", [
    ("caffe", keras.applications.vgg16.preprocess_input),
    ("tf", keras.applications.mobilenet_v2.preprocess_input)])
def test_preprocess_layers_match_keras(mode, function):
  images = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
  x = images
  for layer in backbones.preprocess_layers(mode):
    x = layer(x)
  np.testing.assert_allclose(np.asarray(x), function(images.copy()), atol=1e-4)


def test_bad_flags_are_one_line_errors(capsys, tiny_image_dataset, tmp_path):
  for args, needle in [(["--store", "bogus"], "'bogus'"), (["--backbones", "vgg17"], "'vgg17'"),
                       (["--batch-size", "0"], "'0'"), (["--weights", "nope.h5"], "'nope.h5'")]:
    code = headstart.main(["extract", "--images", str(tiny_image_dataset), "--out",
                           str(tmp_path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], (args, err)


def test_features_package_does_io_through_gfile():
  for path in (REPO_ROOT / "features").glob("*.py"):
    text = path.read_text()
    assert not re.search(r"(?<![\w.])open\(|os\.path", text), path


# ---------------------------------------------------------------------------------------------
# Backbones


@pytest.mark.parametrize("name, size, shape", [
    ("vgg16", SIZE, (1, 1, 512)), ("vgg19", SIZE, (1, 1, 512)), ("resnet50", SIZE, (1, 1, 2048)),
    ("inception_v3", 75, (1, 1, 2048)), ("mobilenet", SIZE, (1, 1, 1024)),
    ("mobilenet_v2", SIZE, (1, 1, 1280)), ("efficientnet_b0", SIZE, (1, 1, 1280))])
def test_every_registered_backbone_builds_its_last_conv_block(name, size, shape):
  model = backbones.build_extractor(name, input_size=size)
  assert tuple(model.output.shape[1:]) == shape
  assert model.input.dtype == "float32" and tuple(model.input.shape[1:]) == (size, size, 3)


def test_vgg16_at_300_gives_9x9x512_and_layer_picks_an_intermediate_one():
  base = backbones.build_base("vgg16", 300)
  assert tuple(base.output.shape[1:]) == (9, 9, 512)
  model = backbones.build_extractor("vgg16", input_size=64, layer="block4_pool")
  assert tuple(model.output.shape[1:]) == (4, 4, 512)
  with pytest.raises(ValueError, match="'no_such_layer'"):
    backbones.build_extractor("vgg16", input_size=64, layer="no_such_layer")


def test_compiled_forward_with_xla_and_mixed_precision_on_cpu():
  images = tf.constant(np.random.default_rng(0).integers(0, 255, (4, SIZE, SIZE, 3), np.uint8))
  reference = None
  for precision, jit in [("float32", False), ("float32", True), ("mixed_bfloat16", True),
                         ("mixed_float16", False)]:
    model = backbones.build_extractor("vgg16", input_size=SIZE, seed=0, precision=precision)
    maps, pooled, _ = forward.compile_forward(model, SIZE, jit_compile=jit)(images)
    assert maps.dtype == tf.float16 and pooled.dtype == tf.float32 and maps.shape == (4, 1, 1, 512)
    if reference is None:
      reference = pooled.numpy()
    error = np.linalg.norm(pooled.numpy() - reference) / np.linalg.norm(reference)
    assert error < 0.05, (precision, jit, error)
  assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_savedmodel_directory_works_as_a_backbone(tmp_path):
  inputs = keras.Input((SIZE, SIZE, 3))
  scaled = keras.layers.Rescaling(1 / 255)(inputs)
  outputs = keras.layers.Conv2D(4, 3, strides=4, name="conv")(scaled)
  reference = keras.Model(inputs, outputs)
  reference.export(str(tmp_path / "saved"), verbose=False)
  model = backbones.build_extractor("saved", input_size=SIZE, model_path=str(tmp_path / "saved"))
  images = np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 3), np.uint8)
  maps, pooled, _ = forward.compile_forward(model, SIZE)(images)
  assert maps.shape == (2, 8, 8, 4)
  np.testing.assert_allclose(pooled.numpy(), np.asarray(reference(images.astype(np.float32)))
                             .mean(axis=(1, 2)), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The real job end to end


def test_extract_writes_one_tfds_dataset_per_backbone(extracted, tiny_image_dataset):
  found = _datasets(extracted)
  assert set(found) == {"vgg16", "mobilenet_v2"}
  image_manifest = datasets.read_manifest(str(tiny_image_dataset))
  image_counts = {s: v["num_examples"] for s, v in image_manifest["splits"].items()}
  for name, path in found.items():
    manifest = datasets.read_manifest(str(path))
    assert path.name == f"{name}-none-{manifest['cache_key'][:8]}"
    assert manifest["kind"] == "features" and manifest["weights_kind"] == "none"
    assert manifest["cache_key_fields"]["seed"] == 0 and manifest["input_size"] == SIZE
    assert (path / manifest["backbone_weights_file"]).exists()
    # Views only in train: 2 augmented copies per train image.
    assert manifest["splits"]["train"]["num_examples"] == 3 * image_counts["train"]
    for split in ("validation", "test"):
      if split in image_counts:
        assert manifest["splits"][split]["num_examples"] == image_counts[split]
        assert {int(r["view"]) for r in _load(path, split)} == {0}
    train = _load(path)
    assert {int(r["view"]) for r in train} == {0, 1, 2}
    assert train[0]["feature_map"].shape == tuple(manifest["feature_map_shape"])
    assert train[0]["feature_map"].dtype == np.float16 and train[0]["pooled"].dtype == np.float32
    assert manifest["health"]["ok"] and manifest["images_per_second"] > 0
  assert datasets.read_manifest(str(found["vgg16"]))["feature_map_shape"] == [1, 1, 512]


def test_saved_backbone_reproduces_the_stored_features(extracted, tiny_image_dataset):
  path = _datasets(extracted)["vgg16"]
  manifest = datasets.read_manifest(str(path))
  model = backbones.load_backbone_for_features(str(path), manifest)
  image_manifest = datasets.read_manifest(str(tiny_image_dataset))
  shard = datasets.shard_paths(str(tiny_image_dataset), image_manifest, "test")[0]
  image_schema = schema_lib.from_manifest(image_manifest)
  parsed = [records.parse_image_example(r.numpy(), image_schema)
            for r in tf.data.TFRecordDataset(shard)]
  stored = {r["id"].decode(): r["pooled"] for r in _load(path, "test")}
  from contracts import pixels
  decoded = np.stack([records.decode_stored(p["image"]) for p in parsed])
  images = pixels.to_input(decoded, SIZE).numpy()   # the resize extraction ran in its forward
  pooled = np.asarray(model(images, training=False)).mean(axis=(1, 2))
  for p, vector in zip(parsed, pooled):
    np.testing.assert_allclose(stored[p["id"]], vector, rtol=1e-3, atol=1e-4)


def test_rerun_is_a_cache_hit_that_does_no_work(extracted, tiny_image_dataset, capsys):
  before = {p: p.stat().st_mtime_ns for p in extracted.rglob("*") if p.is_file()
            and p.name != "index.json"}
  result = extract.run(["--images", str(tiny_image_dataset), "--out", str(extracted),
                        "--backbones", "vgg16,mobilenet_v2", "--views", "2", *BASE_ARGS])
  out = capsys.readouterr().out
  assert result is None and out.count("cache hit: ") == 2
  assert before == {p: p.stat().st_mtime_ns for p in before}


def test_changes_force_and_interruptions_recompute_only_what_is_missing(
    extracted, tiny_image_dataset, tmp_path, capsys):
  out = tmp_path / "features"
  args = ["--images", str(tiny_image_dataset), "--out", str(out), *BASE_ARGS]
  extract.run([*args, "--backbones", "mobilenet_v2,vgg16", "--store", "pooled"])
  first = _datasets(out)
  assert first["mobilenet_v2"].name not in {p.name for p in extracted.iterdir()}  # store differs
  # Interrupted job: shards without a manifest are not a dataset; only that one is recomputed.
  (first["vgg16"] / "manifest.json").unlink()
  (first["vgg16"] / "features-train.tfrecord-00009-of-00010").write_bytes(b"stale")
  capsys.readouterr()
  extract.run([*args, "--backbones", "mobilenet_v2,vgg16", "--store", "pooled"])
  log = capsys.readouterr().out
  assert f"cache hit: {first['mobilenet_v2']}" in log and "extracting vgg16" in log
  assert not (first["vgg16"] / "features-train.tfrecord-00009-of-00010").exists()
  assert "feature_map" not in _load(first["vgg16"])[0]
  # A different layer is a different dataset; --force recomputes the same key in place.
  extract.run([*args, "--backbones", "vgg16", "--store", "pooled", "--layer", "block3_pool",
               "--force"])
  index = json.loads((out / "index.json").read_text())["datasets"]
  assert len({entry["dir"] for entry in index}) == 3
  layered = [e for e in index if e["dir"] not in {p.name for p in first.values()}][0]
  assert datasets.read_manifest(str(out / layered["dir"]))["pooled_dim"] == 256


def test_custom_keras_backbone_under_multi_processing(tiny_image_dataset, tiny_keras_model,
                                                      tmp_path):
  out = tmp_path / "features"
  extract.run(["--images", str(tiny_image_dataset), "--out", str(out), "--backbones",
               str(tiny_keras_model), "--input-size", str(SIZE),
               "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
  (path,) = _datasets(out).values()
  manifest = datasets.read_manifest(str(path))
  assert path.name.startswith("tiny_net-file-") and manifest["weights_source"] == "model"
  assert manifest["feature_map_shape"] == [8, 8, 8] and manifest["preprocess"] == "none"
  assert sum(v["num_examples"] for v in manifest["splits"].values()) == 24
  # By default each SDK process builds its own copy (--share-models process).
  assert manifest["model_sharing"] == "process"
  assert manifest["model_copies"] == len(manifest["workers"]) == 2


def _tampered_copy(source: pathlib.Path, target: pathlib.Path, extra: list[bytes]) -> pathlib.Path:
  """A copy of an image dataset whose first train shard gets `extra` records (manifest updated)."""
  shutil.copytree(source, target)
  manifest = json.loads((target / "manifest.json").read_text())
  entry = manifest["splits"]["train"]["shards"][0]
  path = target / entry["file"]
  kept = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
  with tf.io.TFRecordWriter(str(path)) as writer:
    for record in kept + extra:
      writer.write(record)
  entry.update(num_examples=len(kept) + len(extra), sha256=datasets.file_sha256(str(path)))
  (target / "manifest.json").write_text(json.dumps(manifest))
  return target


def test_unusable_image_records_are_dead_lettered_not_raised(
    tiny_image_dataset, tiny_keras_model, tmp_path):
  small = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
  schema = schema_lib.image_schema(image_size=SIZE, image_format="png", class_names=("a", "b"),
                                   num_keypoints=0)
  bad = [schema.encode({"id": "not-an-image", "image": b"GIF89a nonsense", "label": 0}),
         schema.encode({"id": "wrong-size", "image": small, "label": 1}),
         b"\x00 not an Example at all"]
  images = _tampered_copy(tiny_image_dataset, tmp_path / "images", bad)
  args = ["--images", str(images), "--backbones", str(tiny_keras_model), "--input-size", str(SIZE)]
  # Above --max-error-fraction nothing is published, and the error says where to look.
  with pytest.raises(ValueError, match="errors.jsonl"):
    extract.run([*args, "--out", str(tmp_path / "strict"), "--max-error-fraction", "0.01"])
  assert not list((tmp_path / "strict").glob("*/manifest.json"))
  extract.run([*args, "--out", str(tmp_path / "features")])
  (path,) = _datasets(tmp_path / "features").values()
  counts = datasets.read_manifest(str(path))["counts"]
  assert counts["input_records"] == 27 and counts["written"] == 24 and counts["balanced"]
  assert counts["by_reason"] == {"undecodable": 1, "schema_mismatch": 2}
  errors = [json.loads(line) for line in (path / "errors.jsonl").read_text().splitlines()]
  assert {e["row"]["id"] for e in errors} == {"not-an-image", "wrong-size", None}
  assert all(e["stage"] == "extract" and e["message"] for e in errors)


def test_damaged_image_shards_fail_loudly_naming_the_file(tiny_image_dataset, tiny_keras_model,
                                                          tmp_path):
  images = _tampered_copy(tiny_image_dataset, tmp_path / "images", [])
  manifest = datasets.read_manifest(str(images))
  shard = images / manifest["splits"]["train"]["shards"][0]["file"]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF  # a flipped byte mid-file: the record's CRC no longer matches
  shard.write_bytes(bytes(data))
  args = ["--images", str(images), "--backbones", str(tiny_keras_model), "--input-size",
          str(SIZE), "--out", str(tmp_path / "features")]
  with pytest.raises(ValueError, match=re.escape(shard.name) + ".*corrupt"):
    extract.run(args)
  # Cut at a record boundary: CRCs pass, the count from the manifest catches it.
  records_kept = [r.numpy() for r in tf.data.TFRecordDataset(
      str(tiny_image_dataset / shard.name))][:-1]
  with tf.io.TFRecordWriter(str(shard)) as writer:
    for record in records_kept:
      writer.write(record)
  with pytest.raises(ValueError, match=re.escape(shard.name) + ".*manifest says"):
    extract.run(args)


def test_keypoint_targets_follow_the_augmented_pixels(tmp_path, tiny_keras_model):
  from pipeline import run as ingest
  folder = tmp_path / "src"
  (folder / "img").mkdir(parents=True)
  rows = ["image_url,a_x,a_y,b_x,b_y"]
  for i in range(6):
    cv2.imwrite(str(folder / "img" / f"{i}.png"), np.full((40, 40, 3), 30 * i, np.uint8))
    rows.append(f"img/{i}.png,{4 + i},{10},{30},{20 + i}")
  (folder / "points.csv").write_text("\n".join(rows) + "\n")
  images = tmp_path / "images"
  ingest.run(["--source", str(folder / "points.csv"), "--out", str(images), "--image-size", "40",
              "--target-columns", "all", "--splits", "train=100"])
  extract.run(["--images", str(images), "--out", str(tmp_path / "features"), "--backbones",
               str(tiny_keras_model), "--input-size", str(SIZE), "--views", "1"])
  (path,) = _datasets(tmp_path / "features").values()
  by_view: dict[int, dict[str, np.ndarray]] = {}
  for record in _load(path):
    by_view.setdefault(int(record["view"]), {})[record["id"].decode()] = record["targets"]
  assert len(by_view[0]) == len(by_view[1]) == 6
  for record_id, targets in by_view[0].items():
    assert targets.shape == (2, 2)
    # Two points have no known left/right permutation: x mirrored, order kept.
    np.testing.assert_allclose(by_view[1][record_id][:, 0], 1 - targets[:, 0], atol=1e-6)
    np.testing.assert_allclose(by_view[1][record_id][:, 1], targets[:, 1], atol=1e-6)


def test_health_sums_in_the_compiled_forward_equal_the_numpy_reference():
  """The in-graph per-image sums give the same health as NumPy over the whole stored batch."""
  with np.errstate(over="ignore"):
    maps = (np.random.default_rng(1).normal(size=(3, 4, 4, 16)) * 3).astype(np.float16)
    maps[0, 0, 0, :4] = [np.nan, np.inf, -np.inf, 0.0]
    maps[1] = 0
  sums = health.per_image_sums(tf.constant(maps)).numpy()
  assert sums.shape == (3, len(health.PER_IMAGE_SUMS))
  got = health.health_from_sums(sums, 4 * 4 * 16, 0.5)
  values = maps.astype(np.float32)
  finite = values[np.isfinite(values)].astype(np.float64)
  want = {"values": values.size, "nan": np.isnan(values).sum(), "inf": np.isinf(values).sum(),
          "zeros": (values == 0).sum(), "finite": finite.size, "sum": finite.sum(),
          "sum_squares": np.square(finite).sum(), "examples": 3, "forward_seconds": 0.5}
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


def test_extract_writes_the_statistics_heads_need(extracted, tiny_image_dataset):
  """Issue 14.2: counts, class histogram and pooled mean/variance per split, from the same pass
  (original images only), so heads make no pass over the data before fit."""
  image_manifest = datasets.read_manifest(str(tiny_image_dataset))
  for path in _datasets(extracted).values():
    stats = datasets.read_manifest(str(path))["statistics"]
    for split, entry in image_manifest["splits"].items():
      block = stats["splits"][split]
      assert block["examples"] == entry["num_examples"]
      records = [r for r in _load(path, split) if int(r["view"]) == 0]
      labels = np.bincount([int(r["label"]) for r in records], minlength=2).tolist()
      assert block["class_counts"] == labels
      pooled = np.stack([r["pooled"] for r in records]).astype(np.float64)
      np.testing.assert_allclose(block["pooled_mean"], pooled.mean(axis=0), rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_allclose(block["pooled_variance"], pooled.var(axis=0), rtol=1e-4,
                                 atol=1e-6)
