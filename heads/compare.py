"""Every head on every backbone's cached features, several seeds each: leaderboard + cost ledger.

    headstart compare --features out/features --heads linear,mlp,conv --seeds 3 --out runs/compare
    # sample data (2 feature datasets x 3 heads x 3 seeds, 96 px): about a minute on 2 CPU cores

Reads `FEATURES/index.json` (written by `headstart extract`) and trains one run per cell and seed
in process (`heads.training.train`) into `OUT/cells/<feature dataset dir>/<head>/seed<k>`. A
seed whose `metrics.json` exists is not trained again, so an interrupted grid resumes where it
stopped. Writes, at the top of `OUT`:

- `leaderboard.csv`: one row per (feature dataset, head) cell, mean and std over seeds;
- `leaderboard_seeds.csv`: one row per seed run;
- `leaderboard.md` (markdown table + cost-ledger lines) and `leaderboard.png`;
- `cost_ledger.json`: extraction seconds per backbone (paid once), head seconds per cell, and
  what the grid would have cost with the frozen backbone run in every epoch instead;
- `report.html` (see `heads.report`): the leaderboard plus the best cell's plots.

The head `scratch` trains a small CNN on the images themselves (the image dataset the features
were extracted from), once, as the no-transfer baseline; its row's backbone is
`none (from scratch)`.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from contracts import datasets, layout
from heads import config as config_lib
from heads import zoo

CELLS_DIR = "cells"
SCRATCH_DIR = "from-scratch"
LEADERBOARD_CSV = "leaderboard.csv"
SEEDS_CSV = "leaderboard_seeds.csv"
LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_PNG = "leaderboard.png"
LEDGER_NAME = "cost_ledger.json"
RANDOM_INIT_LABEL = "none (random init)"
SCRATCH_LABEL = "n/a (trained from scratch)"

LEADERBOARD_COLUMNS = (
    "rank", "dataset", "backbone", "weights", "head", "task", "metric", "better", "seeds",
    "test_mean", "test_std", "val_mean", "val_std", "params", "epochs_mean",
    "train_seconds_mean", "examples_per_second_mean")
SEED_COLUMNS = (
    "dataset", "backbone", "weights", "head", "seed", "task", "metric", "test", "val", "params",
    "epochs", "train_seconds", "examples_per_second", "run_dir")


def weights_label(weights_kind: str) -> str:
  """How a weights kind appears wherever results are shown; random init is spelled out."""
  if weights_kind == "none":
    return RANDOM_INIT_LABEL
  if weights_kind == "scratch":
    return SCRATCH_LABEL
  return weights_kind or "unknown"


FeatureEntry = datasets.IndexEntry


def read_index(features_dir: str, backbones: Sequence[str] | None = None) -> list[FeatureEntry]:
  """The feature datasets of `features_dir/index.json`, optionally only some backbones.

  Args:
    features_dir: the `--out` folder of `headstart extract`.
    backbones: keep only datasets of these backbone names (None: all).

  Raises:
    ValueError: no index, an unknown backbone filter, or no dataset left.
  """
  entries = datasets.read_index(features_dir)
  path = f"{features_dir.rstrip('/')}/{layout.INDEX_NAME}"
  if backbones:
    known = sorted({entry.backbone for entry in entries})
    unknown = [name for name in backbones if name not in known]
    if unknown:
      raise ValueError(f"--backbones {','.join(backbones)!r}: {unknown[0]!r} is not in "
                       f"{path!r}; it lists {', '.join(known) or 'nothing'}")
    entries = [entry for entry in entries if entry.backbone in backbones]
  if not entries:
    raise ValueError(f"{path!r} lists no feature dataset; run headstart extract first")
  # Stable order: the leaderboard and cell directories do not depend on the index's order.
  return sorted(entries, key=lambda entry: entry.dir_name)


def parse_heads(text: str) -> list[str]:
  """Splits `--heads` and checks every name against the head zoo.

  Raises:
    ValueError: an unknown or repeated head, or none at all.
  """
  heads = [part.strip() for part in text.split(",") if part.strip()]
  if not heads:
    raise ValueError(f"--heads {text!r} names no head; allowed: {', '.join(zoo.HEADS)}")
  for head in heads:
    zoo.input_kind(head)
  if len(set(heads)) != len(heads):
    raise ValueError(f"--heads {text!r} repeats a head")
  return heads


def _head_fits(head: str, entry: FeatureEntry) -> str | None:
  """Why `head` cannot train on `entry` (None when it can)."""
  task = entry.manifest.get("task")
  store = entry.manifest.get("store", "both")
  kind = zoo.input_kind(head)
  if head == "keypoints" and task != "keypoints":
    return f"head 'keypoints' needs a keypoints dataset ({entry.dir_name} is {task})"
  if kind == "map" and store == "pooled":
    return f"{entry.dir_name} stores no feature map"
  if kind == "pooled" and store == "maps":
    return f"{entry.dir_name} stores no pooled vector"
  return None


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (dataset, head) pair of the grid; `data_dir` is what `training.train` is given."""
  dataset: str
  head: str
  data_dir: str
  backbone: str
  weights_kind: str


def plan_cells(entries: Sequence[FeatureEntry], heads: Sequence[str], *,
               pairs: Iterable[tuple[str, str]] | None = None) -> tuple[list[Cell], list[str]]:
  """The grid: every fitting head on every dataset (scratch once), plus notes on skipped cells.

  Args:
    entries: feature datasets from `read_index`.
    heads: head names.
    pairs: if given, only these `(backbone, head)` pairs (reproduce configs name their cells);
      `("scratch", "scratch")` or `(any, "scratch")` keeps the scratch baseline.

  Raises:
    ValueError: no cell fits.
  """
  wanted = None if pairs is None else {tuple(pair) for pair in pairs}
  cells, notes = [], []
  for head in heads:
    if head == "scratch":
      continue
    for entry in entries:
      if wanted is not None and (entry.backbone, head) not in wanted:
        continue
      reason = _head_fits(head, entry)
      if reason:
        notes.append(f"skipped {entry.dir_name}/{head}: {reason}")
        continue
      cells.append(Cell(entry.dir_name, head, entry.path, entry.backbone, entry.weights_kind))
  if "scratch" in heads and (wanted is None or any(head == "scratch" for _, head in wanted)):
    # The from-scratch CNN reads pixels: train it once on the images the features came from.
    cells.append(Cell(SCRATCH_DIR, "scratch", entries[0].path, "none (from scratch)", "scratch"))
  if not cells:
    raise ValueError(f"no head of {','.join(heads)!r} fits the feature datasets "
                     f"({'; '.join(notes)})")
  return cells, notes


def cell_dir(out_dir: str, cell: Cell, seed: int) -> str:
  """`OUT/cells/<dataset dir>/<head>/seed<k>`."""
  return f"{out_dir.rstrip('/')}/{CELLS_DIR}/{cell.dataset}/{cell.head}/seed{seed}"


def _read_json(path: str) -> dict[str, Any]:
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)


def metric_of(task: str) -> tuple[str, str]:
  """`(metric name, "higher"|"lower")` the leaderboard ranks a task by."""
  return ("mae_px", "lower") if task == "keypoints" else ("accuracy", "higher")


def split_metric(block: Mapping[str, Any] | None, task: str) -> float | None:
  """The leaderboard metric of one split's metrics block (source pixels for keypoints if known)."""
  if not block:
    return None
  if task == "keypoints":
    value = block.get("mae_px_source", block.get("mae_px"))
  else:
    value = block.get("accuracy")
  return None if value is None else float(value)


def seed_row(cell: Cell, seed: int, run_dir: str, result: Mapping[str, Any]) -> dict[str, Any]:
  """One `leaderboard_seeds.csv` row from a run's `metrics.json`."""
  task = result.get("task", "")
  return {
      "dataset": cell.dataset, "backbone": cell.backbone,
      "weights": weights_label(cell.weights_kind), "head": cell.head, "seed": seed, "task": task,
      "metric": metric_of(task)[0],
      "test": split_metric(result.get("test"), task),
      "val": split_metric(result.get("validation"), task),
      "params": result.get("params"), "epochs": result.get("epochs"),
      "train_seconds": result.get("train_seconds"),
      "examples_per_second": result.get("examples_per_second"), "run_dir": run_dir,
  }


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
  present = [float(v) for v in values if v is not None]
  if not present:
    return None, None
  # Sample std (ddof=1): the spread a new seed would show; undefined for a single seed.
  std = float(np.std(present, ddof=1)) if len(present) > 1 else None
  return float(np.mean(present)), std


def aggregate(seed_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per-seed rows -> one ranked row per (dataset, head) cell (mean and std over seeds)."""
  by_cell: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for row in seed_rows:
    by_cell.setdefault((row["dataset"], row["head"]), []).append(row)
  rows = []
  for (dataset, head), runs in by_cell.items():
    first = runs[0]
    test_mean, test_std = _mean_std([r["test"] for r in runs])
    val_mean, val_std = _mean_std([r["val"] for r in runs])
    rows.append({
        "dataset": dataset, "backbone": first["backbone"], "weights": first["weights"],
        "head": head, "task": first["task"], "metric": first["metric"],
        "better": metric_of(first["task"])[1], "seeds": len(runs),
        "test_mean": test_mean, "test_std": test_std, "val_mean": val_mean, "val_std": val_std,
        "params": first["params"],
        "epochs_mean": _mean_std([r["epochs"] for r in runs])[0],
        "train_seconds_mean": _mean_std([r["train_seconds"] for r in runs])[0],
        "examples_per_second_mean": _mean_std([r["examples_per_second"] for r in runs])[0],
    })

  def sort_key(row):
    value = row["test_mean"] if row["test_mean"] is not None else row["val_mean"]
    if value is None:
      return (1, 0.0)
    return (0, -value if row["better"] == "higher" else value)

  rows.sort(key=sort_key)
  for rank, row in enumerate(rows, start=1):
    row["rank"] = rank
  return rows


def best_run(rows: Sequence[Mapping[str, Any]],
             seed_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
  """The seed run the report shows: best cell by validation mean (test breaks ties), then its
  best seed by validation. Chosen on validation so the report does not select on the test set.
  """
  def score(value, better):
    if value is None:
      return -math.inf
    return value if better == "higher" else -value

  if not rows:
    return None
  cell = max(rows, key=lambda r: (score(r["val_mean"], r["better"]),
                                  score(r["test_mean"], r["better"])))
  runs = [r for r in seed_rows if r["dataset"] == cell["dataset"] and r["head"] == cell["head"]]
  return max(runs, key=lambda r: (score(r["val"], cell["better"]),
                                  score(r["test"], cell["better"])))


# ---------------------------------------------------------------------------------------------
# Cost ledger


def _num_examples(manifest: Mapping[str, Any], split: str) -> int:
  return int(manifest.get("splits", {}).get(split, {}).get("num_examples", 0))


def cost_ledger(entries: Sequence[FeatureEntry],
                seed_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """What the grid cost with cached features vs. running the frozen backbone in every epoch.

  Cached: each backbone's extraction once (`extraction_seconds` from its manifest) + every head
  run's `train_seconds`. Without the cache, every run would push its train and validation
  images through the backbone in each epoch and its test images once, at the backbone's measured
  forward throughput (`forward_images_per_second`; the end-to-end `images_per_second` when that
  is missing), on top of the same head seconds. The forward rate leaves out Beam's start-up, so
  the counterfactual is, if anything, underestimated.
  """
  by_dataset = {entry.dir_name: entry for entry in entries}
  backbones = []
  for entry in entries:
    manifest = entry.manifest
    rate = manifest.get("forward_images_per_second") or manifest.get("images_per_second")
    backbones.append({
        "dataset": entry.dir_name, "backbone": entry.backbone,
        "weights": weights_label(entry.weights_kind),
        "images": sum(_num_examples(manifest, s) for s in layout.SPLITS),
        "extraction_seconds": manifest.get("extraction_seconds"),
        "images_per_second": manifest.get("images_per_second"),
        "forward_images_per_second": rate,
    })
  rates = {b["dataset"]: b["forward_images_per_second"] for b in backbones}
  cells: dict[tuple[str, str], dict[str, Any]] = {}
  for row in seed_rows:
    key = (row["dataset"], row["head"])
    cell = cells.setdefault(key, {"dataset": row["dataset"], "head": row["head"], "runs": 0,
                                  "head_seconds": 0.0, "backbone_every_epoch_seconds": 0.0})
    cell["runs"] += 1
    cell["head_seconds"] += float(row["train_seconds"] or 0.0)
    entry, rate = by_dataset.get(row["dataset"]), rates.get(row["dataset"])
    if entry is None or not rate:
      continue   # the scratch baseline already reads pixels: no backbone to re-run
    manifest = entry.manifest
    per_epoch = _num_examples(manifest, "train") + _num_examples(manifest, "validation")
    images = per_epoch * int(row["epochs"] or 0) + _num_examples(manifest, "test")
    cell["backbone_every_epoch_seconds"] += images / float(rate)
  cell_list = list(cells.values())
  head_seconds = sum(c["head_seconds"] for c in cell_list)
  extraction_seconds = sum(float(b["extraction_seconds"] or 0.0) for b in backbones
                           if any(c["dataset"] == b["dataset"] for c in cell_list))
  cached = extraction_seconds + head_seconds
  uncached = head_seconds + sum(c["backbone_every_epoch_seconds"] for c in cell_list)
  return {
      "backbones": backbones,
      "cells": cell_list,
      "totals": {
          "extraction_seconds": extraction_seconds,
          "head_seconds": head_seconds,
          "cached_seconds": cached,
          "backbone_every_epoch_seconds": uncached,
          "speedup": uncached / cached if cached else None,
          "runs": sum(c["runs"] for c in cell_list),
      },
      "method": ("cached = extraction once per backbone + head train seconds; uncached = head "
                 "train seconds + (train+validation images x epochs + test images) / measured "
                 "backbone forward images/s, per run"),
  }


def ledger_lines(ledger: Mapping[str, Any]) -> list[str]:
  """Human lines of the cost ledger (printed and added to leaderboard.md)."""
  totals = ledger["totals"]
  lines = ["Cost ledger (cached features vs. frozen backbone run in every epoch):"]
  for b in ledger["backbones"]:
    rate = b["forward_images_per_second"]
    lines.append(f"- extraction {b['dataset']} ({b['backbone']}, {b['weights']}): "
                 f"{fmt(b['extraction_seconds'], 1)} s once for {b['images']} images "
                 f"(forward {fmt(rate, 1)} images/s)")
  lines.append(f"- heads: {totals['runs']} runs, {fmt(totals['head_seconds'], 1)} s")
  lines.append(f"- cached total: {fmt(totals['cached_seconds'], 1)} s; backbone in every epoch: "
               f"{fmt(totals['backbone_every_epoch_seconds'], 1)} s; speed-up "
               f"{fmt(totals['speedup'], 1)}x")
  return lines


# ---------------------------------------------------------------------------------------------
# Output files


def fmt(value: Any, digits: int = 3) -> str:
  """A number for tables: fixed digits, `-` for missing."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in columns})
  return buffer.getvalue()


def score_text(mean: float | None, std: float | None) -> str:
  """`mean ± std`, or just the mean when one seed leaves the std undefined."""
  if mean is None:
    return "-"
  return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The leaderboard as a markdown table (also what `compare` prints)."""
  header = ["#", "backbone", "weights", "head", "metric", "test (mean ± std)",
            "val (mean ± std)", "seeds", "params", "train s", "examples/s"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    metric = row["metric"] + (" (lower is better)" if row["better"] == "lower" else "")
    lines.append("| " + " | ".join([
        str(row["rank"]), f"{row['backbone']} ({row['dataset']})", row["weights"], row["head"],
        metric, score_text(row["test_mean"], row["test_std"]),
        score_text(row["val_mean"], row["val_std"]), str(row["seeds"]),
        f"{row['params']:,}" if row["params"] is not None else "-",
        fmt(row["train_seconds_mean"], 1), fmt(row["examples_per_second_mean"], 0)]) + " |")
  return "\n".join(lines)


def plot_leaderboard(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """Horizontal bars of the test metric (mean, std as error bars), random init hatched."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shown = [row for row in rows if row["test_mean"] is not None] or list(rows)
  labels = ["from-scratch CNN (no backbone)" if r["head"] == "scratch"
            else f"{r['backbone']} [{r['weights']}] / {r['head']}" for r in shown]
  means = [r["test_mean"] or 0.0 for r in shown]
  stds = [r["test_std"] or 0.0 for r in shown]
  figure, axes = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.4))
  bars = axes.barh(range(len(shown)), means, xerr=stds, color="#4c72b0", capsize=3)
  for bar, row in zip(bars, shown):
    if row["weights"] != "imagenet":
      bar.set_hatch("//")
      bar.set_color("#dd8452")
  axes.set_yticks(range(len(shown)), labels, fontsize=8)
  axes.invert_yaxis()
  metric = shown[0]["metric"] if shown else "metric"
  axes.set_xlabel(f"test {metric} (mean ± std over seeds)"
                  + ("; lower is better" if shown and shown[0]["better"] == "lower" else ""))
  axes.set_title("blue: ImageNet weights; orange hatched: random init, scratch or file",
                 fontsize=8)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=110)
  plt.close(figure)
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buffer.getvalue())


def _check_same_settings(run_dir: str, run_config: config_lib.Config) -> None:
  """Refuses to reuse a finished cell trained with other hyperparameters (say, other epochs).

  Raises:
    ValueError: the stored `config.json` differs from what this grid would train.
  """
  stored = _read_json(f"{run_dir}/config.json")
  # A JSON round trip turns tuples into lists, as they are stored.
  wanted = json.loads(json.dumps(config_lib.to_dict(run_config)))
  for section in ("train", "head"):
    if stored.get(section) != wanted[section]:
      changed = sorted(key for key in wanted[section]
                       if stored.get(section, {}).get(key) != wanted[section][key])
      raise ValueError(f"{run_dir!r} was trained with other {section} settings "
                       f"({', '.join(changed)}); use a new --out for a grid with different "
                       "settings")


@dataclasses.dataclass(frozen=True)
class CompareResult:
  """What `compare` wrote; rows are the leaderboard, seed_rows the per-seed runs."""
  out_dir: str
  rows: list[dict[str, Any]]
  seed_rows: list[dict[str, Any]]
  ledger: dict[str, Any]
  notes: list[str]
  best: dict[str, Any] | None
  report: str | None


def compare(features_dir: str, heads: Sequence[str], out_dir: str, *, seeds: int = 3,
            backbones: Sequence[str] | None = None, epochs: int | None = None,
            config: config_lib.Config | None = None,
            pairs: Iterable[tuple[str, str]] | None = None, report: bool = True,
            verbose: int = 0, log: Callable[[str], None] = print) -> CompareResult:
  """Trains the grid (skipping finished seeds) and writes leaderboards, ledger and report.

  Args:
    features_dir: `headstart extract --out` folder (holds `index.json`).
    heads: head names (`heads.zoo.HEADS`).
    out_dir: the compare directory.
    seeds: seeds per cell (0 ... seeds-1; the seed sets the head's initialisation and shuffling).
    backbones: only these backbones of the index (None: all).
    epochs: overrides the config's epochs.
    config: hyperparameters shared by every cell (defaults when None).
    pairs: restrict the grid to these `(backbone, head)` pairs.
    report: also write `report.html` (needs the image dataset for the example grids).
    verbose: Keras verbosity of each fit.
    log: where progress lines go.

  Raises:
    ValueError: bad seeds/epochs, unknown heads or backbones, no index.
  """
  from heads import export, training

  if seeds < 1:
    raise ValueError(f"--seeds must be at least 1, got {seeds!r}")
  if epochs is not None and epochs < 1:
    raise ValueError(f"--epochs must be at least 1, got {epochs!r}")
  out_dir = out_dir.rstrip("/")
  for head in heads:
    zoo.input_kind(head)
  entries = read_index(features_dir, backbones)
  cells, notes = plan_cells(entries, heads, pairs=pairs)
  base = config or config_lib.Config()
  if epochs is not None:
    base = config_lib.override(base, {"train": {"epochs": epochs}})
  tf.io.gfile.makedirs(out_dir)
  seed_rows = []
  total = len(cells) * seeds
  for index, (cell, seed) in enumerate(((c, s) for c in cells for s in range(seeds)), start=1):
    run_dir = cell_dir(out_dir, cell, seed)
    metrics_path = f"{run_dir}/{training.METRICS_NAME}"
    run_config = config_lib.override(base, {"train": {"seed": seed}})
    if tf.io.gfile.exists(metrics_path):
      _check_same_settings(run_dir, run_config)
      log(f"[{index}/{total}] {cell.dataset}/{cell.head}/seed{seed}: finished earlier, skipped")
      result = _read_json(metrics_path)
    else:
      log(f"[{index}/{total}] {cell.dataset}/{cell.head}/seed{seed}: training")
      result = training.train(cell.data_dir, cell.head, run_dir, run_config, verbose=verbose,
                              export_model=False)
    seed_rows.append(seed_row(cell, seed, run_dir, result))
  rows = aggregate(seed_rows)
  ledger = cost_ledger(entries, seed_rows)
  best = best_run(rows, seed_rows)
  if best and not tf.io.gfile.exists(f"{best['run_dir']}/{export.MODEL_NAME}"):
    # Only the best run gets model.keras: each export holds a whole backbone (16 MB for
    # MobileNet, ~60 MB for VGG16), which across a grid of cells x seeds adds up to gigabytes.
    training.export_run(best["run_dir"])
  ledger["best_run"] = best["run_dir"] if best else None

  table = markdown_table(rows)
  datasets.write_json(f"{out_dir}/{LEDGER_NAME}", ledger)
  with tf.io.gfile.GFile(f"{out_dir}/{LEADERBOARD_CSV}", "w") as f:
    f.write(_csv_text(rows, LEADERBOARD_COLUMNS))
  with tf.io.gfile.GFile(f"{out_dir}/{SEEDS_CSV}", "w") as f:
    f.write(_csv_text(seed_rows, SEED_COLUMNS))
  with tf.io.gfile.GFile(f"{out_dir}/{LEADERBOARD_MD}", "w") as f:
    f.write("# headstart compare\n\n" + table + "\n\n" + "\n".join(ledger_lines(ledger)) + "\n"
            + "".join(f"\n- note: {note}" for note in notes) + "\n")
  plot_leaderboard(rows, f"{out_dir}/{LEADERBOARD_PNG}")
  report_path = None
  if report:
    from heads import report as report_lib
    report_path = report_lib.write_compare_report(out_dir, rows, ledger, best, notes=notes,
                                                  log=log)
  return CompareResult(out_dir, rows, seed_rows, ledger, notes, best, report_path)
