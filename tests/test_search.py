"""The per-head search: settings trained together from one read of each batch, each head's best
epoch kept, the run chosen on validation and only that one evaluated on test.

    .venv/bin/pytest tests/test_search.py -q      # seconds

Synthetic feature datasets from `tests.test_heads_unit`; the compare grid with `--search` runs on
`tests.test_compare`'s MobileNet features of conftest's tiny images.
"""
from __future__ import annotations

import csv

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from heads import caching, compare, config as config_lib, reader, search, training
from tests.test_compare import feature_dir  # noqa: F401  (session fixture)
from tests.test_heads_unit import multiclass_dir, tiny  # noqa: F401


def _counting_reads(monkeypatch) -> tuple[tf.Variable, list[str]]:
  """Counts TFRecords read and the splits `read_split` is asked for."""
  read = tf.Variable(0, dtype=tf.int64)
  real, real_split = tf.data.TFRecordDataset, reader.read_split
  splits: list[str] = []

  def count(record):
    with tf.control_dependencies([read.assign_add(1)]):
      return tf.identity(record)

  def logged_split(spec, split, **kwargs):
    splits.append(split)
    return real_split(spec, split, **kwargs)

  monkeypatch.setattr(tf.data, "TFRecordDataset",
                      lambda *args, **kwargs: real(*args, **kwargs).map(count))
  monkeypatch.setattr(reader, "read_split", logged_split)
  return read, splits


def test_small_search_points_per_head():
  assert len(search.points("small", "mlp")) == 6
  assert {"learning_rate", "dropout"} == set(search.points("small", "conv")[0])
  assert {"learning_rate", "l2"} == set(search.points("small", "gap_dense")[0])
  assert search.points("none", "mlp") == []
  with pytest.raises(ValueError, match="search"):
    config_lib.override(config_lib.Config(), {"train": {"search": "huge"}})


def test_search_picks_by_validation_and_reads_like_one_head(multiclass_dir, tmp_path,
                                                           monkeypatch):
  """Six settings read as many records as one head, and test is read once: for the chosen run."""
  config = tiny(epochs=3, batch_size=8)
  from heads import dataset_stats
  dataset_stats.load(reader.load_spec(str(multiclass_dir)))   # an older dataset's one pass
  read, splits = _counting_reads(monkeypatch)
  caching.release_shared()
  one = training.train(str(multiclass_dir), "mlp", str(tmp_path / "one"), config, verbose=0,
                       export_model=False)
  reads_one, splits_one = int(read.numpy()), list(splits)
  read.assign(0)
  splits.clear()
  caching.release_shared()   # start cold: runs of one process share their parsed input
  searched = training.train(str(multiclass_dir), "mlp", str(tmp_path / "six"),
                            config_lib.override(config, {"train": {"search": "small"}}),
                            verbose=0, export_model=False)
  assert int(read.numpy()) == reads_one and splits == splits_one
  assert splits.count("test") == 1
  block = searched["search"]
  rows = block["points"]
  assert len(rows) == 6 and searched["search_points"] == 6
  best = max(rows, key=lambda row: (row["val_score"], -row["val_loss"]))
  assert block["chosen_point"] == best["point"] and block["chosen"] == best["setting"]
  # The run directory is the chosen head's: its validation score is the table's.
  assert searched["validation"]["accuracy"] == pytest.approx(best["val_score"])
  assert block["val_spread"] == pytest.approx(
      max(r["val_score"] for r in rows) - min(r["val_score"] for r in rows))
  history = list(csv.DictReader((tmp_path / "six" / "history.csv").open()))
  assert len(history) == 3 and set(history[0]) == {"epoch", "loss", "val_loss"}
  assert one["test"]["num_examples"] == searched["test"]["num_examples"]


def test_every_head_gets_its_best_epoch_back_and_patience_stops_the_bank():
  heads = [keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]) for _ in range(2)]
  keep = search.KeepBestEach(heads, "val_loss", patience=2)
  keep.set_model(search.HeadBank(heads))
  keep.model.stop_training = False
  losses = [(1.0, 4.0), (0.5, 5.0), (0.7, 6.0), (0.8, 7.0)]   # head 0 best at 1, head 1 at 0
  for epoch, (first, second) in enumerate(losses):
    for head in heads:
      head.layers[0].kernel.assign(np.full((2, 1), float(epoch), np.float32))
    keep.on_epoch_end(epoch, {"val_loss_0": first, "val_loss_1": second})
    # Head 1 is out of patience after epoch 2, head 0 only after epoch 3: then the bank stops.
    assert keep.model.stop_training == (epoch == 3)
  keep.on_train_end()
  for head, best in zip(heads, (1.0, 0.0)):
    np.testing.assert_array_equal(head.layers[0].kernel.numpy(), np.full((2, 1), best))
  assert keep.best_epoch == [1, 0] and keep.best == [0.5, 4.0]


def test_compare_search_lists_every_setting_and_its_cost(feature_dir, tmp_path):
  result = compare.compare(str(feature_dir), ["linear", "ridge_pooled"], str(tmp_path / "c"),
                           seeds=1, epochs=2, config=tiny(batch_size=8), backbones=["mobilenet"],
                           search="small", report=False, log=lambda line: None)
  table = pd.read_csv(tmp_path / "c" / "search.csv")
  linear = table[table["head"] == "linear"]
  assert len(linear) == 6 * 2 and linear["chosen"].sum() == 2      # 2 feature datasets
  assert set(table["head"]) == {"linear"}                          # ridge sweeps its own strength
  board = pd.read_csv(tmp_path / "c" / "leaderboard.csv")
  assert board.loc[board["head"] == "linear", "search"].notna().all()
  assert board.loc[board["head"] == "ridge_pooled", "search"].isna().all()
  cells = {(c["dataset"], c["head"]): c for c in result.ledger["cells"]}
  assert {c["settings_per_run"] for (_, head), c in cells.items() if head == "linear"} == {6}
  page = (tmp_path / "c" / "leaderboard.md").read_text()
  assert "search: 12 settings trained in 2 runs" in page
