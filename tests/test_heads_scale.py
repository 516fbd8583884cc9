"""Stage 3 at scale (issue 14): a budgeted cache gives the in-memory metrics, no full pass before
`fit`, a grid reads its data once, and the grid runs as Beam elements with the same numbers."""
from __future__ import annotations

import json
import threading
import time

import pandas as pd
import pytest

from contracts import layout
from heads import caching, compare, compiled, config as config_lib, dataset_stats, reader
from heads import training
from tests.test_heads_unit import _Interrupt, write_feature_dataset


def _tiny(epochs: int = 3, **train):
  config = config_lib.tiny()
  return config_lib.override(config, {"train": {"epochs": epochs, **train}})


@pytest.fixture
def features(tmp_path):
  return write_feature_dataset(tmp_path / "features", counts={"train": 40, "validation": 12,
                                                             "test": 12})


def _metrics_without_timing(result):
  return {split: {k: v for k, v in result[split].items()} for split in ("validation", "test")}


def test_budgeted_cache_file_or_stream_equals_in_memory(features, tmp_path):
  caching.release_shared()
  memory = training.train(str(features), "gap_dense", str(tmp_path / "memory"), _tiny(),
                          verbose=0, export_model=False)
  assert memory["input_cache"]["where"] == "memory"
  caching.release_shared()
  on_disk = training.train(str(features), "gap_dense", str(tmp_path / "file"), _tiny(),
                           verbose=0, export_model=False, cache_budget=1000)
  assert on_disk["input_cache"]["where"] == "file" and "exceeds" in on_disk["input_cache"][
      "reason"]
  assert list((tmp_path / "file" / "cache").glob("*.index"))   # a finished tf.data file cache
  caching.release_shared()
  streamed = training.train(str(features), "gap_dense", str(tmp_path / "stream"), _tiny(),
                            verbose=0, export_model=False, cache_budget=1000,
                            cache_dir="gs://nowhere/cache")
  assert streamed["input_cache"]["where"] == "none"
  assert _metrics_without_timing(memory) == _metrics_without_timing(on_disk) == \
      _metrics_without_timing(streamed)


def test_no_pass_over_the_data_before_fit_when_statistics_are_known(features, tmp_path,
                                                                   monkeypatch):
  stats = dataset_stats.load(reader.load_spec(str(features)))  # an older dataset: one pass, kept
  assert stats["splits"]["train"]["examples"] == 40
  assert (features / "statistics.json").exists()

  def no_second_pass(spec):
    raise AssertionError("statistics were computed again")

  monkeypatch.setattr(dataset_stats, "compute", no_second_pass)
  caching.release_shared()
  before = {split: reader.records_read(str(features), split) for split in layout.SPLITS}
  training.train(str(features), "linear", str(tmp_path / "run"), _tiny(epochs=4), verbose=0,
                 export_model=False)
  reads = {split: reader.records_read(str(features), split) - before[split]
           for split in layout.SPLITS}
  # Four epochs and the evaluation read each split once: the first pass fills the cache.
  assert reads == {"train": 40, "validation": 12, "test": 12}


def test_a_grid_reads_each_dataset_once(features, tmp_path):
  index_dir = features.parent
  (index_dir / "index.json").write_text(json.dumps({"datasets": [
      {"dir": features.name, "backbone": "tiny", "weights_kind": "none", "cache_key": "k1"}]}))
  caching.release_shared()
  before = {split: reader.records_read(str(features), split) for split in layout.SPLITS}
  result = compare.compare(str(index_dir), ["linear", "gap_dense"], str(tmp_path / "grid"),
                           seeds=2, config=_tiny(epochs=2), report=False, log=lambda _: None,
                           parallel_runs=2)
  reads = {split: reader.records_read(str(features), split) - before[split]
           for split in layout.SPLITS}
  assert len(result.seed_rows) == 4
  # 4 runs, the last three two at a time: one read of each split.
  assert reads == {"train": 40, "validation": 12, "test": 12}


def test_runs_trained_at_once_equal_runs_trained_one_at_a_time(features, tmp_path):
  # mlp: dropout and initial weights draw from the seeds each run's build must get alone.
  index_dir = features.parent
  (index_dir / "index.json").write_text(json.dumps({"datasets": [
      {"dir": features.name, "backbone": "tiny", "weights_kind": "none", "cache_key": "k1"}]}))
  busy, overlap, lock = [0], [0], threading.Lock()

  def train_one(cell, seed, run, config):
    with lock:
      busy[0] += 1
      overlap[0] = max(overlap[0], busy[0])
    try:
      time.sleep(0.2)   # so the runs of a two-thread pool surely meet
      return compare.train_cell(cell, seed, run, config)
    finally:
      with lock:
        busy[0] -= 1

  predictions = {}
  for parallel in (1, 2):
    caching.release_shared()
    out = tmp_path / f"parallel{parallel}"
    overlap[0] = 0
    result = compare.compare(str(index_dir), ["linear", "mlp"], str(out), seeds=3,
                             config=_tiny(epochs=2), report=False, log=lambda _: None,
                             train_one=train_one, parallel_runs=parallel)
    assert overlap[0] == parallel
    assert result.ledger["parallel_runs"] == parallel
    predictions[parallel] = {(head, seed): (out / "cells" / features.name / head / f"seed{seed}"
                                            / "predictions_test.csv").read_text()
                             for head in ("linear", "mlp") for seed in range(3)}
  assert predictions[1] == predictions[2]
  assert predictions[1]["mlp", 0] != predictions[1]["mlp", 1]   # the seeds do differ


def test_beam_grid_in_worker_processes_equals_the_in_process_grid(features, tmp_path):
  index_dir = features.parent
  (index_dir / "index.json").write_text(json.dumps({"datasets": [
      {"dir": features.name, "backbone": "tiny", "weights_kind": "none", "cache_key": "k1"}]}))
  kwargs = dict(seeds=1, config=_tiny(epochs=2), report=False, log=lambda _: None)
  compare.compare(str(index_dir), ["linear", "gap_dense"], str(tmp_path / "local"), **kwargs)
  compare.compare(str(index_dir), ["linear", "gap_dense"], str(tmp_path / "beam"),
                  beam_args=["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                  **kwargs)
  local = pd.read_csv(tmp_path / "local" / "leaderboard.csv")
  beam = pd.read_csv(tmp_path / "beam" / "leaderboard.csv")
  columns = ["dataset", "head", "test_mean", "val_mean", "params"]
  assert len(local) == 2
  assert local[columns].sort_values("head").to_dict("records") == \
      beam[columns].sort_values("head").to_dict("records")


def test_runs_sharing_a_compiled_head_train_as_runs_alone(features, tmp_path):
  # mlp: dropout draws from a seed state the shared model must take from each run's own build.
  config = _tiny(epochs=2)
  alone = {}
  for seed in (0, 1):
    caching.release_shared()   # a new process: nothing compiled yet
    training.train(str(features), "mlp", str(tmp_path / f"alone{seed}"),
                   config_lib.override(config, {"train": {"seed": seed}}), verbose=0,
                   export_model=False)
    alone[seed] = (tmp_path / f"alone{seed}" / "predictions_test.csv").read_text()
  caching.release_shared()
  shared = []
  for seed in (1, 0):   # the second run reuses the first one's compiled model
    training.train(str(features), "mlp", str(tmp_path / f"shared{seed}"),
                   config_lib.override(config, {"train": {"seed": seed}}), verbose=0,
                   export_model=False)
    shared.append(compiled.shared_count())
    assert (tmp_path / f"shared{seed}" / "predictions_test.csv").read_text() == alone[seed]
  assert shared == [1, 1]
  assert alone[0] != alone[1]


def test_a_resumed_run_does_not_shorten_the_next_run_sharing_its_head(features, tmp_path):
  config = _tiny(epochs=3)
  caching.release_shared()
  with pytest.raises(KeyboardInterrupt):
    training.train(str(features), "linear", str(tmp_path / "a"), config, verbose=0,
                   export_model=False, callbacks=[_Interrupt(after_epoch=2)])
  resumed = training.train(str(features), "linear", str(tmp_path / "a"), config, verbose=0,
                           export_model=False)
  assert resumed["resumed"] and resumed["epochs_this_session"] < 3
  # Keras' resume hook set the shared model's starting epoch: the next run must not inherit it.
  after = training.train(str(features), "linear", str(tmp_path / "b"),
                         config_lib.override(config, {"train": {"seed": 1}}), verbose=0,
                         export_model=False)
  assert compiled.shared_count() == 1
  assert after["epochs"] == 3 and after["epochs_this_session"] == 3


def test_cached_train_split_holds_no_ids_and_evaluated_splits_do(features):
  """Only evaluated splits carry ids (predictions); the train split's per-epoch input is
  cheaper without them."""
  caching.release_shared()
  spec = reader.load_spec(str(features))
  train = caching.cached_split(spec, "train", input_kind="pooled")
  test = caching.cached_split(spec, "test", input_kind="pooled")
  assert set(train.element_spec) == {"x", "y"}
  assert set(test.element_spec) == {"x", "y", "id"}
  assert sum(1 for _ in train) == 40 and len({r["id"].numpy() for r in test}) == 12
  caching.release_shared()


def test_weight_saves_build_keras_skip_sets_once(features, tmp_path):
  """Keras 3.15 rebuilds its saving skip sets on every save (it reads them under another key
  than it stores them); `heads.fitting` keeps one per type, so a grid's saves reuse them."""
  from keras.src.saving import saving_lib
  skipsets = getattr(saving_lib, "get_attr_skipset", None)
  if skipsets is None:
    pytest.skip("this Keras has no get_attr_skipset to cache")
  assert hasattr(skipsets, "cache_info"), "heads.fitting did not cache Keras' skip sets"
  training.train(str(features), "linear", str(tmp_path / "a"), _tiny(epochs=2), verbose=0,
                 export_model=False)
  built = skipsets.cache_info().misses
  training.train(str(features), "linear", str(tmp_path / "b"), _tiny(epochs=2, seed=1),
                 verbose=0, export_model=False)
  assert skipsets.cache_info().misses == built and skipsets.cache_info().hits > 0
