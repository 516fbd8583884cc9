"""Per-split statistics (contracts.statistics) and where a head's cache lives (heads.caching)."""
from __future__ import annotations

import types

import numpy as np
import pytest

from contracts import statistics as stats_lib
from heads import caching


def test_accumulator_merges_batches_exactly_and_skips_views():
  rng = np.random.default_rng(0)
  pooled = rng.normal(3.0, 2.0, (103, 5)).astype(np.float32)
  labels = rng.integers(0, 3, 103)
  views = np.where(np.arange(103) % 4 == 3, 1, 0)
  acc = stats_lib.Accumulator.empty()
  for start in range(0, 103, 10):   # uneven batches, merged in order
    part = slice(start, start + 10)
    acc = acc.add(pooled=pooled[part], labels=labels[part], views=views[part])
  originals = pooled[views == 0].astype(np.float64)
  stats = stats_lib.finish({"train": acc})
  block = stats["splits"]["train"]
  assert block["examples"] == int((views == 0).sum())
  assert block["class_counts"] == np.bincount(labels[views == 0], minlength=3).tolist()
  np.testing.assert_allclose(block["pooled_mean"], originals.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(block["pooled_variance"], originals.var(axis=0), rtol=1e-10)
  mean, variance = stats_lib.standardisation(stats)
  assert mean.dtype == np.float32 and variance.min() >= stats_lib.MIN_VARIANCE
  weights = stats_lib.class_weights(stats, 3)
  counts = np.bincount(labels[views == 0], minlength=3)
  assert weights == {i: counts.sum() / (3 * c) for i, c in enumerate(counts)}


def test_merge_is_order_free():
  rng = np.random.default_rng(1)
  parts = [stats_lib.Accumulator.empty().add(pooled=rng.normal(size=(n, 3)),
                                             targets=rng.uniform(size=(n, 2, 2)))
           for n in (1, 7, 30)]
  forward = parts[0].merge(parts[1]).merge(parts[2]).to_dict()
  backward = parts[2].merge(parts[0].merge(parts[1])).to_dict()
  for key in ("pooled_mean", "pooled_variance", "targets_mean"):
    np.testing.assert_allclose(forward[key], backward[key], rtol=1e-12)
  assert forward["examples"] == 38


def _spec(examples: int, views: int = 0):
  manifest = {"splits": {"train": {"num_examples": examples * (1 + views)},
                         "validation": {"num_examples": examples // 4}}, "views": views}
  spec = types.SimpleNamespace(feature_map_shape=(9, 9, 512), pooled_dim=512, image_size=96,
                               num_keypoints=0, cache_key="k" * 64, manifest=manifest)
  spec.num_examples = lambda split, views=True: (
      manifest["splits"][split]["num_examples"] if views or split != "train"
      else manifest["splits"][split]["num_examples"] // (1 + manifest["views"]))
  return spec


def test_cache_plan_picks_memory_file_or_none(tmp_path):
  spec = _spec(1000)
  per = caching.bytes_per_example(spec, "map")
  assert per == 9 * 9 * 512 * 2 + 16
  needed = 1250 * per
  plan = caching.plan_cache(spec, "map", ("train", "validation"), budget=needed, cache_dir=None,
                            run_dir=str(tmp_path))
  assert plan.where == "memory" and plan.bytes_needed == needed
  plan = caching.plan_cache(spec, "map", ("train", "validation"), budget=needed - 1,
                            cache_dir=str(tmp_path / "c"))
  assert plan.where == "file" and "exceeds" in plan.reason
  assert plan.file_prefix("train", "abc") == f"{tmp_path}/c/abc-train"
  plan = caching.plan_cache(spec, "map", ("train",), budget=1, cache_dir="gs://bucket/cache")
  assert plan.where == "none" and "not on local disk" in plan.reason
  # Augmented views count only when the run reads them.
  with_views = _spec(1000, views=2)
  assert caching.plan_cache(with_views, "pooled", ("train",), budget=10**12,
                            cache_dir=None).bytes_needed == 1000 * (512 * 4 + 16)
  assert caching.plan_cache(with_views, "pooled", ("train",), budget=10**12, cache_dir=None,
                            views=True).bytes_needed == 3000 * (512 * 4 + 16)


def test_an_unfinished_file_cache_is_cleared_and_a_finished_one_kept(tmp_path):
  prefix = str(tmp_path / "key-train")
  (tmp_path / "key-train_0.lockfile").write_text("")
  (tmp_path / "key-train.data-00000-of-00001").write_text("half")
  caching.clear_partial(prefix)
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "key-train.index").write_text("")
  (tmp_path / "key-train.data-00000-of-00001").write_text("whole")
  caching.clear_partial(prefix)
  assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("text,expected", [("1MB", 10**6), ("512MiB", 512 * 2**20),
                                           ("2gib", 2 * 2**30), ("1000", 1000)])
def test_cache_budget_sizes(text, expected):
  from contracts import cli
  assert cli.size_bytes(text) == expected


def test_features_export_npy_and_parquet_equal_the_dataset(tmp_path):
  """Issue 14.5: pooled vectors, maps, ids and labels leave headstart without TensorFlow."""
  import pyarrow.parquet as pq

  from heads import feature_export
  from tests.test_heads_unit import write_feature_dataset
  data = write_feature_dataset(tmp_path / "features", views_in_train=1)
  summary = feature_export.export_features(str(data), str(tmp_path / "npy"), maps=True)
  assert summary["counts"] == {"train": 24, "validation": 8, "test": 8}   # views left out
  ids = np.load(tmp_path / "npy" / "test" / "ids.npy")
  pooled = np.load(tmp_path / "npy" / "test" / "pooled.npy")
  maps = np.load(tmp_path / "npy" / "test" / "maps.npy")
  labels = np.load(tmp_path / "npy" / "test" / "labels.npy")
  assert ids[0] == b"test-0" and labels.tolist() == [i % 2 for i in range(8)]
  assert maps.dtype == np.float16 and maps.shape == (8, 3, 3, 4)
  np.testing.assert_allclose(pooled, maps.astype(np.float32).mean(axis=(1, 2)), atol=1e-2)
  feature_export.export_features(str(data), str(tmp_path / "pq"), fmt="parquet")
  table = pq.read_table(tmp_path / "pq" / "test.parquet").to_pydict()
  assert table["id"] == [i.decode() for i in ids] and table["label"] == labels.tolist()
  np.testing.assert_array_equal(np.asarray(table["pooled"], np.float32), pooled)
  with pytest.raises(ValueError, match="'csv'"):
    feature_export.export_features(str(data), str(tmp_path / "x"), fmt="csv")
