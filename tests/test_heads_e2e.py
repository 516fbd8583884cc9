"""Stage 3 end to end on real stage-1/2 output: ingest -> extract -> train -> export -> predict.

    .venv/bin/pytest tests/test_heads_e2e.py -q      # ~1.5 min on 2 cores

One session-scoped fixture ingests 40 generated images at 64 px and extracts features with a
tiny user backbone (`.keras` file, two convolutions: a 8x8x16 map), through the real entry
points in process. (Random-init MobileNets give all-zero float16 maps at this size, so they would
test nothing; `../shared/checks/heads.sh` covers a registered backbone.)
"""
from __future__ import annotations

import csv
import json
import pathlib

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from benchmarks import payoff, search_cost
from heads import config as config_lib
from heads import finetune, reader, run, training
from headstart import predict

IMAGE_SIZE = 64
TINY_HEAD = config_lib.to_dict(config_lib.tiny())["head"]


def _write_images(folder: pathlib.Path, count: int) -> pathlib.Path:
  """Class 'disc' is a red disc, class 'square' a blue square, on noise; sizes vary."""
  (folder / "img").mkdir(parents=True)
  rng = np.random.default_rng(0)
  rows = []
  for index in range(count):
    label = ("disc", "square")[index % 2]
    height, width = 70 + index % 9, 80 + (index * 7) % 13
    image = rng.integers(0, 70, (height, width, 3), dtype=np.uint8)
    centre, radius = (width // 2, height // 2), height // 3
    if label == "disc":
      cv2.circle(image, centre, radius, (40, 40, 220), -1)
    else:
      cv2.rectangle(image, (centre[0] - radius, centre[1] - radius),
                    (centre[0] + radius, centre[1] + radius), (220, 60, 30), -1)
    name = f"img/{index:03d}{'.jpg' if index % 2 else '.png'}"
    cv2.imwrite(str(folder / name), image)
    rows.append((name, label))
  manifest = folder / "manifest.csv"
  with open(manifest, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image_url", "label"])
    writer.writerows(rows)
  return manifest


def _tiny_backbone(input_size: int) -> keras.Model:
  """A user backbone: two strided convolutions and a pool (a 8x8x16 map at 64 px)."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((input_size, input_size, 3))
  x = keras.layers.Rescaling(1 / 255)(inputs)
  x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
  x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
  x = keras.layers.MaxPooling2D(2)(x)
  return keras.Model(inputs, x)


@pytest.fixture(scope="session")
def stages(tmp_path_factory):
  """(source manifest, image dataset, feature dataset) built by the real stage 1 and 2 jobs."""
  from features import run as extract
  from pipeline import run as ingest

  root = tmp_path_factory.mktemp("heads_e2e")
  manifest = _write_images(root / "src", 40)
  images = root / "images"
  ingest.run(["--source", str(manifest), "--out", str(images), "--image-size", str(IMAGE_SIZE),
              "--splits", "train=60,val=20,test=20"])
  backbone = root / "tiny_backbone.keras"
  _tiny_backbone(IMAGE_SIZE).save(backbone)
  extract.run(["--images", str(images), "--out", str(root / "features"),
               "--backbones", str(backbone)])
  index = json.loads((root / "features" / "index.json").read_text())
  return manifest, images, root / "features" / index["datasets"][0]["dir"]


@pytest.fixture(scope="session")
def conv_run(stages, tmp_path_factory):
  _, _, features = stages
  config = tmp_path_factory.mktemp("cfg") / "tiny.json"
  config.write_text(json.dumps({"head": TINY_HEAD, "train": {"batch_size": 8}}))
  out = tmp_path_factory.mktemp("runs") / "conv"
  assert run.train_main(["--features", str(features), "--head", "conv", "--out", str(out),
                         "--epochs", "3", "--config", str(config), "--quiet"]) == 0
  return out


def test_train_writes_the_run_contract(conv_run, stages):
  metrics = json.loads((conv_run / "metrics.json").read_text())
  for key in ("task", "head", "backbone", "weights_kind", "cache_key", "params", "train_seconds",
              "examples_per_second", "validation", "test"):
    assert key in metrics, key
  assert metrics["backbone"] == "tiny_backbone" and metrics["weights_kind"] == "file"
  assert metrics["test"]["accuracy"] is not None
  assert len(metrics["test"]["confusion_matrix"]) == 2
  assert (conv_run / "model.keras").exists() and (conv_run / "head.keras").exists()
  history = pd.read_csv(conv_run / "history.csv")
  assert list(history["epoch"]) == [0, 1, 2]


def _assert_reproduces_test_predictions(run_dir: pathlib.Path, manifest: pathlib.Path,
                                        out: pathlib.Path) -> None:
  # The ingest manifest as --images: same ids as the dataset, so rows join with the test split.
  summary = predict.predict_images(str(run_dir), str(manifest), str(out), batch_size=7)
  assert summary == {"rows": 40, "predicted": 40, "errors": 0, "out": str(out)}
  predicted = pd.read_csv(out).set_index("id")
  expected = pd.read_csv(run_dir / "predictions_test.csv").set_index("id")
  assert len(expected) > 0 and set(expected.index) <= set(predicted.index)
  joined = expected.merge(predicted, left_index=True, right_index=True, suffixes=("", "_new"))
  assert (joined["label"] == joined["label_new"]).mean() >= 0.99
  for column in ("prob_disc", "prob_square"):
    assert (joined[column] - joined[f"{column}_new"]).abs().max() <= 0.02


def test_exported_model_reproduces_test_predictions(conv_run, stages, tmp_path):
  manifest, _, _ = stages
  _assert_reproduces_test_predictions(conv_run, manifest, tmp_path / "pred.csv")


def test_export_resizes_like_extraction_when_input_size_differs(stages, tmp_path):
  """Features extracted at 48 px from 64 px images: the model resizes with extraction's layer."""
  from features import run as extract

  manifest, images, _ = stages
  backbone = tmp_path / "tiny48.keras"
  _tiny_backbone(48).save(backbone)
  extract.run(["--images", str(images), "--out", str(tmp_path / "features"),
               "--backbones", str(backbone), "--input-size", "48"])
  index = json.loads((tmp_path / "features" / "index.json").read_text())
  features = tmp_path / "features" / index["datasets"][0]["dir"]
  run_dir = tmp_path / "run"
  training.train(str(features), "linear", str(run_dir),
                 config_lib.override(config_lib.tiny(), {"train": {"epochs": 2}}), verbose=0)
  _assert_reproduces_test_predictions(run_dir, manifest, tmp_path / "pred.csv")
  model = keras.models.load_model(run_dir / "model.keras")
  assert model.input_shape == (None, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert model.get_layer("stored_to_input_area").output.shape[1] == 48


def test_predict_on_a_folder_and_plain_keras_load(conv_run, stages, tmp_path):
  manifest, _, _ = stages
  (manifest.parent / "img" / "broken.jpg").write_bytes(b"not an image")
  try:
    assert predict.main(["--model", str(conv_run), "--images", str(manifest.parent / "img"),
                             "--out", str(tmp_path / "p.csv")]) == 0
  finally:
    (manifest.parent / "img" / "broken.jpg").unlink()
  rows = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
  assert len(rows) == 41
  assert set(rows.columns) >= {"id", "source", "error", "label", "prob_disc", "prob_square"}
  broken = rows[rows["source"] == "broken.jpg"].iloc[0]
  assert broken["error"] and broken["label"] == ""
  model = keras.models.load_model(conv_run / "model.keras")
  assert model.input_shape == (None, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert model.predict(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32),
                       verbose=0).shape == (2, 1)


@pytest.mark.parametrize("head", ["linear", "gap_dense"])
def test_pooled_and_gap_heads_export_too(head, stages, tmp_path):
  _, _, features = stages
  result = training.train(str(features), head, str(tmp_path / head),
                          config_lib.override(config_lib.tiny(), {"train": {"epochs": 1}}),
                          verbose=0)
  assert result["exported"] == "model.keras"
  model = keras.models.load_model(tmp_path / head / "model.keras")
  assert model.output_shape == (None, 1)


def test_scratch_head_trains_on_the_image_dataset(stages, tmp_path):
  _, images, features = stages
  # --features may name the feature dataset: scratch follows it to its image dataset.
  result = training.train(str(features), "scratch", str(tmp_path / "scratch"),
                          config_lib.override(config_lib.tiny(), {"train": {"epochs": 1}}),
                          verbose=0)
  assert result["backbone"] == "none (from scratch)"
  assert pathlib.Path(result["features"]) == images
  assert (tmp_path / "scratch" / "model.keras").exists()


def test_finetune_unfreezes_the_last_layers_and_predicts(conv_run, stages, tmp_path):
  """The starting loss is recorded and the default rate keeps the first epoch near it."""
  manifest, images, _ = stages
  out = tmp_path / "ft"
  result = finetune.finetune(str(conv_run), str(images), unfreeze=3, out_dir=str(out), epochs=1,
                             verbose=0)
  assert 0 < len(result["trainable_layers"]) <= 3
  head_params = json.loads((conv_run / "metrics.json").read_text())["params"]
  assert result["trainable_params"] > head_params       # backbone weights train too now
  assert "accuracy" in result["test"]
  start = result["start"]
  assert set(start) == {"train", "validation"} and start["train"]["loss"] > 0
  assert result["learning_rate"] == 1e-5 and result["warmup_epochs"] == 1
  first = float(next(csv.DictReader((out / "history.csv").open()))["loss"])
  assert first <= finetune.START_LOSS_TOLERANCE * start["train"]["loss"], (first, start)
  assert not any("first epoch" in note for note in result["notes"])
  summary = predict.predict_images(str(out), str(manifest), str(tmp_path / "p.csv"))
  assert summary["predicted"] == 40
  with pytest.raises(ValueError, match="--unfreeze"):
    finetune.finetune(str(conv_run), str(images), unfreeze=0, out_dir=str(tmp_path / "x"))


def test_finetune_that_undoes_its_start_says_so_and_keeps_the_start(conv_run, stages, tmp_path):
  _, images, _ = stages
  wild = finetune.finetune(str(conv_run), str(images), unfreeze=3, out_dir=str(tmp_path / "b"),
                           epochs=1, learning_rate=1.0, warmup_epochs=0, verbose=0)
  assert any("first epoch's training loss" in note for note in wild["notes"]), wild["notes"]
  # The start is the checkpoint to beat: the saved model is the start, unless an epoch beat it
  # on validation (on this small validation split, a wild epoch can, by luck).
  history = list(csv.DictReader((tmp_path / "b" / "history.csv").open()))
  start = wild["start"]["validation"]["loss"]
  best = min(float(row["val_loss"]) for row in history)
  if not best < start:
    assert any("starting weights are kept" in note for note in wild["notes"]), wild["notes"]
  assert wild["validation"]["loss"] == pytest.approx(min(start, best), rel=1e-4)


def test_finetune_keeps_batch_normalization_in_inference_mode(tmp_path):
  """Unfrozen layers train; BatchNormalization statistics and scales do not move."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  backbone = keras.Model(inputs, keras.layers.Conv2D(4, 1, name="top")(x), name="backbone")
  images = keras.Input((8, 8, 3))
  head = keras.Sequential([keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)],
                          name="head")
  model = keras.Model(images, head(backbone(images, training=False)))
  trainable = finetune.unfreeze_last(finetune.find_backbone(model), 3)
  assert trainable == ["conv", "top"]
  before = [w.numpy().copy() for w in backbone.get_layer("bn").weights]
  kernel = backbone.get_layer("conv").kernel.numpy().copy()
  model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
  x = np.random.default_rng(0).normal(5, 3, (16, 8, 8, 3)).astype(np.float32)
  model.fit(x, np.ones((16, 1)), epochs=2, verbose=0)
  for old, new in zip(before, backbone.get_layer("bn").weights):
    np.testing.assert_array_equal(old, new.numpy())
  assert not np.allclose(backbone.get_layer("conv").kernel.numpy(), kernel)


@pytest.mark.slow
def test_search_cost_measures_the_search_against_one_head_and_separate_runs(stages):
  """Eight tiny runs (~20 s on 2 cores)."""
  _, _, features = stages
  result = search_cost.measure(str(features), "gap_dense", epochs=1, config=config_lib.tiny())
  assert result["points"] == 6
  assert result["search_seconds"] > 0 and result["separate_runs_seconds"] > 0
  assert result["search_over_one_head"] == pytest.approx(
      result["search_seconds"] / result["one_head_seconds"])


def test_payoff_compares_cached_and_end_to_end_rates(stages):
  _, _, features = stages
  result = payoff.measure(str(features), "gap_dense", epochs=2, batch_size=8,
                          config=config_lib.tiny())
  assert result["cached"]["examples"] == result["end_to_end"]["examples"] > 0
  assert result["ratio"] > 0


@pytest.fixture(scope="session")
def sample_faces(tmp_path_factory):
  """(source CSV, feature dataset) of the shipped synthetic faces through the real stages 1-2.

  Split 50/25/25 (26/12/10 faces), so validation has enough faces to choose on.
  """
  from features import run as extract
  from pipeline import run as ingest

  root = tmp_path_factory.mktemp("faces")
  source = pathlib.Path(__file__).resolve().parent.parent / "data" / "sample" / "keypoints.csv"
  ingest.run(["--source", str(source), "--out", str(root / "images"), "--image-size",
              str(IMAGE_SIZE), "--target-columns", "all", "--splits", "train=50,val=25,test=25"])
  _tiny_backbone(IMAGE_SIZE).save(root / "tiny.keras")
  extract.run(["--images", str(root / "images"), "--out", str(root / "features"),
               "--backbones", str(root / "tiny.keras")])
  index = json.loads((root / "features" / "index.json").read_text())
  return source, root / "features" / index["datasets"][0]["dir"]


def test_keypoint_head_on_the_sample_faces_reports_source_pixels(sample_faces, tmp_path):
  """Real keypoint ingest (the shipped synthetic faces): errors in stored and source pixels."""
  source, features = sample_faces
  result = training.train(str(features), "keypoints", str(tmp_path / "run"),
                          config_lib.override(config_lib.tiny(), {"train": {"epochs": 2}}),
                          verbose=0)
  test = result["test"]
  assert result["task"] == "keypoints"
  assert test["mae_px"] > 0 and test["mae_px_source"] > 0 and test["mae_px_mean_baseline"] > 0
  header = (tmp_path / "run" / "predictions_test.csv").read_text().splitlines()[0]
  assert header.startswith("id,x0,y0,x1,y1")
  summary = predict.predict_images(str(tmp_path / "run"), str(source), str(tmp_path / "p.csv"))
  assert summary["predicted"] == 48
  # The head started at a ridge fit and kept at least its validation error.
  start = result["ridge_start"]
  chosen = next(row for row in start["grid"] if row["strength"] == start["strength"])
  assert result["validation"]["loss"] <= -chosen["val_score"] * (1 + 1e-5)


def test_ridge_on_the_sample_faces_beats_the_mean_face_and_equals_numpy(sample_faces, tmp_path):
  """The ridge head's test predictions are the NumPy closed form's to 1e-4 (normalised
  coordinates), and its error is below the mean-face baseline's."""
  _, features = sample_faces
  spec = reader.load_spec(str(features))
  for head, kind in (("ridge", "map"), ("ridge_pooled", "pooled")):
    result = training.train(str(features), head, str(tmp_path / head), config_lib.tiny(),
                            verbose=0)
    data = {split: reader.load_arrays(reader.read_split(spec, split, input_kind=kind))
            for split in ("train", "test")}
    x = {split: arrays["x"].reshape(len(arrays["x"]), -1).astype(np.float64)
         for split, arrays in data.items()}
    mean_x, mean_y = x["train"].mean(axis=0), data["train"]["y"].mean(axis=0)
    centred = x["train"] - mean_x
    kernel = np.linalg.solve(centred.T @ centred + result["ridge"]["lambda"] * np.eye(len(mean_x)),
                             centred.T @ (data["train"]["y"] - mean_y))
    want = (x["test"] - mean_x) @ kernel + mean_y
    rows = list(csv.DictReader((tmp_path / head / "predictions_test.csv").open()))
    got = np.array([[float(value) for key, value in row.items() if key != "id"] for row in rows])
    np.testing.assert_allclose(got, want, atol=1e-4)
    if head == "ridge":
      assert result["test"]["mae_px"] < result["test"]["mae_px_mean_baseline"], result["test"]
  # Stored as a plain Dense layer, the ridge head exports and predicts like any other.
  source, _ = sample_faces
  summary = predict.predict_images(str(tmp_path / "ridge"), str(source), str(tmp_path / "p.csv"))
  assert summary["predicted"] == 48


def test_predict_reads_every_source_ingest_reads_and_rows_in_error_say_why(
    conv_run, stages, tmp_path, http_server):
  """URLs go through ingest's fetcher and address guard; unusable rows become error rows."""
  from pipeline import fetch
  manifest, _, _ = stages
  http_server.routes = {"/a.png": (200, {}, (manifest.parent / "img" / "000.png").read_bytes())}
  csv_path = manifest.parent / "mixed.csv"
  csv_path.write_text(f"image_url\nimg/000.png\n{http_server.url}/a.png\n"
                      "http://127.0.0.2:9/b.png\nimg/missing.png\n../../outside.png\n")
  try:
    summary = predict.predict_images(
        str(conv_run), str(csv_path), str(tmp_path / "p.csv"),
        fetch_config=fetch.FetchConfig(allowed_networks=("127.0.0.1/32",), retries=0))
  finally:
    csv_path.unlink()
  assert summary["predicted"] == 2 and summary["errors"] == 3
  rows = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("source")
  assert rows.loc["http://127.0.0.2:9/b.png", "error"] == "blocked_address"
  assert rows.loc["img/missing.png", "error"] == "not_found"
  assert len(rows) == 5 and (rows["error"] != "").sum() == 3
  assert rows.loc["img/000.png", "label"] in ("disc", "square")
  # The same bytes by URL and by path: the same prediction.
  assert rows.loc[f"{http_server.url}/a.png", "label"] == rows.loc["img/000.png", "label"]


@pytest.mark.parametrize("val_losses,kept", [(["0.9", "nan"], True), (["0.9", "0.4"], False)])
def test_warm_start_check_says_when_no_epoch_beat_the_start(tmp_path, val_losses, kept):
  history = tmp_path / "history.csv"
  history.write_text("epoch,loss,val_loss\n" + "".join(
      f"{epoch},1.0,{value}\n" for epoch, value in enumerate(val_losses)))
  notes = []
  check = finetune.WarmStartCheck({"train": {"loss": 0.5}, "validation": {"loss": 0.6}}, notes,
                                  str(history))
  check.on_epoch_end(0, {"loss": 1.0})   # 2x the start: said
  check.on_train_end()
  assert any("first epoch's training loss" in note for note in notes)
  assert any("starting weights are kept" in note for note in notes) == kept
