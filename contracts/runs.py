"""A stage-3 run directory: what `headstart train`/`finetune` write and everything else reads.

    run = runs.RunDir("runs/x")
    config, metrics = run.load()          # DatasetError unless the run finished
    run.write_metrics(result)             # written last: its presence means "finished"

Layout: `config.json` (written first), `history.csv`, `checkpoints/best.weights.h5`,
`backup/` (while unfinished), `head.keras`, `model.keras` (raw images in),
`predictions_test.csv` and `metrics.json` (written last). A compare grid keeps one run per
cell and seed under `OUT/cells/<dataset>/<head>/seed<k>`.
"""
from __future__ import annotations

import csv
import dataclasses
from typing import Any

import tensorflow as tf

from contracts import datasets
from contracts.layout import DatasetError

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.csv"
HEAD_NAME = "head.keras"
MODEL_NAME = "model.keras"
PREDICTIONS_NAME = "predictions_test.csv"
BEST_WEIGHTS = "checkpoints/best.weights.h5"
BACKUP_DIR = "backup"
CELLS_DIR = "cells"


@dataclasses.dataclass(frozen=True)
class RunDir:
  """Paths and JSON documents of one run directory (local or `gs://`)."""
  path: str

  def __post_init__(self):
    object.__setattr__(self, "path", self.path.rstrip("/"))

  def file(self, name: str) -> str:
    return f"{self.path}/{name}"

  config_path = property(lambda self: self.file(CONFIG_NAME))
  metrics_path = property(lambda self: self.file(METRICS_NAME))
  history_path = property(lambda self: self.file(HISTORY_NAME))
  head_path = property(lambda self: self.file(HEAD_NAME))
  model_path = property(lambda self: self.file(MODEL_NAME))
  predictions_path = property(lambda self: self.file(PREDICTIONS_NAME))
  best_weights_path = property(lambda self: self.file(BEST_WEIGHTS))
  backup_dir = property(lambda self: self.file(BACKUP_DIR))

  def exists(self, name: str) -> bool:
    return tf.io.gfile.exists(self.file(name))

  @property
  def finished(self) -> bool:
    """True once `metrics.json` (written last) exists."""
    return self.exists(METRICS_NAME)

  @property
  def unfinished(self) -> bool:
    """True while a resumable fit's backup is there."""
    return self.exists(BACKUP_DIR)

  def config(self) -> dict[str, Any] | None:
    """`config.json`, or None before the run started."""
    return datasets.read_json(self.config_path) if self.exists(CONFIG_NAME) else None

  def metrics(self) -> dict[str, Any]:
    """`metrics.json` of a finished run.

    Raises:
      DatasetError: the run has not finished.
    """
    self._require_finished()
    return datasets.read_json(self.metrics_path)

  def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(config.json, metrics.json)` of a finished run.

    Raises:
      DatasetError: the directory holds no finished run.
    """
    self._require_finished()
    return datasets.read_json(self.config_path), datasets.read_json(self.metrics_path)

  def history(self) -> list[dict[str, str]]:
    """Rows of `history.csv` (empty when there is none)."""
    return self._csv_rows(HISTORY_NAME)

  def predictions(self) -> list[dict[str, str]]:
    """Rows of `predictions_test.csv` (empty when there is none)."""
    return self._csv_rows(PREDICTIONS_NAME)

  def write_config(self, config: dict[str, Any]) -> None:
    tf.io.gfile.makedirs(self.path)
    datasets.write_json(self.config_path, config)

  def write_metrics(self, metrics: dict[str, Any]) -> None:
    datasets.write_json(self.metrics_path, metrics)

  def _csv_rows(self, name: str) -> list[dict[str, str]]:
    if not self.exists(name):
      return []
    with tf.io.gfile.GFile(self.file(name), "r") as f:
      return list(csv.DictReader(f))

  def _require_finished(self) -> None:
    if not self.finished:
      raise DatasetError(f"{self.path!r} is not a finished headstart run (no {METRICS_NAME})")


def cell_dir(out_dir: str, dataset: str, head: str, seed: int) -> RunDir:
  """The run directory of one compare cell and seed."""
  return RunDir(f"{out_dir.rstrip('/')}/{CELLS_DIR}/{dataset}/{head}/seed{seed}")
