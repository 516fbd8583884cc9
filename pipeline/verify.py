"""`headstart verify DIR`: checks an image or feature dataset against its manifest.

    headstart verify out/sample/images
    headstart verify out/sample/features/mobilenet-imagenet-3fa2c1d0

For every shard listed in `manifest.json`: the file is present, its sha256 and byte size match,
every record's CRC is intact and the record count matches, and the first record holds every
feature key of `features.json`. Prints one verdict line per shard and exits non-zero on any
problem. Works on local and gs:// paths.
"""
from __future__ import annotations

import json
import re

import tensorflow as tf

from contracts import cli, datasets


def _feature_keys(data_dir: str) -> set[str]:
  with tf.io.gfile.GFile(f"{data_dir}/features.json") as f:
    spec = json.load(f)
  # features.json: {"featuresDict": {"features": {name: {...}}}} (TFDS' proto-as-JSON layout)
  return set(spec.get("featuresDict", {}).get("features", {}))


def verify_shard(path: str, expected: dict, feature_keys: set[str]) -> list[str]:
  """Returns the problems found in one shard (empty when it is intact)."""
  if not tf.io.gfile.exists(path):
    return ["missing"]
  problems = []
  size = tf.io.gfile.stat(path).length
  if size != expected["num_bytes"]:
    problems.append(f"size {size} != {expected['num_bytes']}")
  if datasets.file_sha256(path) != expected["sha256"]:
    problems.append("sha256 mismatch")
  try:
    count = datasets.count_records(path)
  except tf.errors.DataLossError as error:
    found = re.search(r"corrupted record at \d+|truncated record at \d+", error.message)
    return problems + [f"corrupt: {found.group(0) if found else 'unreadable records'}"]
  if count != expected["num_examples"]:
    problems.append(f"{count} records != {expected['num_examples']}")
  if count and feature_keys:
    first = next(iter(tf.data.TFRecordDataset(path).take(1))).numpy()
    keys = set(tf.train.Example.FromString(first).features.feature)
    if not feature_keys <= keys:
      problems.append(f"schema: missing keys {sorted(feature_keys - keys)}")
  return problems


def verify(data_dir: str) -> bool:
  """Prints one line per shard; returns True when the whole dataset is intact."""
  data_dir = data_dir.rstrip("/")
  manifest = datasets.read_manifest(data_dir)
  keys = _feature_keys(data_dir) if tf.io.gfile.exists(f"{data_dir}/features.json") else set()
  all_ok = bool(keys)
  if not keys:
    print(f"FAIL {data_dir}/features.json: missing")
  for split, entry in manifest["splits"].items():
    for shard in entry["shards"]:
      problems = verify_shard(f"{data_dir}/{shard['file']}", shard, keys)
      all_ok &= not problems
      verdict = "ok  " if not problems else "FAIL"
      detail = f"{shard['num_examples']} records" if not problems else "; ".join(problems)
      print(f"{verdict} {shard['file']}: {detail}")
  print(f"{'verified' if all_ok else 'PROBLEMS FOUND in'} {data_dir} "
        f"({manifest.get('kind', 'dataset')}, {sum(e['num_examples'] for e in manifest['splits'].values())} records)")
  return all_ok


def main(argv: list[str] | None = None) -> int:
  """Console entry: exit code 0 when intact, 1 on any problem."""
  parser = cli.Parser(prog="headstart verify", description=__doc__.split("\n\n")[2])
  parser.add_argument("data_dir", help="an image or feature dataset directory")
  args = parser.parse_args(argv)
  return 0 if verify(args.data_dir) else 1
