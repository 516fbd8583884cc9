"""Runs a published transfer-learning experiment end to end and checks its expected metrics.

    headstart reproduce configs/gender_faces.py --tiny          # CI variant on data/sample, ~20 s
    headstart reproduce configs/gender_faces.py --source ~/data/faces/manifest.csv   # the real one

A config (`configs/*.py`) has `get_config(tiny: bool) -> dict` with:

- `name`, `published` (source and figure), `data` (what the user must supply: `description`,
  and the ingest `flags`);
- `sample` (tiny only): a manifest from `data/sample/` (`csv`, `rows`: how many rows to keep,
  evenly spaced; `layout`: `csv` or `split_tree`, which copies the rows into
  `root/<split>/<class>/` to exercise the folder-tree source);
- `ingest`: extra `headstart ingest` flags; `extract`: a list of flag lists, one
  `headstart extract` call each (e.g. ImageNet weights, then the same backbone at random init);
- `compare`: `heads`, `seeds`, `epochs`, optional `pairs` (`[backbone, head]` cells to train) and
  `config` (`{"train": {...}, "head": {...}}`, see `heads.config`);
- `expect`: checks on leaderboard cells, each naming a cell (`backbone`, `head`, optional
  `weights`), a `split` (`test` or `validation`) and either `value` +- `tolerance`, a range
  `at_least`/`at_most`, or `beats` (another cell, optionally by `margin`).

All stages run in this process (ingest -> extract -> compare); every check prints PASS or FAIL
with the measured number, and the exit code is 0 only if all pass. Nothing is hard-coded: the
numbers come from the leaderboard this run wrote.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
import runpy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from contracts import cli
from heads import compare as compare_lib
from heads import config as config_lib
from heads import leaderboard

REQUIRED_KEYS = ("name", "published", "data", "ingest", "extract", "compare", "expect")
SPLIT_COLUMNS = {"test": "test_mean", "validation": "val_mean"}


def load_experiment(path: str, *, tiny: bool) -> dict[str, Any]:
  """Runs the config file's `get_config(tiny=...)` and checks its keys.

  Raises:
    ValueError: missing file, no `get_config`, or missing keys.
  """
  if not tf.io.gfile.exists(path):
    raise ValueError(f"config {path!r} does not exist; see configs/ for the experiments")
  get_config = runpy.run_path(path).get("get_config")
  if get_config is None:
    raise ValueError(f"config {path!r} defines no get_config(tiny)")
  experiment = dict(get_config(tiny=tiny))
  missing = [key for key in REQUIRED_KEYS if key not in experiment]
  if tiny and "sample" not in experiment:
    missing.append("sample")
  if missing:
    raise ValueError(f"config {path!r} lacks {', '.join(missing)}")
  return experiment


def _repo_root(config_path: str) -> pathlib.Path:
  # Configs live in <repo>/configs/, and sample paths in them are relative to the repository.
  return pathlib.Path(config_path).resolve().parent.parent


def _evenly_spaced(rows: list[list[str]], count: int) -> list[list[str]]:
  if count >= len(rows):
    return rows
  return [rows[(index * len(rows)) // count] for index in range(count)]


def prepare_sample(sample: Mapping[str, Any], repo_root: pathlib.Path,
                   out: str) -> tuple[str, list[str]]:
  """Writes the tiny variant's source (a CSV subset or a split tree) under `out/source`.

  Returns:
    `(source path for ingest, extra ingest flags)`.

  Raises:
    ValueError: a bad `layout` or a missing sample manifest.
  """
  manifest = repo_root / sample["csv"]
  if not manifest.exists():
    raise ValueError(f"sample manifest {str(manifest)!r} does not exist")
  with manifest.open(newline="") as f:
    reader = csv.reader(f)
    header = next(reader)
    rows = _evenly_spaced(list(reader), int(sample["rows"]))
  folder = manifest.parent
  target = f"{out}/source"
  tf.io.gfile.makedirs(target)
  layout = sample.get("layout", "csv")
  if layout == "csv":
    # Absolute paths + --allow-root keep ids relative to the sample folder (same on every clone).
    url_index = header.index(sample.get("url_column", "image_url"))
    for row in rows:
      row[url_index] = str((folder / row[url_index]).resolve())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path = f"{target}/manifest.csv"
    with tf.io.gfile.GFile(path, "w") as f:
      f.write(buffer.getvalue())
    return path, ["--allow-root", str(folder.resolve())]
  if layout == "split_tree":
    url_index = header.index(sample.get("url_column", "image_url"))
    label_index = header.index(sample["label_column"])
    train_every = int(sample.get("validation_every", 4))
    for index, row in enumerate(rows):
      # Every n-th image goes to val: a fixed split like the published train/val folders.
      split = "val" if index % train_every == train_every - 1 else "train"
      name = pathlib.Path(row[url_index]).name
      tf.io.gfile.makedirs(f"{target}/{split}/{row[label_index]}")
      tf.io.gfile.copy(str(folder / row[url_index]), f"{target}/{split}/{row[label_index]}/{name}",
                       overwrite=True)
    return target, []
  raise ValueError(f"sample layout {layout!r} is not one of csv, split_tree")


@dataclasses.dataclass(frozen=True)
class Check:
  """One expectation and its outcome."""
  description: str
  measured: float | None
  expected: str
  passed: bool

  def line(self) -> str:
    value = "-" if self.measured is None else f"{self.measured:.4f}"
    """`PASS  <cell> <split> <metric>: <measured> (expected ...)`."""
    verdict = "PASS" if self.passed else "FAIL"
    return f"{verdict}  {self.description}: {value} (expected {self.expected})"


def find_cell(rows: Sequence[Mapping[str, Any]],
              spec: Mapping[str, Any]) -> Mapping[str, Any] | None:
  """The leaderboard row matching `backbone`, `head` and (optionally) `weights` of `spec`."""
  for row in rows:
    if row["head"] != spec["head"]:
      continue
    if spec.get("backbone") and spec["head"] != "scratch" and row["backbone"] != spec["backbone"]:
      continue
    if spec.get("weights") and row["weights"] != leaderboard.weights_label(spec["weights"]):
      continue
    return row
  return None


def _cell_name(spec: Mapping[str, Any]) -> str:
  if spec["head"] == "scratch":
    return "from-scratch CNN"
  weights = f" [{leaderboard.weights_label(spec['weights'])}]" if spec.get("weights") else ""
  return f"{spec.get('backbone', '?')}{weights} / {spec['head']}"


def check_expectation(rows: Sequence[Mapping[str, Any]], spec: Mapping[str, Any]) -> Check:
  """Evaluates one `expect` entry against the leaderboard rows.

  Raises:
    ValueError: an unknown split or an entry with no comparison.
  """
  split = spec.get("split", "test")
  if split not in SPLIT_COLUMNS:
    raise ValueError(f"expect split {split!r} is not one of {', '.join(SPLIT_COLUMNS)}")
  column = SPLIT_COLUMNS[split]
  row = find_cell(rows, spec)
  metric = row["metric"] if row else spec.get("metric", "metric")
  description = f"{_cell_name(spec)} {split} {metric}"
  measured = None if row is None else row[column]
  if "beats" in spec:
    other_spec = {**spec, **spec["beats"]}
    other_spec.pop("beats", None)
    other = find_cell(rows, other_spec)
    other_value = None if other is None else other[column]
    margin = float(spec.get("margin", 0.0))
    lower = row is not None and row["better"] == "lower"
    passed = measured is not None and other_value is not None and (
        measured <= other_value - margin if lower else measured >= other_value + margin)
    relation = "<=" if lower else ">="
    other_text = "missing" if other_value is None else f"{other_value:.4f}"
    expected = (f"{relation} {_cell_name(other_spec)} {other_text}"
                + (f" {'-' if lower else '+'} {margin}" if margin else ""))
    return Check(description, measured, expected, passed)
  if "value" in spec:
    low = spec["value"] - spec.get("tolerance", 0.0)
    high = spec["value"] + spec.get("tolerance", 0.0)
    expected = f"{spec['value']} +- {spec.get('tolerance', 0.0)}"
  elif "at_least" in spec or "at_most" in spec:
    low, high = spec.get("at_least", float("-inf")), spec.get("at_most", float("inf"))
    expected = " and ".join(part for part in (
        f">= {spec['at_least']}" if "at_least" in spec else "",
        f"<= {spec['at_most']}" if "at_most" in spec else "") if part)
  else:
    raise ValueError(f"expect entry {dict(spec)!r} has no value, at_least/at_most or beats")
  passed = measured is not None and low <= measured <= high
  return Check(description, measured, expected if row else expected + "; cell missing", passed)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """A reproduce run: its checks, and whether all passed."""
  name: str
  out_dir: str
  checks: tuple[Check, ...]
  compare: compare_lib.CompareResult

  @property
  def passed(self) -> bool:
    return bool(self.checks) and all(check.passed for check in self.checks)


def reproduce(config_path: str, *, tiny: bool = False, source: str | None = None,
              out: str | None = None, beam_args: Sequence[str] = (),
              log: Callable[[str], None] = compare_lib.say) -> Outcome:
  """Runs ingest -> extract -> compare for a config and checks its expectations.

  Args:
    config_path: `configs/<name>.py`.
    tiny: run the CI variant on `data/sample` instead of the published data.
    source: the user's copy of the published data (full variant; default: the config's
      `data.source`).
    out: output folder (default `runs/reproduce/<name>[-tiny]`).
    beam_args: Beam pipeline options for all three stages (ingest, extract, the compare grid).
    log: where progress and PASS/FAIL lines go.

  Raises:
    ValueError: bad config, or the full variant's data is missing.
  """
  from features import run as extract
  from pipeline import run as ingest

  experiment = load_experiment(config_path, tiny=tiny)
  name = experiment["name"] + ("-tiny" if tiny else "")
  out = (out or f"runs/reproduce/{name}").rstrip("/")
  log(f"reproduce {name}: {experiment['published']}")
  if tiny:
    source_path, source_flags = prepare_sample(experiment["sample"], _repo_root(config_path), out)
  else:
    source_path, source_flags = source or experiment["data"].get("source"), []
    if not source_path or not tf.io.gfile.exists(source_path):
      raise ValueError(f"data {source_path!r} for {experiment['name']!r} not found; supply "
                       f"{experiment['data']['description']} with --source (or run --tiny)")
  images, features = f"{out}/images", f"{out}/features"
  ingest.run(["--source", source_path, "--out", images, *source_flags, *experiment["ingest"],
              *beam_args])
  for flags in experiment["extract"]:
    extract.run(["--images", images, "--out", features, *flags, *beam_args])
  settings = experiment["compare"]
  config = config_lib.override(config_lib.Config(), settings.get("config", {}))
  result = compare_lib.compare(
      features, settings["heads"], f"{out}/compare", seeds=int(settings.get("seeds", 1)),
      epochs=settings.get("epochs"), config=config,
      pairs=[tuple(pair) for pair in settings["pairs"]] if settings.get("pairs") else None,
      log=log, beam_args=beam_args)
  log(leaderboard.markdown_table(result.rows))
  checks = tuple(check_expectation(result.rows, spec) for spec in experiment["expect"])
  for check in checks:
    log(check.line())
  outcome = Outcome(name, out, checks, result)
  log(f"reproduce {name}: {'PASS' if outcome.passed else 'FAIL'} "
      f"({sum(c.passed for c in checks)}/{len(checks)} checks); report {result.report}")
  return outcome


def main(argv: list[str]) -> int:
  """`headstart reproduce`: runs a config's stages and prints PASS/FAIL per expected cell.

  Unknown flags are Beam pipeline options, passed to every Beam stage (e.g. the Dataflow flags
  in the README), so a published experiment reproduces on any runner.
  """
  parser = cli.Parser(prog="headstart reproduce", description=__doc__.splitlines()[0])
  parser.add_argument("config", help="configs/<experiment>.py")
  parser.add_argument("--tiny", action="store_true", help="the CI variant on data/sample")
  parser.add_argument("--source", help="your copy of the experiment's data (full variant)")
  parser.add_argument("--out", help="output folder (default runs/reproduce/<name>[-tiny])")
  args, beam_args = parser.parse_known_args(argv)
  outcome = reproduce(args.config, tiny=args.tiny, source=args.source, out=args.out,
                      beam_args=beam_args)
  return 0 if outcome.passed else 1
