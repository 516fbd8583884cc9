"""Fine-tuning: continue a trained run with the last N backbone layers unfrozen, on the images.

    headstart finetune --model runs/gender_vgg16 --images DATA/images --unfreeze 20 --epochs 5

Starts from the run's exported `model.keras` (frozen backbone + trained head), makes the last N
layers of the backbone trainable (BatchNormalization layers stay frozen and in inference mode,
as keras-io's fine-tuning guide advises, so their statistics are not wrecked by small batches)
and trains on the stored images at a low learning rate (Adam 1e-5 by default, reached by a
linear warm-up over the first epoch). The loaded model's loss and accuracy on the train and
validation splits before any update are recorded (`metrics.json` `start`); those starting
weights are the checkpoint to beat, so the run keeps its best epoch by validation, or the start
itself; a first epoch whose training loss exceeds 1.5x the starting loss is said in `notes`.
Writes a run directory of its own (default `RUN_DIR/finetune`) with the same files as
`headstart train`, so `headstart predict --model RUN_DIR/finetune` works.
"""
from __future__ import annotations

import csv
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from contracts import layout, runs
from heads import caching, evaluation, fitting, reader, training
from heads.config import from_dict


def _all_layers(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
  for inner in getattr(layer, "layers", ()):
    if getattr(inner, "layers", None):
      yield from _all_layers(inner)
    else:
      yield inner


def find_backbone(model: keras.Model) -> keras.Model:
  """The nested backbone model of an exported run (the first sub-model on the path).

  Raises:
    ValueError: the model has no nested backbone (e.g. a `scratch` run).
  """
  nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
  if len(nested) < 2:
    raise ValueError(f"model {model.name!r} has no frozen backbone to unfreeze (a scratch run "
                     "trains every layer already)")
  return nested[0]


def unfreeze_last(backbone: keras.Model, count: int) -> list[str]:
  """Makes the last `count` weighted layers of `backbone` trainable; returns their names.

  Raises:
    ValueError: `count` is not positive.
  """
  if count < 1:
    raise ValueError(f"--unfreeze must be at least 1, got {count!r}")
  weighted = [layer for layer in _all_layers(backbone) if layer.weights]
  backbone.trainable = True
  for layer in weighted:
    layer.trainable = False
  chosen = []
  for layer in weighted[-count:]:
    if isinstance(layer, keras.layers.BatchNormalization):
      continue
    layer.trainable = True
    chosen.append(layer.name)
  return chosen


# The first epoch's training loss may exceed the loss the fine-tune started from by this factor
# before the run says, in its notes, that it started by undoing what the head had learnt.
START_LOSS_TOLERANCE = 1.5


def warmup_schedule(rate: float, steps: int) -> float | keras.optimizers.schedules.CosineDecay:
  """`rate`, reached by a linear warm-up from 0 over `steps` optimizer steps when `steps` > 0.

  A built-in schedule (a cosine decay with `alpha=1`, i.e. none, after its warm-up), so the
  saved `model.keras` loads with plain Keras.
  """
  if steps <= 0:
    return rate
  return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=1, alpha=1.0,
                                                warmup_target=rate, warmup_steps=steps)


def starting_point(model: keras.Model, inputs: fitting.RunInputs, task: str
                   ) -> dict[str, dict[str, float]]:
  """Loss and accuracy (keypoints: MAE) of the compiled, not yet updated model per split.

  The same loss `fit` reports (regularisation included), on the train batches and, when there
  is one, the validation split; `metrics.json` keeps it as `start`.
  """
  name = "mae" if task == "keypoints" else "accuracy"
  start = {}
  for split, batches in (("train", inputs.train), ("validation", inputs.validation)):
    if batches is None:
      continue
    values = model.evaluate(batches, verbose=0, return_dict=True)
    metric = next(value for key, value in values.items() if key != "loss")
    start[split] = {"loss": float(values["loss"]), name: float(metric)}
  return start


class WarmStartCheck(keras.callbacks.Callback):
  """Writes notes when a fine-tune undoes its start: the first epoch's training loss above
  `START_LOSS_TOLERANCE` x the starting loss, or no epoch better than the start on the
  monitored loss (the fit then keeps the starting weights, see `fitting.fit(initial_best=)`).
  """

  def __init__(self, start: Mapping[str, Mapping[str, float]], notes: list[str],
               history_path: str):
    super().__init__()
    self.start, self.notes, self.history_path = start, notes, history_path

  def on_epoch_end(self, epoch, logs=None):
    first, before = (logs or {}).get("loss"), self.start["train"]["loss"]
    if epoch == 0 and first is not None and first > START_LOSS_TOLERANCE * before:
      self.notes.append(
          f"the first epoch's training loss {first:.4g} is {first / before:.1f}x the starting "
          f"loss {before:.4g} (more than {START_LOSS_TOLERANCE}x): the fine-tune began by "
          "undoing the head; try a lower --learning-rate or more --warmup-epochs")

  def on_train_end(self, logs=None):
    split, monitor = (("validation", "val_loss") if "validation" in self.start
                      else ("train", "loss"))
    with tf.io.gfile.GFile(self.history_path, "r") as f:
      values = [float(row[monitor]) for row in csv.DictReader(f) if row.get(monitor)]
    # "Not below" rather than ">=": a diverged epoch's NaN loss improves on nothing either.
    if values and not any(value < self.start[split]["loss"] for value in values):
      best = min((value for value in values if value == value), default=float("nan"))
      self.notes.append(
          f"no epoch improved on the starting model's {split} loss "
          f"{self.start[split]['loss']:.4g} (best epoch {best:.4g}): the starting "
          "weights are kept")


def _compile(model: keras.Model, spec: reader.DatasetSpec, config: Any, *,
             learning_rate: float | None, warmup_epochs: int | None,
             batch_size: int | None) -> tuple[float, int, int]:
  """Compiles with Adam warming up to the fine-tuning rate; returns (rate, warm-up epochs,
  batch size) with the run config's defaults filled in."""
  rate = learning_rate or config.train.finetune_learning_rate
  warmup = config.train.finetune_warmup_epochs if warmup_epochs is None else warmup_epochs
  batch_size = batch_size or config.train.batch_size
  steps = warmup * -(-spec.num_examples("train") // batch_size)
  training.compile_head(model, spec.task, keras.optimizers.Adam(warmup_schedule(rate, steps)))
  return rate, warmup, batch_size


def _notes(spec: reader.DatasetSpec, run_config: dict[str, Any]) -> list[str]:
  """What a fine-tune's `metrics.json` says of its data before training."""
  notes = evaluation.missing_split_notes(spec)
  if run_config.get("image_fingerprint") and run_config["image_fingerprint"] != spec.cache_key:
    notes.append("these images are not the ones the run's features were extracted from")
  return notes


def _image_dataset(images_dir: str, run_config: dict[str, Any]) -> reader.DatasetSpec:
  """The image dataset to fine-tune on, checked against the run's model.

  Raises:
    ValueError: not an image dataset, another image size, or no train split.
  """
  spec = reader.load_spec(images_dir)
  if spec.kind != "images":
    raise ValueError(f"--images {images_dir!r} is a {spec.kind} dataset; fine-tuning trains on "
                     "the image dataset (headstart ingest output)")
  if spec.image_size != run_config["image"]["image_size"]:
    raise ValueError(f"image dataset {images_dir!r} has image size {spec.image_size!r}, the run's "
                     f"model takes {run_config['image']['image_size']!r}")
  if "train" not in spec.splits:
    raise layout.DatasetError(f"image dataset {images_dir!r} has no train split")
  return spec


def finetune(run_dir: str, images_dir: str, *, unfreeze: int, out_dir: str | None = None,
             epochs: int = 5, learning_rate: float | None = None, batch_size: int | None = None,
             warmup_epochs: int | None = None, callbacks: Sequence[keras.callbacks.Callback] = (),
             verbose: int = 2) -> dict[str, Any]:
  """Fine-tunes a finished run on its image dataset; returns the metrics also written.

  Args:
    run_dir: a finished `headstart train` run with `model.keras`.
    images_dir: the image dataset (stage 1) the run's features came from.
    unfreeze: how many of the backbone's last weighted layers to train.
    out_dir: output run directory (default `run_dir/finetune`).
    epochs: training epochs.
    learning_rate: Adam's rate for every trainable weight (default the run config's
      `finetune_learning_rate`, 1e-5).
    batch_size: default the run's batch size.
    warmup_epochs: epochs of linear warm-up to `learning_rate` (default the run config's
      `finetune_warmup_epochs`, 1).
    callbacks: extra Keras callbacks.
    verbose: Keras `fit` verbosity.

  Raises:
    ValueError: not a run, no exported model, image dataset of another size, bad `unfreeze`.
  """
  # Over 60 lines only by its docstring (the nine arguments); the body is one straight sequence.
  started = time.perf_counter()
  base = runs.RunDir(run_dir)
  out = runs.RunDir(out_dir or base.file("finetune"))
  run_config, _ = base.load()
  config = from_dict(run_config)
  if not base.exists(runs.MODEL_NAME):
    raise ValueError(f"run {base.path!r} has no {runs.MODEL_NAME} to fine-tune")
  spec = _image_dataset(images_dir, run_config)
  notes = _notes(spec, run_config)
  keras.utils.set_random_seed(config.train.seed)
  model = keras.models.load_model(base.model_path, compile=False)
  trainable = unfreeze_last(find_backbone(model), unfreeze)
  rate, warmup, batch_size = _compile(model, spec, config, learning_rate=learning_rate,
                                      warmup_epochs=warmup_epochs, batch_size=batch_size)
  settings = {"base_run": base.path, "images": spec.data_dir, "unfreeze": unfreeze,
              "trainable_layers": trainable, "learning_rate": rate, "warmup_epochs": warmup,
              "epochs": epochs, "batch_size": batch_size}
  out.write_config({**run_config, "finetune": settings})
  inputs = fitting.make_inputs(spec, "image", batch_size=batch_size, train=config.train,
                               settings=run_config["image"], cache=caching.plan_cache(
                                   spec, "image", spec.splits, budget=None, cache_dir=None,
                                   run_dir=out.path))
  # Where the fine-tune starts: the loaded model on the train (and validation) split, before
  # any update. Evaluating the train batches here also fills their cache for epoch 1.
  start = starting_point(model, inputs, spec.task)
  describe = {
      **{key: run_config[key] for key in ("backbone", "weights_kind", "cache_key")},
      "task": spec.task, "head": run_config["head_name"], "finetuned_from": base.path,
      **{key: settings[key] for key in ("unfreeze", "trainable_layers", "learning_rate",
                                        "warmup_epochs")}, "params": int(model.count_params()),
      "trainable_params": int(sum(keras.ops.size(w) for w in model.trainable_weights)),
      "class_names": list(spec.class_names), "num_train_examples": inputs.num_train}
  monitored = start.get("validation", start["train"])["loss"]
  options = fitting.FitOptions(
      epochs, callbacks=(WarmStartCheck(start, notes, out.history_path), *callbacks),
      verbose=verbose, initial_best=monitored)
  # The fitted model takes stored images already: it is saved as model.keras, ready to predict.
  return fitting.train_and_evaluate(
      model, out, inputs, options, describe=describe, notes=notes, started=started,
      extra={"start": start}, saved_as=runs.MODEL_NAME)
