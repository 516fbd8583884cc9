"""Stage 3 on synthetic feature datasets: reader, head zoo, training, resume, cache-key refusal.

    .venv/bin/pytest tests/test_heads_unit.py -q      # ~1 min on 2 cores

Datasets are written here with `contracts` exactly as stage 2 lays them out (TFDS
shards, `features.json`, `manifest.json` last), with a few records per split and tiny maps.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from contracts import datasets, layout, runs
from contracts import schema as schema_lib
from heads import config as config_lib
from heads import caching, evaluation, fitting, metrics, reader, run, sweep, training, zoo

MAP_SHAPE = (3, 3, 4)


def write_feature_dataset(out: pathlib.Path, *, task: str = "binary",
                          counts: dict[str, int] | None = None, map_shape=MAP_SHAPE,
                          num_keypoints: int = 3, views_in_train: int = 0, cache_key: str = "k1",
                          seed: int = 0) -> pathlib.Path:
  """Writes a stage-2 style feature dataset whose maps carry the label (so heads can learn)."""
  counts = counts or {"train": 24, "validation": 8, "test": 8}
  rng = np.random.default_rng(seed)
  class_names = {"binary": ["cat", "dog"], "multiclass": ["a", "b", "c"],
                 "keypoints": []}[task]
  schema = schema_lib.feature_schema(
      class_names=class_names or None, num_keypoints=num_keypoints if task == "keypoints" else 0,
      map_shape=map_shape, pooled_dim=map_shape[-1])
  out.mkdir(parents=True, exist_ok=True)
  shards = []
  for split, count in counts.items():
    path = str(out / f"features-{split}.tfrecord-00000-of-00001")
    with tf.io.TFRecordWriter(path) as writer:
      for index in range(count):
        for view in range(1 + (views_in_train if split == "train" else 0)):
          fmap = rng.normal(0, 1, map_shape).astype(np.float32)
          record = {"id": f"{split}-{index}", "view": view}
          if task == "keypoints":
            targets = rng.uniform(0.2, 0.8, (num_keypoints, 2)).astype(np.float32)
            fmap[..., 0] += 3 * targets[0, 0]
            record["targets"] = targets
          else:
            label = index % len(class_names)
            fmap[..., label % map_shape[-1]] += 2.0
            record["label"] = label
          record["feature_map"] = fmap
          record["pooled"] = fmap.mean(axis=(0, 1))
          writer.write(schema.encode(record))
    shards.append(datasets.describe_shard(path, split))
  grouped = datasets.group_shards(shards, str(out))
  extra = {"kind": "features", "task": task, "class_names": class_names,
           "num_keypoints": num_keypoints if task == "keypoints" else None,
           "backbone": "tiny", "weights_kind": "none", "cache_key": cache_key,
           "feature_map_shape": list(map_shape), "pooled_dim": map_shape[-1], "store": "both",
           "input_size": 16, "image_size": 16, "image_format": "png",
           "fingerprint": "f" * 64, "views": views_in_train}
  datasets.finalize_dataset(str(out), "features", schema.tfds_features(), grouped, extra)
  return out


@pytest.fixture(scope="module")
def binary_dir(tmp_path_factory):
  return write_feature_dataset(tmp_path_factory.mktemp("binary"), views_in_train=1)


@pytest.fixture(scope="module")
def multiclass_dir(tmp_path_factory):
  return write_feature_dataset(tmp_path_factory.mktemp("multi"), task="multiclass")


@pytest.fixture(scope="module")
def keypoints_dir(tmp_path_factory):
  return write_feature_dataset(tmp_path_factory.mktemp("kp"), task="keypoints")


def tiny(**train):
  config = config_lib.tiny()
  return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


# ---------------------------------------------------------------------------------------------
# Reader


def test_parse_fn_eager_and_in_dataset_map_agree(binary_dir):
  spec = reader.load_spec(str(binary_dir))
  parse = spec.schema.batch_parser(("id", "feature_map", "pooled", "label", "view"))
  files = datasets.shard_paths(str(binary_dir), spec.manifest, "test")
  serialized = next(iter(tf.data.TFRecordDataset(files).batch(8)))
  eager = parse(serialized)
  mapped = next(iter(tf.data.TFRecordDataset(files).batch(8).map(
      parse, num_parallel_calls=tf.data.AUTOTUNE)))
  assert eager["feature_map"].dtype == tf.float32
  assert tuple(eager["feature_map"].shape) == (8, *MAP_SHAPE)
  assert tuple(eager["pooled"].shape) == (8, MAP_SHAPE[-1])
  for key in eager:
    np.testing.assert_array_equal(eager[key].numpy(), mapped[key].numpy())
  # The pooled vector is the float32 mean of the (pre-float16) map: close to the parsed map's.
  np.testing.assert_allclose(eager["pooled"].numpy(),
                             eager["feature_map"].numpy().mean(axis=(1, 2)), atol=1e-2)


def test_decode_image_eager_and_in_dataset_map_agree():
  import cv2

  image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
  encoded = cv2.imencode(".png", image)[1].tobytes()
  eager = reader.decode_image(tf.constant(encoded), 8)
  mapped = next(iter(tf.data.Dataset.from_tensors(encoded).map(
      lambda data: reader.decode_image(data, 8), num_parallel_calls=tf.data.AUTOTUNE)))
  assert eager.dtype == tf.uint8 and tuple(mapped.shape) == (8, 8, 3)
  np.testing.assert_array_equal(eager.numpy(), mapped.numpy())
  np.testing.assert_array_equal(eager.numpy()[..., ::-1], image.astype(np.float32))  # BGR file


def test_read_split_skips_views_unless_asked(binary_dir):
  spec = reader.load_spec(str(binary_dir))
  originals = list(reader.read_split(spec, "train", input_kind="pooled", with_id=True))
  with_views = list(reader.read_split(spec, "train", input_kind="pooled", views=True))
  assert len(originals) == 24 and len(with_views) == 48
  assert set(originals[0]) == {"x", "y", "id"}
  assert tuple(originals[0]["x"].shape) == (MAP_SHAPE[-1],)


def test_pooled_heads_do_not_parse_the_map(binary_dir, monkeypatch):
  spec = reader.load_spec(str(binary_dir))
  seen = []
  original = schema_lib.Schema.batch_parser
  monkeypatch.setattr(schema_lib.Schema, "batch_parser",
                      lambda self, keys, **kw: seen.append(keys) or original(self, keys, **kw))
  reader.read_split(spec, "train", input_kind="pooled")
  assert "feature_map" not in seen[0]


def test_missing_manifest_is_refused_in_one_sentence(tmp_path):
  with pytest.raises(layout.DatasetError, match="no manifest.json"):
    reader.load_spec(str(tmp_path))


def test_training_batches_shapes(binary_dir):
  spec = reader.load_spec(str(binary_dir))
  batches = reader.make_for_train(reader.read_split(spec, "train", input_kind="map"),
                                  batch_size=5, shuffle_buffer=100, seed=0)
  x, y = next(iter(batches))
  assert tuple(x.shape) == (5, *MAP_SHAPE) and tuple(y.shape) == (5,)


# ---------------------------------------------------------------------------------------------
# Head zoo


@pytest.mark.parametrize("head", ["linear", "mlp", "gap_dense", "conv", "conv2"])
@pytest.mark.parametrize("task", ["binary", "multiclass", "keypoints"])
def test_every_head_output_shape_and_loss(head, task, binary_dir, multiclass_dir, keypoints_dir):
  data_dir = {"binary": binary_dir, "multiclass": multiclass_dir, "keypoints": keypoints_dir}[task]
  spec = reader.load_spec(str(data_dir))
  model = zoo.build_head(head, spec, config_lib.tiny().head)
  training.compile_head(model, spec.task, keras.optimizers.Adam(1e-3))
  x = np.random.default_rng(0).normal(size=(4, *zoo.input_shape(head, spec))).astype(np.float32)
  out = model.predict(x, verbose=0)
  assert out.shape == (4, {"binary": 1, "multiclass": 3, "keypoints": 6}[task])
  y = (np.zeros((4, 6), np.float32) if task == "keypoints" else np.array([0, 1, 0, 1]))
  loss = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
  assert np.isfinite(loss) and loss > 0
  if task == "multiclass":
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_adam_steps_use_the_fused_kernel_and_match_keras_own(tmp_path):
  """compile_head's Adam applies TensorFlow's fused kernel, trains as Keras' Adam does (to
  float32 rounding) and is saved as a plain Adam."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int64)

  def mlp() -> keras.Model:
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu", kernel_initializer="glorot_uniform")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.weights])
    return model

  fused, plain = mlp(), mlp()
  plain.set_weights(fused.get_weights())
  training.compile_head(fused, "binary", keras.optimizers.Adam(1e-2))
  plain.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
  for model in (fused, plain):
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
  for ours, theirs in zip(fused.get_weights(), plain.get_weights()):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
  assert int(fused.optimizer.iterations.numpy()) == 12

  optimizer = fused.optimizer
  step = tf.function(lambda: optimizer.apply_gradients(
      [(tf.ones_like(v), v) for v in fused.trainable_variables]))
  ops = {op.type for op in step.get_concrete_function().graph.get_operations()}
  assert "ResourceApplyAdam" in ops
  fused_step = optimizer.update_step
  assert fitting.fuse_adam(optimizer).update_step is fused_step   # fused once, not wrapped again
  fused.save(tmp_path / "head.keras")
  assert type(keras.models.load_model(tmp_path / "head.keras").optimizer) is keras.optimizers.Adam
  # Other optimizers and amsgrad keep Keras' own step.
  for other in (keras.optimizers.SGD(1e-2), keras.optimizers.Adam(1e-2, amsgrad=True)):
    assert fitting.fuse_adam(other).update_step.__func__ is type(other).update_step


def test_scratch_head_reads_stored_images():
  spec = reader.DatasetSpec(
      data_dir="mem://images", kind="images", task="multiclass", class_names=("a", "b", "c"),
      num_keypoints=0, feature_map_shape=None, pooled_dim=None, image_size=16, cache_key="fp",
      backbone="none (from scratch)", weights_kind="none", splits=("train",), manifest={})
  model = zoo.build_head("scratch", spec, config_lib.tiny().head)
  training.compile_head(model, spec.task, keras.optimizers.Adam(1e-3))
  images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
  assert model.predict(images, verbose=0).shape == (2, 3)
  assert np.isfinite(model.evaluate(images, np.array([0, 2]), verbose=0, return_dict=True)["loss"])
  with pytest.raises(ValueError, match="feature map"):
    zoo.build_head("conv", spec)


def test_conv_head_skips_pooling_on_1x1_maps(tmp_path):
  spec = reader.load_spec(str(write_feature_dataset(
      tmp_path, map_shape=(1, 1, 4), counts={"train": 4})))
  for head in ("conv", "conv2"):
    model = zoo.build_head(head, spec, config_lib.tiny().head)
    assert not [layer for layer in model.layers if "pool" in layer.name]
    assert model.output_shape == (None, 1)


def test_keypoints_head_needs_keypoints_and_bad_head_is_refused(binary_dir, keypoints_dir):
  with pytest.raises(ValueError, match="keypoints dataset"):
    zoo.build_head("keypoints", reader.load_spec(str(binary_dir)))
  with pytest.raises(ValueError, match="'resnet'"):
    zoo.input_kind("resnet")
  mean = np.linspace(0.2, 0.7, 6)
  model = zoo.build_head("keypoints", reader.load_spec(str(keypoints_dir)),
                         config_lib.tiny().head, target_mean=mean)
  assert model.output_shape == (None, 6)
  start = model.predict(np.ones((2, *MAP_SHAPE), np.float32), verbose=0)
  np.testing.assert_allclose(start, np.stack([mean, mean]), atol=1e-6)   # starts at the mean
  assert zoo.loss_for("keypoints") == "mean_absolute_error"


# ---------------------------------------------------------------------------------------------
# Config


def test_config_file_overrides_defaults_and_refuses_typos(tmp_path):
  path = tmp_path / "c.json"
  path.write_text(json.dumps({"train": {"epochs": 3}, "head": {"dropout": 0.25}}))
  config = config_lib.load_file(str(path))
  assert config.train.epochs == 3 and config.head.dropout == 0.25
  assert config.train.batch_size == 64
  path.write_text(json.dumps({"train": {"epoch": 3}}))
  with pytest.raises(ValueError, match="'epoch'"):
    config_lib.load_file(str(path))
  with pytest.raises(ValueError, match="'adamw'"):
    config_lib.override(config_lib.Config(), {"train": {"optimizer": "adamw"}})
  py = tmp_path / "c.py"
  py.write_text("def get_config():\n  return {'head': {'dense_units': 7}}\n")
  assert config_lib.load_file(str(py)).head.dense_units == 7


# ---------------------------------------------------------------------------------------------
# Metrics


def test_classification_metrics():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
  result = metrics.classification(np.array([0, 1, 1, 1]), probs, ["a", "b"])
  assert result["accuracy"] == 0.75
  assert result["confusion_matrix"] == [[1, 0], [1, 2]]
  assert result["per_class"]["b"]["precision"] == 1.0
  assert result["per_class"]["b"]["recall"] == pytest.approx(2 / 3)


def test_keypoint_pixel_errors_in_stored_and_source_pixels():
  targets = np.array([[0.5, 0.5]])
  predicted = np.array([[0.6, 0.5]])
  result = metrics.keypoints(targets, predicted, image_size=100, height=np.array([200]),
                             width=np.array([400]), resize="stretch")
  assert result["mae_px"] == pytest.approx(5.0)          # (10 + 0) / 2 stored pixels
  assert result["mae_px_source"] == pytest.approx(20.0)  # x scaled by 4
  padded = metrics.keypoints(targets, predicted, image_size=100, height=np.array([200]),
                             width=np.array([400]), resize="pad")
  assert padded["mae_px_source"] == pytest.approx(20.0)  # long side 400 -> 100: x4 both axes


# ---------------------------------------------------------------------------------------------
# Training


def test_train_writes_history_metrics_and_predictions(binary_dir, tmp_path):
  out = tmp_path / "run"
  result = training.train(str(binary_dir), "gap_dense", str(out), tiny(epochs=4, learning_rate=1e-2,
                                                                         batch_size=4),
                          verbose=0)
  for name in ("config.json", "history.csv", "metrics.json", "head.keras",
               "predictions_test.csv", "checkpoints/best.weights.h5"):
    assert (out / name).exists(), name
  written = json.loads((out / "metrics.json").read_text())
  assert written["cache_key"] == "k1" and written["params"] > 0
  assert written["examples_per_second"] > 0 and written["num_train_examples"] == 24
  assert set(written["test"]) >= {"loss", "accuracy", "per_class", "confusion_matrix"}
  assert result["test"]["accuracy"] >= 0.75        # the label is written into the maps
  with open(out / "predictions_test.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 8 and set(rows[0]) == {"id", "label", "prob_cat", "prob_dog"}
  assert len((out / "history.csv").read_text().strip().splitlines()) == 5
  # Without a backbone loader for the synthetic "tiny" backbone, export is skipped and said so.
  assert any("model.keras" in note for note in written["notes"]) or (out / "model.keras").exists()


def test_evaluation_batches_do_not_change_a_runs_numbers(multiclass_dir, tmp_path, monkeypatch):
  """Validation and evaluation use bigger batches than training for feature inputs (fewer
  steps); the history and the metrics are those of evaluating in training-sized batches."""
  spec = reader.load_spec(str(multiclass_dir))
  assert fitting.eval_batch_size(spec, "pooled", 4) == fitting.MAX_EVAL_BATCH
  assert fitting.eval_batch_size(spec, "image", 4) == 4
  big_maps = dataclasses.replace(spec, feature_map_shape=(9, 9, 512))
  assert 64 < fitting.eval_batch_size(big_maps, "map", 64) < fitting.MAX_EVAL_BATCH
  config = tiny(epochs=3, batch_size=4, learning_rate=1e-2)
  runs_metrics, histories = [], []
  for name, batch_bytes in (("big", fitting.EVAL_BATCH_BYTES), ("train_sized", 0)):
    monkeypatch.setattr(fitting, "EVAL_BATCH_BYTES", batch_bytes)
    caching.release_shared()
    out = tmp_path / name
    runs_metrics.append(training.train(str(multiclass_dir), "linear", str(out), config,
                                       verbose=0, export_model=False))
    with open(out / "history.csv") as f:
      histories.append([float(row["val_loss"]) for row in csv.DictReader(f)])
  big, small = runs_metrics
  assert big["eval_batch_size"] == fitting.MAX_EVAL_BATCH and small["eval_batch_size"] == 4
  np.testing.assert_allclose(histories[0], histories[1], rtol=1e-5)
  for split in ("validation", "test"):
    assert big[split]["accuracy"] == small[split]["accuracy"]
    assert big[split]["loss"] == pytest.approx(small[split]["loss"], rel=1e-5)


def test_evaluation_reads_each_split_once(multiclass_dir, tmp_path, monkeypatch):
  """Ids, targets and outputs come from one pass: records read = validation + test records."""
  spec = reader.load_spec(str(multiclass_dir))
  model = zoo.build_head("mlp", spec, config_lib.tiny().head)
  read = tf.Variable(0, dtype=tf.int64)
  real = tf.data.TFRecordDataset

  def count(record):
    with tf.control_dependencies([read.assign_add(1)]):
      return tf.identity(record)

  monkeypatch.setattr(tf.data, "TFRecordDataset",
                      lambda *args, **kwargs: real(*args, **kwargs).map(count))
  result = evaluation.evaluate_and_write(model, spec, "pooled", runs.RunDir(str(tmp_path)),
                                         batch_size=5, settings={})
  assert int(read.numpy()) == 8 + 8
  assert result["validation"]["num_examples"] == 8 and result["test"]["num_examples"] == 8
  rows = list(csv.DictReader((tmp_path / "predictions_test.csv").open()))
  assert [row["id"] for row in rows] == [f"test-{index}" for index in range(8)]
  # The outputs are the model's own: the CSV's probabilities are what Keras predicts.
  x = reader.load_arrays(reader.read_split(spec, "test", input_kind="pooled"), ("x",))["x"]
  np.testing.assert_allclose([[float(row[f"prob_{name}"]) for name in spec.class_names]
                              for row in rows], model.predict(x, verbose=0), atol=1e-6)


def test_evaluating_many_models_prints_no_retracing_warning(multiclass_dir, tmp_path):
  """One forward function per model, traced once for every batch of both splits: TensorFlow's
  "N out of the last M calls ... triggered tf.function retracing" never fires in a grid.
  A fresh process, so the warning (printed at most twice per process) is not used up."""
  code = ("import keras, os\n"
          "from contracts import runs\n"
          "from heads import config, evaluation, reader, zoo\n"
          f"spec = reader.load_spec({str(multiclass_dir)!r})\n"
          "for index in range(6):\n"
          f"  run = runs.RunDir(os.path.join({str(tmp_path)!r}, str(index)))\n"
          "  os.makedirs(run.path)\n"
          "  model = zoo.build_head('mlp', spec, config.tiny().head)\n"
          "  evaluation.evaluate_and_write(model, spec, 'pooled', run, batch_size=5, "
          "settings={})\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True, cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert "retracing" not in done.stderr
  assert len(list(tmp_path.glob("*/predictions_test.csv"))) == 6


def test_train_with_only_a_train_split_says_what_it_skipped(tmp_path):
  data_dir = write_feature_dataset(tmp_path / "d", task="multiclass", counts={"train": 9})
  result = training.train(str(data_dir), "mlp", str(tmp_path / "run"), tiny(epochs=1),
                          verbose=0)
  assert "validation" not in result and "test" not in result
  assert any("no validation split" in note for note in result["notes"])
  assert any("no test split" in note for note in result["notes"])


class _Interrupt(keras.callbacks.Callback):
  def __init__(self, after_epoch: int):
    super().__init__()
    self.after_epoch = after_epoch

  def on_epoch_end(self, epoch, logs=None):
    if epoch == self.after_epoch:
      raise KeyboardInterrupt("simulated preemption")


def test_interrupted_run_resumes_from_its_last_epoch(multiclass_dir, tmp_path):
  out = tmp_path / "run"
  config = tiny(epochs=4, lr_decay=True)
  with pytest.raises(KeyboardInterrupt):
    # Interrupt in epoch 2's end after the backup of epoch 1: epochs 0 and 1 are done.
    training.train(str(multiclass_dir), "linear", str(out), config, verbose=0,
                   callbacks=[_Interrupt(after_epoch=2)])
  assert (out / "backup").exists()
  with pytest.raises(ValueError, match="unfinished 'linear' head"):
    training.train(str(multiclass_dir), "mlp", str(out), config, verbose=0)
  result = training.train(str(multiclass_dir), "linear", str(out), config, verbose=0)
  assert result["resumed"] is True
  assert result["epochs_this_session"] < 4
  assert result["epochs"] == 4
  epochs = [int(row["epoch"]) for row in csv.DictReader(open(out / "history.csv"))]
  assert epochs == [0, 1, 2, 3]
  assert not (out / "backup").exists()      # removed once training finishes


def test_keypoint_head_reports_pixel_error(keypoints_dir, tmp_path):
  result = training.train(str(keypoints_dir), "keypoints", str(tmp_path / "run"),
                          tiny(epochs=2), verbose=0)
  assert result["task"] == "keypoints"
  assert result["test"]["mae_px"] > 0 and result["test"]["rmse_px"] >= result["test"]["mae_px"]
  assert result["test"]["mae_px_mean_baseline"] > 0
  assert result["test"]["pixels_of"] == "stored image (16x16)"
  header = (tmp_path / "run" / "predictions_test.csv").read_text().splitlines()[0]
  assert header == "id,x0,y0,x1,y1,x2,y2"


def test_linear_sweep_picks_an_l2_from_the_grid(multiclass_dir, tmp_path):
  result = training.train(str(multiclass_dir), "linear", str(tmp_path / "run"),
                          tiny(epochs=1), sweep_l2=True, verbose=0)
  grid = config_lib.tiny().train.sweep_grid
  assert result["l2"] in grid and len(result["sweep"]) == len(grid)
  with pytest.raises(ValueError, match="linear"):
    training.train(str(multiclass_dir), "conv", str(tmp_path / "x"), tiny(), sweep_l2=True)


def test_sweep_prefers_strong_l2_on_noise_and_weak_l2_on_signal():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 5)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int64)
  best, rows = sweep.sweep_l2(x[:40], y[:40], x[40:], y[40:], task="binary", num_outputs=1,
                              grid=(1e-4, 10.0), steps=200)
  assert best == 1e-4 and rows[0]["val_score"] > rows[1]["val_score"]


def test_class_weights_balance_the_classes():
  from contracts import statistics
  acc = statistics.Accumulator.empty().add(labels=np.array([0, 0, 0, 1]))
  weights = statistics.class_weights(statistics.finish({"train": acc}), 2)
  assert weights[0] * 3 == pytest.approx(weights[1] * 1)


def test_train_cli_flags_override_config_file(multiclass_dir, tmp_path, capsys):
  path = tmp_path / "c.json"
  path.write_text(json.dumps({"train": {"epochs": 5, "batch_size": 4},
                              "head": config_lib.to_dict(config_lib.tiny())["head"]}))
  out = tmp_path / "run"
  assert run.train_main(["--features", str(multiclass_dir), "--head", "mlp", "--out", str(out),
                         "--config", str(path), "--epochs", "1", "--class-weights", "balanced",
                         "--quiet"]) == 0
  saved = json.loads((out / "config.json").read_text())
  assert saved["train"]["epochs"] == 1 and saved["train"]["batch_size"] == 4
  assert saved["train"]["class_weight"] == "balanced"
  assert json.loads(capsys.readouterr().out.splitlines()[0])["head"] == "mlp"


def test_run_refuses_features_with_another_cache_key(binary_dir, tmp_path):
  out = tmp_path / "run"
  training.train(str(binary_dir), "linear", str(out), tiny(epochs=1), verbose=0)
  other = write_feature_dataset(tmp_path / "other", cache_key="k2")
  with pytest.raises(layout.DatasetError, match=r"cache key 'k2'.*trained on features with "
                     r"key 'k1'") as caught:
    training.train(str(other), "linear", str(out), tiny(epochs=1), verbose=0)
  assert "\n" not in str(caught.value)
  with pytest.raises(ValueError, match="is not a finished headstart run"):
    runs.RunDir(str(tmp_path / "nowhere")).load()


def test_views_flag_trains_on_augmented_views_too(binary_dir, tmp_path):
  plain = training.train(str(binary_dir), "linear", str(tmp_path / "a"), tiny(epochs=1),
                         verbose=0)
  with_views = training.train(str(binary_dir), "linear", str(tmp_path / "b"),
                              tiny(epochs=1, views=True), verbose=0)
  assert plain["num_train_examples"] == 24 and with_views["num_train_examples"] == 48


def test_cli_errors_are_one_line(tmp_path, capsys):
  import headstart

  code = headstart.main(["train", "--features", str(tmp_path), "--head", "linear",
                         "--out", str(tmp_path / "run")])
  error = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in error and "no manifest.json" in error


def test_corrupt_backup_is_refused_not_replaced_by_random_init(multiclass_dir, tmp_path):
  """F15: a damaged resume checkpoint stops the run with a clear error; it never restarts."""
  out = tmp_path / "run"
  config = tiny(epochs=4)
  with pytest.raises(KeyboardInterrupt):
    training.train(str(multiclass_dir), "linear", str(out), config, verbose=0,
                   callbacks=[_Interrupt(after_epoch=2)])
  backups = [p for p in (out / "backup").rglob("*") if p.is_file()]
  assert backups
  for path in backups:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])
  with pytest.raises(ValueError, match="resume checkpoint .* is damaged"):
    training.train(str(multiclass_dir), "linear", str(out), config, verbose=0)
  assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_damaged_feature_shards_are_refused_naming_the_file(multiclass_dir, tmp_path, damage):
  """Matrix row 33 / F9-F11 in stage 3: training never starts on a damaged shard."""
  copy = tmp_path / "features"
  shutil.copytree(multiclass_dir, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  shard = copy / manifest["splits"]["train"]["shards"][0]["file"]
  data = bytearray(shard.read_bytes())
  if damage == "flip":
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
  else:  # cut at a record boundary: every CRC still passes, only the count shows the loss
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]
    with tf.io.TFRecordWriter(str(shard)) as writer:
      for record in records[:-1]:
        writer.write(record)
  expected = "is corrupt" if damage == "flip" else "its manifest says"
  with pytest.raises(ValueError, match=re.escape(shard.name) + ".*" + expected):
    training.train(str(copy), "linear", str(tmp_path / "run"), tiny(epochs=1), verbose=0)


def test_resumed_run_ends_exactly_where_an_uninterrupted_one_does(multiclass_dir, tmp_path):
  """F14: interrupted after epoch 2, resumed in a fresh process (a real restart), same seed:
  identical history and identical final weights (each epoch's shuffle depends on (seed, epoch))."""
  config = tiny(epochs=4, lr_decay=True)
  training.train(str(multiclass_dir), "linear", str(tmp_path / "clean"), config, verbose=0)
  with pytest.raises(KeyboardInterrupt):
    training.train(str(multiclass_dir), "linear", str(tmp_path / "resumed"), config, verbose=0,
                   callbacks=[_Interrupt(after_epoch=2)])
  resume = ("from heads import training\n"
            "from tests.test_heads_unit import tiny\n"
            f"training.train({str(multiclass_dir)!r}, 'linear', {str(tmp_path / 'resumed')!r}, "
            "tiny(epochs=4, lr_decay=True), verbose=0)\n")
  subprocess.run([sys.executable, "-c", resume], check=True, capture_output=True,
                 cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert (tmp_path / "clean" / "history.csv").read_text() == (
      tmp_path / "resumed" / "history.csv").read_text()
  clean = keras.models.load_model(tmp_path / "clean" / "head.keras").get_weights()
  resumed = keras.models.load_model(tmp_path / "resumed" / "head.keras").get_weights()
  for a, b in zip(clean, resumed):
    np.testing.assert_array_equal(a, b)
