"""The Beam sink of stages 1 and 2: (split, serialized Example) -> TFDS-named shards per split.

    files = examples | sinks.WriteSplits(out_dir, layout.IMAGES_NAME, num_shards=0)

The shard descriptions it yields (count, size, sha256) go to `contracts.datasets.group_shards`
and `finalize_dataset`, which write the TFDS metadata and the manifest (see contracts/).
"""
from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam

from contracts import datasets, layout


class WriteSplits(beam.PTransform):
  """(split, serialized Example) -> one shard description dict per shard written.

  Each split goes to its own TFDS-named shard set. Splits that get no records still produce one
  empty shard from Beam's sink; `datasets.group_shards` deletes those so empty splits never appear.
  """

  def __init__(self, out_dir: str, name: str, *, splits: Sequence[str] = layout.SPLITS,
               num_shards: int = 0):
    super().__init__()
    self._out_dir = out_dir
    self._name = name
    self._splits = tuple(splits)
    self._num_shards = num_shards

  def expand(self, pcoll):
    splits = self._splits
    parts = pcoll | "PartitionBySplit" >> beam.Partition(
        lambda kv, _: splits.index(kv[0]), len(splits))
    described = []
    for split, part in zip(splits, parts):
      files = (
          part
          | f"DropSplitKey[{split}]" >> beam.Values()
          | f"WriteShards[{split}]" >> beam.io.WriteToTFRecord(
              layout.shard_prefix(self._out_dir, self._name, split),
              shard_name_template=layout.SHARD_NAME_TEMPLATE,
              num_shards=self._num_shards))
      described.append(files | f"DescribeShards[{split}]" >> beam.Map(datasets.describe_shard,
                                                                       split=split))
    return described | "MergeShardLists" >> beam.Flatten()
