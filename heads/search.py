"""A small per-head search: several settings of one head trained together, chosen on validation.

    headstart compare --features DATA/features --heads linear,mlp,conv --search small --out runs/c
    headstart train --features DATA/features/mobilenet-imagenet-8d96f6ea --head mlp --search small ...

`small` is learning rate {3e-4, 1e-3, 3e-3} x dropout {0.2, 0.5} (6 points); heads without a
dropout layer (`linear`, `gap_dense`) take the output layer's L2 {0, 1e-3} as the second axis.
Ridge heads have a search of their own (their strength sweep) and ignore this one.

All points read the same batches: a `HeadBank` holds one compiled head per point and its train
step runs every head's forward and backward pass on the batch it was given, each head with its
own optimizer (so its own learning rate). A search therefore reads its input once per epoch,
like one head, and pays only the heads' own arithmetic N times. Each head keeps its best epoch by
validation loss (training loss without a validation split) and gets those weights back at the
end; with early stopping, the fit stops once every head has run out of patience. Then every head
is scored on the validation split in one pass, and the best validation score (accuracy, or lowest
MAE for keypoints; ties to the lower loss) is the cell's run. Test data is never looked at here:
only the chosen head is evaluated on it, by the caller. An interrupted search starts again from
its first epoch (compare resumes at the level of finished runs).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contracts import runs
from heads import evaluation, fitting, reader
from heads.config import SEARCHES, Config

_SMALL_RATES = (3e-4, 1e-3, 3e-3)
_NO_DROPOUT = ("linear", "gap_dense")


def points(name: str, head: str) -> list[dict[str, float]]:
  """The settings of search `name` for `head`: `{"learning_rate": r, "dropout" | "l2": v}`.

  Raises:
    ValueError: unknown search name.
  """
  if name not in SEARCHES:
    raise ValueError(f"--search {name!r} is not one of {', '.join(SEARCHES)}")
  if name == "none":
    return []
  second = ("l2", (0.0, 1e-3)) if head in _NO_DROPOUT else ("dropout", (0.2, 0.5))
  return [{"learning_rate": rate, second[0]: value}
          for rate, value in itertools.product(_SMALL_RATES, second[1])]


def apply(config: Config, point: Mapping[str, float]) -> Config:
  """`config` with one point's settings."""
  head = {key: value for key, value in point.items() if key != "learning_rate"}
  return dataclasses.replace(
      config, train=dataclasses.replace(config.train, learning_rate=point["learning_rate"]),
      head=dataclasses.replace(config.head, **head))


def label(point: Mapping[str, float]) -> str:
  """`lr=0.001 dropout=0.5`: how a point appears in tables."""
  short = {"learning_rate": "lr"}
  return " ".join(f"{short.get(key, key)}={value:g}" for key, value in point.items())


class HeadBank(keras.Model):
  """Compiled heads trained side by side on each batch, each with its own loss and optimizer.

  Logs `loss_<i>` (and `val_loss_<i>` on validation data) per head.
  """

  def __init__(self, heads: Sequence[keras.Model], **kwargs):
    super().__init__(**kwargs)
    self.heads = list(heads)
    self.trackers = [keras.metrics.Mean(name=f"loss_{i}") for i in range(len(self.heads))]

  @property
  def metrics(self):
    return self.trackers   # reset by fit at each epoch and before validation

  def call(self, x, training=False):
    return [head(x, training=training) for head in self.heads]

  def _head_losses(self, data, training: bool):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    # Each head's own compiled loss, its regularisation included.
    return x, y, sample_weight, [
        head.compute_loss(x, y, head(x, training=training), sample_weight, training=training)
        for head in self.heads]

  def train_step(self, data):
    with tf.GradientTape(persistent=True) as tape:
      _, _, _, losses = self._head_losses(data, training=True)
    for head, loss, tracker in zip(self.heads, losses, self.trackers):
      gradients = tape.gradient(loss, head.trainable_weights)
      head.optimizer.apply_gradients(zip(gradients, head.trainable_weights))
      tracker.update_state(loss)
    del tape
    return {tracker.name: tracker.result() for tracker in self.trackers}

  def test_step(self, data):
    _, _, _, losses = self._head_losses(data, training=False)
    for loss, tracker in zip(losses, self.trackers):
      tracker.update_state(loss)
    return {tracker.name: tracker.result() for tracker in self.trackers}


class KeepBestEach(keras.callbacks.Callback):
  """Keeps each head's best weights by its monitored loss; restores them all at the end.

  With `patience`, stops the fit once no head has improved for that many epochs. With
  `initial_best`, the starting weights are every head's checkpoint to beat.
  """

  def __init__(self, heads: Sequence[keras.Model], monitor: str, patience: int = 0,
               initial_best: float | None = None):
    super().__init__()
    self.heads, self.monitor, self.patience = list(heads), monitor, patience
    start = np.inf if initial_best is None else initial_best
    self.best = [start] * len(self.heads)
    self.best_epoch = [-1] * len(self.heads)
    self.weights = [head.get_weights() if initial_best is not None else None
                    for head in self.heads]
    self.history: list[dict[str, float]] = []

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    self.history.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
    for index, head in enumerate(self.heads):
      value = float(logs[f"{self.monitor}_{index}"])
      if value < self.best[index]:
        self.best[index], self.best_epoch[index] = value, epoch
        self.weights[index] = head.get_weights()
    if self.patience and all(epoch - best >= self.patience for best in self.best_epoch):
      self.model.stop_training = True

  def on_train_end(self, logs=None):
    for head, weights in zip(self.heads, self.weights):
      if weights is not None:
        head.set_weights(weights)

  def history_csv(self, index: int) -> str:
    """`history.csv` text of head `index` (`epoch,loss,val_loss`)."""
    buffer = io.StringIO()
    columns = [key for key in ("epoch", f"loss_{index}", f"val_loss_{index}")
               if not self.history or key in self.history[0]]
    writer = csv.writer(buffer)
    writer.writerow([key.rsplit("_", 1)[0] if key != "epoch" else key for key in columns])
    for row in self.history:
      writer.writerow([row[key] for key in columns])
    return buffer.getvalue()


def _score(heads: Sequence[keras.Model], inputs: fitting.RunInputs,
           settings: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Each head's validation metrics block, from one pass over the validation batches."""
  outputs: list[list[np.ndarray]] = [[] for _ in heads]
  targets = []
  batch_spec = inputs.validation.element_spec[0]
  example = tf.TensorSpec(batch_spec.shape[1:], batch_spec.dtype)
  forwards = [evaluation.compiled_forward(head, example) for head in heads]
  for x, y in inputs.validation:
    targets.append(y.numpy())
    for column, forward in zip(outputs, forwards):
      column.append(np.asarray(forward(x)))
  y = np.concatenate(targets)
  # Stored-image pixels only: the ids that join source sizes are not in the cached batches.
  local = {**settings, "image_dataset": None}
  return [evaluation.split_metrics(inputs.spec, {"y": y, "outputs": np.concatenate(column)},
                                   "validation", settings=local, baseline=None)
          for column in outputs]


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """The chosen head, the `throughput` block of the joint fit and `metrics.json`'s `search`."""
  model: keras.Model
  fitted: dict[str, Any]
  block: dict[str, Any]


def run_search(name: str, head: str, config: Config, build: Callable[[Config], keras.Model],
               inputs: fitting.RunInputs, run: runs.RunDir, *,
               class_weight: dict[int, float] | None = None, initial_best: float | None = None,
               callbacks: Sequence[keras.callbacks.Callback] = (),
               verbose: int = 2) -> SearchResult:
  """Trains every point of search `name` together and picks one on validation.

  Args:
    name: a search of `SEARCHES` other than `none`.
    head: the head's name (picks the second axis).
    config: the run's settings; each point overrides some of them.
    build: a compiled head for a point's config.
    inputs: the run's batches (the train batches are read once per epoch for all points).
    run: the run directory (`history.csv` of the chosen head goes there).
    class_weight: Keras class weights.
    initial_best: the monitored loss of the heads' common start, the checkpoint to beat.
    callbacks: extra Keras callbacks.
    verbose: Keras `fit` verbosity.
  """
  settings = points(name, head)
  heads = [build(apply(config, point)) for point in settings]
  bank = HeadBank(heads, name=f"search_{head}")
  bank.compile()
  for member in heads:
    member.optimizer.build(member.trainable_variables)
  monitor = "val_loss" if inputs.validation is not None else "loss"
  keep = KeepBestEach(heads, monitor, config.train.early_stopping, initial_best)
  timer = fitting.EpochTimer()
  started = time.perf_counter()
  bank.fit(inputs.train, validation_data=inputs.validation, epochs=config.train.epochs,
           class_weight=class_weight, callbacks=[keep, timer, *callbacks], verbose=verbose,
           shuffle=False)
  seconds = time.perf_counter() - started
  rows = [{"point": index, **point, "setting": label(point), "best_epoch": keep.best_epoch[index],
           f"best_{monitor}": keep.best[index]} for index, point in enumerate(settings)]
  if inputs.validation is not None:
    for row, block in zip(rows, _score(heads, inputs, inputs.settings)):
      row["val_loss"] = block.get("loss")
      row["val_score"] = (-block["mae_px"] if inputs.spec.task == "keypoints"
                          else block["accuracy"])
  else:   # nothing held out: the lowest training loss
    for row in rows:
      row["val_score"], row["val_loss"] = None, None
  key = ((lambda r: (r["val_score"], -r["val_loss"])) if inputs.validation is not None
         else (lambda r: -r["best_loss"]))
  chosen = max(range(len(rows)), key=lambda i: key(rows[i]))
  with tf.io.gfile.GFile(run.history_path, "w") as f:
    f.write(keep.history_csv(chosen))
  scores = [row["val_score"] for row in rows if row["val_score"] is not None]
  block = {"name": name, "points": rows, "chosen": rows[chosen]["setting"],
           "chosen_point": chosen, "val_spread": (max(scores) - min(scores)) if scores else None,
           "chosen_on": "validation" if inputs.validation is not None else "training loss"}
  fitted = fitting.throughput(fitting.FitResult(len(timer.seconds), tuple(timer.seconds),
                                                seconds, False), inputs.num_train)
  fitted["search_points"] = len(settings)
  return SearchResult(heads[chosen], fitted, block)
