"""Trains one head on a cached feature dataset and writes the run directory.

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head conv --out runs/x --epochs 30

`RUN_DIR` gets `config.json` (written first), `history.csv`, `checkpoints/best.weights.h5` (best
on validation), `head.keras`, `model.keras` (raw images in, see `heads.export`),
`predictions_test.csv` and `metrics.json` (written last); `contracts.runs.RunDir` names them. An
interrupted run resumes from its last finished epoch when started again with the same arguments
(see `heads.fitting`, the run routine `train` shares with `headstart finetune`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contracts import datasets, layout, runs, statistics
from heads import caching, compiled, dataset_stats, evaluation, export, fitting, reader, ridge
from heads import search, sweep, zoo
from heads.config import Config, to_dict


# Held from a run's `set_random_seed` until its head is built, and around every other build.
# Keras draws each layer's seed (initializers, dropout) from Python's process-wide `random`,
# which `set_random_seed` resets: runs training at once in threads of one process (`compare
# --parallel-runs`, Beam's multi_threading runner) would otherwise draw from each other's
# sequence, and a run's weights would depend on what ran beside it. Reentrant: a build happens
# inside the first hold.
SEEDING = threading.RLock()


def resolve_dataset(features_dir: str, head: str) -> reader.DatasetSpec:
  """The dataset a head trains on: the feature dataset, or for `scratch` its image dataset.

  Raises:
    ValueError: a feature head pointed at an image dataset, or a missing manifest.
  """
  spec = reader.load_spec(features_dir)
  if head == "scratch" and spec.kind == "features":
    image_dir = spec.manifest.get("image_dataset")
    if not image_dir:
      raise ValueError(f"feature dataset {features_dir!r} does not name its image dataset; "
                       "pass the image dataset to --features for --head scratch")
    return reader.load_spec(image_dir)
  if head != "scratch" and spec.kind == "images":
    raise ValueError(f"{features_dir!r} is an image dataset; head {head!r} trains on features "
                     "(run headstart extract first, or use --head scratch)")
  return spec


def image_settings(spec: reader.DatasetSpec) -> dict[str, Any]:
  """What `predict` needs to turn new image files into model inputs like the training images.

  Read from the image dataset's manifest when it is reachable; otherwise from the copies the
  feature manifest keeps (`image_size`, `image_format`, and `resize` when it is a resize mode).
  Stored as `config.json`'s `image`.
  """
  image_dir = spec.data_dir if spec.kind == "images" else spec.manifest.get("image_dataset")
  if spec.kind == "images":
    manifest = spec.manifest
  elif image_dir and datasets.has_manifest(image_dir):
    manifest = datasets.read_manifest(image_dir)
  else:
    manifest = {"image_size": spec.manifest.get("image_size"),
                "format": spec.manifest.get("image_format")}
    if spec.manifest.get("resize") in layout.RESIZE_MODES:
      manifest["resize"] = spec.manifest["resize"]
  return {
      "image_dataset": image_dir,
      "image_size": manifest.get("image_size"),
      "resize": manifest.get("resize", "stretch"),
      "format": manifest.get("format"),
      # Ingest records the pad colour as `background`; CONTRACTS.md calls it `pad_color`.
      "background": manifest.get("background") or manifest.get("pad_color"),
  }


def image_dataset_dir(run_config: Mapping[str, Any]) -> str | None:
  """The image dataset a run's examples come from (features name it; scratch runs read it)."""
  if run_config.get("dataset_kind") == "images":
    return run_config.get("features")
  image = run_config.get("image") or {}
  if image.get("image_dataset"):
    return image["image_dataset"]
  features = run_config.get("features")
  if features and datasets.has_manifest(features):
    return datasets.read_manifest(features).get("image_dataset")
  return None


def _optimizer(config: Config, steps_per_epoch: int):
  train = config.train
  rate = train.learning_rate
  if train.lr_decay:
    # Decays by lr_decay_rate once per epoch (Keras counts optimizer steps).
    rate = keras.optimizers.schedules.ExponentialDecay(
        rate, decay_steps=max(steps_per_epoch, 1), decay_rate=train.lr_decay_rate)
  return {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD,
          "rmsprop": keras.optimizers.RMSprop}[train.optimizer](learning_rate=rate)


# Train steps per call of the compiled step: the same updates in the same order, with Keras'
# per-step Python overhead (~1 ms, most of a small head's step) paid once per 16 batches.
# Callbacks here are per epoch, so nothing observes the difference.
STEPS_PER_EXECUTION = 16


def compile_head(model: keras.Model, task: str, optimizer) -> None:
  """Compiles a head (or an assembled model) with the task's loss and metric (an Adam
  optimizer applies its updates with the fused kernel, `fitting.fuse_adam`)."""
  metric = "mae" if task == "keypoints" else (
      "binary_accuracy" if task == "binary" else "sparse_categorical_accuracy")
  model.compile(optimizer=fitting.fuse_adam(optimizer), loss=zoo.loss_for(task),
                metrics=[metric], steps_per_execution=STEPS_PER_EXECUTION)


def _export(model: keras.Model, spec: reader.DatasetSpec, run: runs.RunDir, head: str,
            notes: list[str]) -> str | None:
  try:
    export.export_model(model, spec, run.model_path, head=head)
    return runs.MODEL_NAME
  except export.ExportUnavailable as error:
    notes.append(f"model.keras not exported: {error}")
    logging.warning("model.keras not exported: %s", error)
    return None


def export_run(run_dir: str) -> str | None:
  """Writes `model.keras` for a finished run trained with `export_model=False`.

  Returns:
    The exported file name, or None when the backbone cannot be rebuilt (see the run's notes).
  """
  run = runs.RunDir(run_dir)
  saved, result = run.load()
  spec = resolve_dataset(saved["features"], saved["head_name"])
  reader.check_cache_key(spec, saved.get("cache_key", ""), run.path)
  head_model = keras.models.load_model(run.head_path)
  notes = [n for n in result.get("notes", []) if not n.startswith("model.keras not exported")]
  result["exported"] = _export(head_model, spec, run, saved["head_name"], notes)
  result["notes"] = notes
  run.write_metrics(result)
  return result["exported"]


# The L2 sweep fits its probes in memory on at most this many examples per split (a bounded
# sample, the first ones in record order); the head itself then trains on every example.
SWEEP_MAX_EXAMPLES = 50_000


def _pick_l2(spec: reader.DatasetSpec, kind: str, config: Config,
             standardise: tuple[np.ndarray, np.ndarray]) -> tuple[Config, list[dict[str, Any]]]:
  """Runs the L2 sweep on a bounded in-memory sample of train and validation.

  Returns:
    The config with the chosen strength and the sweep's rows.
  """
  if "validation" not in spec.splits:
    raise ValueError("--sweep needs a validation split to pick the L2 strength; "
                     f"{spec.data_dir!r} has none")
  train_arrays, val_arrays = (reader.load_arrays(reader.read_split(
      spec, split, input_kind=kind, views=config.train.views and split == "train").take(
          SWEEP_MAX_EXAMPLES)) for split in ("train", "validation"))
  # The probe standardises its input (see zoo.build_head): sweep on the same standardised view.
  mean, std = standardise[0], np.sqrt(standardise[1])
  best_l2, rows = sweep.sweep_l2(
      (train_arrays["x"] - mean) / std, train_arrays["y"], (val_arrays["x"] - mean) / std,
      val_arrays["y"], task=spec.task,
      num_outputs=spec.num_outputs, grid=config.train.sweep_grid,
      steps=config.train.sweep_steps, seed=config.train.seed)
  return dataclasses.replace(config, head=dataclasses.replace(config.head, l2=best_l2)), rows


def _check_run_dir(run: runs.RunDir, spec: reader.DatasetSpec, head: str) -> None:
  """Refuses to resume or overwrite a run directory with other features or another head."""
  saved = run.config()
  if saved is None:
    return
  # A run directory belongs to one feature set: resuming or overwriting it with other features
  # would mix checkpoints and metrics of two different inputs.
  reader.check_cache_key(spec, saved.get("cache_key", ""), run.path)
  if run.unfinished and saved.get("head_name") != head:
    raise ValueError(f"run {run.path!r} holds an unfinished {saved.get('head_name')!r} head; "
                     f"resume it with --head {saved.get('head_name')} or use a new --out")


def _checked_dataset(features_dir: str, head: str, run: runs.RunDir) -> reader.DatasetSpec:
  """The dataset `head` trains on, once it and the run directory check out (shards are checked
  as they are read: see `_name_damaged_shard`)."""
  spec = resolve_dataset(features_dir, head)
  if "train" not in spec.splits:
    raise layout.DatasetError(f"dataset {spec.data_dir!r} has no train split (it has "
                              f"{', '.join(spec.splits)}); nothing to train on")
  _check_run_dir(run, spec, head)
  return spec


def _run_config(config: Config, head: str, spec: reader.DatasetSpec, kind: str,
                settings: Mapping[str, Any], sweep_l2: bool) -> dict[str, Any]:
  """`config.json`: the hyperparameters plus what the run was trained on."""
  return {**to_dict(config), "head_name": head, "features": spec.data_dir,
          "dataset_kind": spec.kind, "task": spec.task, "class_names": list(spec.class_names),
          "num_keypoints": spec.num_keypoints, "cache_key": spec.cache_key,
          "backbone": spec.backbone, "weights_kind": spec.weights_kind,
          "input_kind": kind, "image": dict(settings), "sweep": sweep_l2,
          "image_fingerprint": (spec.manifest.get("fingerprint") if spec.kind == "images"
                                else spec.manifest.get("image_fingerprint"))}


def _name_damaged_shard(spec: reader.DatasetSpec, error: tf.errors.OpError) -> None:
  """After a failed pass: finds the shard at fault and raises naming it (else returns).

  Records are CRC-checked as they are read and each split's count is asserted as a pass ends,
  so a damaged shard fails the pass that reads it; TensorFlow's error names no file, so only
  then are the splits' shards checked one by one against the manifest.
  """
  del error   # re-raised by the caller when no shard is at fault
  for split in spec.splits:
    datasets.check_shards(spec.data_dir, spec.manifest, split)


def _cache_plan(spec: reader.DatasetSpec, kind: str, run: runs.RunDir, config: Config, *,
                budget: int | None, cache_dir: str | None) -> caching.CachePlan:
  plan = caching.plan_cache(spec, caching.shared_kinds(spec, kind), spec.splits, budget=budget,
                            cache_dir=cache_dir, run_dir=run.path, views=config.train.views)
  logging.getLogger("headstart").info("train: input cached in %s: %s", plan.where, plan.reason)
  return plan


def train(features_dir: str, head: str, out_dir: str, config: Config = Config(), *,
          sweep_l2: bool = False, callbacks: Sequence[keras.callbacks.Callback] = (),
          verbose: int = 2, export_model: bool = True, cache_budget: int | None = None,
          cache_dir: str | None = None) -> dict[str, Any]:
  """Trains `head` on `features_dir` into `out_dir`; returns the metrics also written there.

  Everything the head needs before `fit` (counts, class histogram, pooled mean and variance,
  mean keypoint target) comes from the manifest or the dataset's saved statistics, so the data
  is read only by the epochs themselves and by evaluation.

  Args:
    features_dir: a feature dataset (or, for `head="scratch"`, an image dataset).
    head: one of `heads.zoo.HEADS`.
    out_dir: the run directory (created; an unfinished run there is resumed).
    config: hyperparameters.
    sweep_l2: `linear` only: pick the output L2 strength on validation first.
    callbacks: extra Keras callbacks (tests use one to simulate an interruption).
    verbose: Keras `fit` verbosity.
    export_model: write `model.keras` (backbone + head, raw images in). `compare` turns it off
      for its grid (each export holds a whole backbone) and exports the best run only.
    cache_budget: bytes the parsed input may hold in memory (None: `caching.default_budget`).
    cache_dir: local folder for a file cache when the input exceeds the budget.

  Raises:
    ValueError: bad head/dataset combination, no train split, missing manifest, a damaged shard.
  """
  started = time.perf_counter()
  run = runs.RunDir(out_dir)
  kind = zoo.input_kind(head)
  _check_sweep(head, sweep_l2, config)
  spec = _checked_dataset(features_dir, head, run)
  notes = evaluation.missing_split_notes(spec)
  with contextlib.ExitStack() as lent:
    with SEEDING:   # until the head is built (see SEEDING)
      keras.utils.set_random_seed(config.train.seed)
      prepared = _prepare(head, spec, run, config, kind=kind, notes=notes, started=started,
                          sweep_l2=sweep_l2, cache_budget=cache_budget, cache_dir=cache_dir,
                          export_model=export_model, lent=lent)
      if callable(prepared):   # a ridge head, solved in closed form (building its model too)
        return _guarded(spec, prepared)
    return _guarded(spec, lambda: _fit_head(
        head, spec, run, prepared, config, notes=notes, started=started,
        callbacks=(prepared.epoch_seed, *callbacks), verbose=verbose))


@dataclasses.dataclass
class _Prepared:
  """A run's inputs and built head, made under `SEEDING` (see `_prepare`)."""
  inputs: fitting.RunInputs
  model: keras.Model
  build: Callable[[Config], keras.Model]
  epoch_seed: fitting.EpochSeed
  stats: Mapping[str, Any]
  extra: dict[str, Any]
  export_model: bool
  target_mean: np.ndarray | None
  ridge_started: bool   # the head starts at a ridge fit (`head.ridge_start`)


def _prepare(head: str, spec: reader.DatasetSpec, run: runs.RunDir, config: Config, *,
             kind: str, notes: list[str], started: float, sweep_l2: bool,
             cache_budget: int | None, cache_dir: str | None, export_model: bool,
             lent: contextlib.ExitStack) -> _Prepared | Callable[[], dict[str, Any]]:
  """Everything before `fit`: config.json, the cache plan, the inputs and the built head (a
  shared compiled head is lent for as long as `lent` is open). A ridge head gets its solve."""
  settings = image_settings(spec)
  stats = dataset_stats.load(spec)
  input_stats = statistics.standardisation(stats) if kind == "pooled" else None
  sweep_rows = None
  if sweep_l2:
    config, sweep_rows = _pick_l2(spec, kind, config, input_stats)
  run.write_config(_run_config(config, head, spec, kind, settings, sweep_l2))
  epoch_seed = fitting.EpochSeed()
  plan = _cache_plan(spec, kind, run, config, budget=cache_budget, cache_dir=cache_dir)
  inputs = fitting.make_inputs(spec, kind, batch_size=config.train.batch_size,
                               train=config.train, settings=settings, cache=plan,
                               epoch=epoch_seed.epoch)
  # Ridge's closed-form solves stream the train split themselves, in bounded memory (built only
  # for them: a dataset's construction traces its parse functions, ~0.1 s per run of a grid).
  train_records = (reader.read_split(spec, "train", input_kind=kind, views=config.train.views)
                   if head in ridge.HEADS or ridge.starts_from_ridge(head, config) else None)
  if head in ridge.HEADS:
    return lambda: _solve_ridge(head, spec, run, inputs, train_records, config, notes=notes,
                                started=started, export_model=export_model)
  linear, extra = ridge.linear_start(head, spec, train_records, inputs.num_train,
                                     inputs.validation is not None, config, notes)
  extra.update({"l2": config.head.l2, **({"sweep": sweep_rows} if sweep_rows is not None else {}),
                "input_cache": plan.to_dict()})
  notes.extend(_fit_notes(inputs, export_model))
  target_mean = statistics.targets_mean(stats) if spec.task == "keypoints" else None
  steps = -(-inputs.num_train // inputs.batch_size)

  def fresh(point: Config) -> keras.Model:
    return zoo.build_head(head, spec, point.head, target_mean=target_mean,
                          input_stats=input_stats, linear_start=linear)

  def build(point: Config) -> keras.Model:
    """A compiled head with `point`'s settings (a search builds one per point)."""
    with SEEDING:   # draws layer seeds from Python's `random`, as every build does
      model = fresh(point)
    compile_head(model, spec.task, _optimizer(point, steps))
    return model

  # Runs of a grid (no export: an export adds the backbone to the head's graph) that differ
  # only in their seed share one compiled, traced model.
  model = build(config) if export_model else lent.enter_context(compiled.lend(
      _compiled_key(head, spec, config, linear), fresh(config),
      lambda new: compile_head(new, spec.task, _optimizer(config, steps))))
  return _Prepared(inputs, model, build, epoch_seed, stats, extra, export_model, target_mean,
                   linear is not None)


def _check_sweep(head: str, sweep_l2: bool, config: Config) -> None:
  """`--sweep` tunes the linear probe only, and not together with `--search`."""
  if sweep_l2 and head != "linear":
    raise ValueError(f"--sweep tunes the linear probe's L2 strength; head {head!r} has no sweep")
  if sweep_l2 and config.train.search != "none":
    raise ValueError(f"--sweep and --search {config.train.search} both choose the linear head's "
                     "L2 strength; use one of them")


def _guarded(spec: reader.DatasetSpec, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """Runs a fit or solve; when a pass over the data fails, names the damaged shard."""
  try:
    return work()
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError,
          tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as error:
    _name_damaged_shard(spec, error)
    raise


def _fit_head(head: str, spec: reader.DatasetSpec, run: runs.RunDir, prepared: _Prepared,
              config: Config, *, notes: list[str], started: float,
              callbacks: Sequence[keras.callbacks.Callback], verbose: int) -> dict[str, Any]:
  """Fits (or searches) and evaluates a built head; writes `metrics.json`."""
  inputs, model, build = prepared.inputs, prepared.model, prepared.build
  extra, target_mean = prepared.extra, prepared.target_mean
  weights = (statistics.class_weights(prepared.stats, max(len(spec.class_names), 2))
             if config.train.class_weight == "balanced" and spec.task != "keypoints" else None)
  # A head started at a ridge fit keeps that start unless an epoch beats it on validation.
  initial_best = (model.evaluate(inputs.validation, verbose=0, return_dict=True)["loss"]
                  if prepared.ridge_started else None)
  export = _exporter(spec, run, head) if prepared.export_model else None
  if config.train.search != "none":
    found = search.run_search(config.train.search, head, config, build, inputs, run,
                              class_weight=weights, initial_best=initial_best,
                              callbacks=callbacks, verbose=verbose)
    return fitting.save_and_evaluate(
        found.model, run, inputs, found.fitted,
        describe=_describe(spec, head, found.model, inputs.num_train), notes=notes,
        started=started, extra={**extra, "search": found.block}, baseline=target_mean,
        export=export)
  options = fitting.FitOptions(config.train.epochs, config.train.early_stopping, weights,
                               callbacks, verbose, initial_best=initial_best)
  return fitting.train_and_evaluate(
      model, run, inputs, options, describe=_describe(spec, head, model, inputs.num_train),
      notes=notes, started=started, extra=extra, baseline=target_mean, export=export)


def _compiled_key(head: str, spec: reader.DatasetSpec, config: Config,
                  linear: tuple[np.ndarray, np.ndarray] | None) -> str:
  """What a head's traced functions depend on besides its variables (`heads.compiled`)."""
  settings = to_dict(config)
  settings["train"] = {k: v for k, v in settings["train"].items() if k != "seed"}
  return json.dumps([head, spec.data_dir, spec.cache_key, settings, linear is not None],
                    sort_keys=True, default=str)


def _fit_notes(inputs: fitting.RunInputs, export_model: bool) -> list[str]:
  """What a trained run's `metrics.json` says about how it was fitted and saved."""
  return [*(["best checkpoint and early stopping monitor the training loss"]
            if inputs.validation is None else []),
          *([] if export_model else
            ["model.keras not exported (export_run() writes it from head.keras)"])]


def _describe(spec: reader.DatasetSpec, head: str, model: keras.Model,
              num_train: int) -> dict[str, Any]:
  """The leading `metrics.json` entries of a run."""
  return {"task": spec.task, "head": head, "backbone": spec.backbone,
          "weights_kind": spec.weights_kind, "cache_key": spec.cache_key,
          "features": spec.data_dir, "params": int(model.count_params()),
          "class_names": list(spec.class_names), "num_train_examples": num_train}


def _exporter(spec: reader.DatasetSpec, run: runs.RunDir, head: str):
  """`train_and_evaluate`'s `export`: writes `model.keras` from the fitted head."""
  return lambda fitted, run_notes: _export(fitted, spec, run, head, run_notes)


def _solve_ridge(head: str, spec: reader.DatasetSpec, run: runs.RunDir,
                 inputs: fitting.RunInputs, train_records: tf.data.Dataset, config: Config, *,
                 notes: list[str], started: float, export_model: bool) -> dict[str, Any]:
  """A ridge head: solved and chosen on validation (`heads.ridge`), then saved and evaluated."""
  if run.exists(runs.HISTORY_NAME):
    tf.io.gfile.remove(run.history_path)   # a closed-form solve has no epochs
  model, block, target_mean = ridge.fit_head(head, spec, train_records, inputs.num_train,
                                             config, notes)
  fitted = {"epochs": 0, "epochs_this_session": 0, "resumed": False,
            "train_seconds": block["seconds"],
            "examples_per_second": inputs.num_train / block["seconds"],
            "examples_per_second_cached": None}
  return fitting.save_and_evaluate(
      model, run, inputs, fitted, describe=_describe(spec, head, model, inputs.num_train),
      notes=notes, started=started, extra={"ridge": block}, baseline=target_mean,
      export=_exporter(spec, run, head) if export_model else None)
