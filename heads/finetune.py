"""Fine-tuning: continue a trained run with the last N backbone layers unfrozen, on the images.

    headstart finetune --model runs/gender_vgg16 --images DATA/images --unfreeze 20 --epochs 5

Starts from the run's exported `model.keras` (frozen backbone + trained head), makes the last N
layers of the backbone trainable (BatchNormalization layers stay frozen and in inference mode,
as keras-io's fine-tuning guide advises, so their statistics are not wrecked by small batches)
and trains on the stored images at a low learning rate. Writes a run directory of its own
(default `RUN_DIR/finetune`) with the same files as `headstart train`, so `headstart predict
--model RUN_DIR/finetune` works.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import keras

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
             callbacks: Sequence[keras.callbacks.Callback] = (),
             verbose: int = 2) -> dict[str, Any]:
  """Fine-tunes a finished run on its image dataset; returns the metrics also written.

  Args:
    run_dir: a finished `headstart train` run with `model.keras`.
    images_dir: the image dataset (stage 1) the run's features came from.
    unfreeze: how many of the backbone's last weighted layers to train.
    out_dir: output run directory (default `run_dir/finetune`).
    epochs: training epochs.
    learning_rate: default the run's learning rate times `finetune_lr_scale`.
    batch_size: default the run's batch size.
    callbacks: extra Keras callbacks.
    verbose: Keras `fit` verbosity.

  Raises:
    ValueError: not a run, no exported model, image dataset of another size, bad `unfreeze`.
  """
  started = time.perf_counter()
  base = runs.RunDir(run_dir)
  out = runs.RunDir(out_dir or base.file("finetune"))
  run_config, _ = base.load()
  config = from_dict(run_config)
  if not base.exists(runs.MODEL_NAME):
    raise ValueError(f"run {base.path!r} has no {runs.MODEL_NAME} to fine-tune")
  spec = _image_dataset(images_dir, run_config)
  notes = evaluation.missing_split_notes(spec)
  if run_config.get("image_fingerprint") and run_config["image_fingerprint"] != spec.cache_key:
    notes.append("these images are not the ones the run's features were extracted from")
  keras.utils.set_random_seed(config.train.seed)
  model = keras.models.load_model(base.model_path, compile=False)
  trainable = unfreeze_last(find_backbone(model), unfreeze)
  rate = learning_rate or config.train.learning_rate * config.train.finetune_lr_scale
  batch_size = batch_size or config.train.batch_size
  training.compile_head(model, spec.task, keras.optimizers.Adam(rate))
  out.write_config({
      **run_config, "finetune": {"base_run": base.path, "images": spec.data_dir,
                                 "unfreeze": unfreeze, "trainable_layers": trainable,
                                 "learning_rate": rate, "epochs": epochs,
                                 "batch_size": batch_size}})
  plan = caching.plan_cache(spec, "image", spec.splits, budget=None, cache_dir=None,
                            run_dir=out.path)
  inputs = fitting.make_inputs(spec, "image", batch_size=batch_size, train=config.train,
                               settings=run_config["image"], cache=plan)
  describe = {
      "task": spec.task, "head": run_config["head_name"], "backbone": run_config["backbone"],
      "weights_kind": run_config["weights_kind"], "cache_key": run_config["cache_key"],
      "finetuned_from": base.path, "unfreeze": unfreeze, "trainable_layers": trainable,
      "learning_rate": rate, "params": int(model.count_params()),
      "trainable_params": int(sum(keras.ops.size(w) for w in model.trainable_weights)),
      "class_names": list(spec.class_names), "num_train_examples": inputs.num_train}
  # The fitted model takes stored images already: it is saved as model.keras, ready to predict.
  return fitting.train_and_evaluate(
      model, out, inputs, fitting.FitOptions(epochs, callbacks=callbacks, verbose=verbose),
      describe=describe, notes=notes, started=started, saved_as=runs.MODEL_NAME)
