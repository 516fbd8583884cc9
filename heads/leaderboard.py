"""The compare grid's numbers as data and text: seed rows, leaderboard, cost ledger, CSV/Markdown.

    rows = leaderboard.aggregate(seed_rows)                  # one ranked row per cell
    ledger = leaderboard.cost_ledger(entries, seed_rows)     # cached vs backbone-every-epoch
    text = leaderboard.markdown_page(rows, ledger, notes)     # leaderboard.md

Pure functions over dicts (no TensorFlow, no plotting, no files): `heads.compare` writes what
they return, `heads.report` and `headstart reproduce` show it. The files `compare` writes at the
top of its `--out` are named here: `leaderboard.csv` (`LEADERBOARD_COLUMNS`, one row per
(feature dataset, head) cell, mean and sample std over seeds), `leaderboard_seeds.csv`
(`SEED_COLUMNS`, one row per seed run), `leaderboard.md`, `leaderboard.png` and
`cost_ledger.json`.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from contracts import layout

if TYPE_CHECKING:   # type hints only: importing them would load TensorFlow
  from contracts.datasets import IndexEntry
  from heads.grid import Cell

LEADERBOARD_CSV = "leaderboard.csv"
SEEDS_CSV = "leaderboard_seeds.csv"
LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_PNG = "leaderboard.png"
LEDGER_NAME = "cost_ledger.json"
SEARCH_CSV = "search.csv"
RANDOM_INIT_LABEL = "none (random init)"
SCRATCH_LABEL = "n/a (trained from scratch)"

LEADERBOARD_COLUMNS = (
    "rank", "dataset", "backbone", "weights", "head", "task", "metric", "better", "seeds",
    "test_mean", "test_std", "val_mean", "val_std", "params", "epochs_mean",
    "train_seconds_mean", "examples_per_second_mean", "search", "search_val_spread_mean")
SEED_COLUMNS = (
    "dataset", "backbone", "weights", "head", "seed", "task", "metric", "test", "val", "params",
    "epochs", "train_seconds", "examples_per_second", "run_dir", "search", "search_points",
    "search_val_spread")
# `search.csv`: every setting a `--search` tried, per cell and seed; `chosen` marks the run kept.
SEARCH_COLUMNS = (
    "dataset", "backbone", "head", "seed", "point", "setting", "learning_rate", "dropout", "l2",
    "best_epoch", "val_score", "val_loss", "chosen")


def weights_label(weights_kind: str) -> str:
  """How a weights kind appears wherever results are shown; random init is spelled out."""
  if weights_kind == "none":
    return RANDOM_INIT_LABEL
  if weights_kind == "scratch":
    return SCRATCH_LABEL
  return weights_kind or "unknown"


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
      **_search_summary(result.get("search")),
  }


def _search_summary(block: Mapping[str, Any] | None) -> dict[str, Any]:
  """A run's `--search` in one seed row: the chosen setting, points tried, validation spread."""
  if not block:
    return {"search": None, "search_points": None, "search_val_spread": None}
  return {"search": block["chosen"], "search_points": len(block["points"]),
          "search_val_spread": block.get("val_spread")}


def search_rows(seed: Mapping[str, Any], result: Mapping[str, Any]) -> list[dict[str, Any]]:
  """`search.csv` rows of one run (its seed row and `metrics.json`; none without `--search`)."""
  block = result.get("search")
  if not block:
    return []
  return [{"dataset": seed["dataset"], "backbone": seed["backbone"], "head": seed["head"],
           "seed": seed["seed"], **point, "chosen": point["point"] == block["chosen_point"]}
          for point in block["points"]]


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
  present = [float(v) for v in values if v is not None]
  if not present:
    return None, None
  # Sample std (ddof=1): the spread a new seed would show; undefined for a single seed.
  std = float(np.std(present, ddof=1)) if len(present) > 1 else None
  return float(np.mean(present)), std


def _cell_row(dataset: str, head: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One leaderboard row (unranked) from the seed rows of one cell."""
  first = runs[0]
  test_mean, test_std = _mean_std([r["test"] for r in runs])
  val_mean, val_std = _mean_std([r["val"] for r in runs])
  return {
      "dataset": dataset, "backbone": first["backbone"], "weights": first["weights"],
      "head": head, "task": first["task"], "metric": first["metric"],
      "better": metric_of(first["task"])[1], "seeds": len(runs),
      "test_mean": test_mean, "test_std": test_std, "val_mean": val_mean, "val_std": val_std,
      "params": first["params"],
      "epochs_mean": _mean_std([r["epochs"] for r in runs])[0],
      "train_seconds_mean": _mean_std([r["train_seconds"] for r in runs])[0],
      "examples_per_second_mean": _mean_std([r["examples_per_second"] for r in runs])[0],
      # Seeds may choose differently; every choice made is listed.
      "search": "; ".join(sorted({r["search"] for r in runs if r.get("search")})) or None,
      "search_val_spread_mean": _mean_std([r.get("search_val_spread") for r in runs])[0],
  }


def _rank_key(row: Mapping[str, Any]) -> tuple[int, float]:
  """Best test mean first (validation when a cell has no test split), cells without either last."""
  value = row["test_mean"] if row["test_mean"] is not None else row["val_mean"]
  if value is None:
    return (1, 0.0)
  return (0, -value if row["better"] == "higher" else value)


def aggregate(seed_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per-seed rows -> one ranked row per (dataset, head) cell (mean and std over seeds)."""
  by_cell: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for row in seed_rows:
    by_cell.setdefault((row["dataset"], row["head"]), []).append(row)
  rows = [_cell_row(dataset, head, runs) for (dataset, head), runs in by_cell.items()]
  rows.sort(key=_rank_key)
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


def _backbone_costs(entries: Sequence[IndexEntry]) -> list[dict[str, Any]]:
  """One ledger entry per feature dataset: its extraction, paid once."""
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
        # `extract --estimate`'s prediction for this backbone, kept beside the measured figures.
        "estimate": manifest.get("estimate"),
    })
  return backbones


def _cell_costs(entries: Sequence[IndexEntry], rates: Mapping[str, float | None],
                seed_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Head seconds per cell, and what its runs would have cost with the backbone every epoch."""
  by_dataset = {entry.dir_name: entry for entry in entries}
  cells: dict[tuple[str, str], dict[str, Any]] = {}
  for row in seed_rows:
    key = (row["dataset"], row["head"])
    cell = cells.setdefault(key, {"dataset": row["dataset"], "head": row["head"], "runs": 0,
                                  "head_seconds": 0.0, "backbone_every_epoch_seconds": 0.0,
                                  "settings_per_run": row.get("search_points") or 1})
    cell["runs"] += 1
    cell["head_seconds"] += float(row["train_seconds"] or 0.0)
    entry, rate = by_dataset.get(row["dataset"]), rates.get(row["dataset"])
    if entry is None or not rate:
      continue   # the scratch baseline already reads pixels: no backbone to re-run
    manifest = entry.manifest
    per_epoch = _num_examples(manifest, "train") + _num_examples(manifest, "validation")
    images = per_epoch * int(row["epochs"] or 0) + _num_examples(manifest, "test")
    cell["backbone_every_epoch_seconds"] += images / float(rate)
  return list(cells.values())


def cost_ledger(entries: Sequence[IndexEntry],
                seed_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """What the grid cost with cached features vs. running the frozen backbone in every epoch.

  Cached: each backbone's extraction once (`extraction_seconds` from its manifest) + every head
  run's `train_seconds`. Without the cache, every run would push its train and validation
  images through the backbone in each epoch and its test images once, at the backbone's measured
  forward throughput (`forward_images_per_second`; the end-to-end `images_per_second` when that
  is missing), on top of the same head seconds. The forward rate leaves out Beam's start-up, so
  the counterfactual is, if anything, underestimated.
  """
  backbones = _backbone_costs(entries)
  rates = {b["dataset"]: b["forward_images_per_second"] for b in backbones}
  cell_list = _cell_costs(entries, rates, seed_rows)
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


def _estimate_text(estimate: Mapping[str, Any] | None) -> str:
  if not estimate:
    return ""
  cost = f", cost {estimate['cost']:.4g}" if estimate.get("cost") is not None else ""
  return (f"; estimated beforehand on {estimate['device']}: forward "
          f"{fmt(estimate['forward_images_per_second'], 1)} images/s, "
          f"{estimate['worker_hours']:.3g} worker-hours for the call{cost}")


def ledger_lines(ledger: Mapping[str, Any]) -> list[str]:
  """Human lines of the cost ledger (printed and added to leaderboard.md)."""
  totals = ledger["totals"]
  lines = ["Cost ledger (cached features vs. frozen backbone run in every epoch):"]
  for b in ledger["backbones"]:
    rate = b["forward_images_per_second"]
    lines.append(f"- extraction {b['dataset']} ({b['backbone']}, {b['weights']}): "
                 f"{fmt(b['extraction_seconds'], 1)} s once for {b['images']} images "
                 f"(forward {fmt(rate, 1)} images/s)" + _estimate_text(b.get("estimate")))
  together = ledger.get("parallel_runs") or 1
  lines.append(f"- heads: {totals['runs']} runs, {fmt(totals['head_seconds'], 1)} s"
               + (f" (up to {together} runs at once: their seconds overlap)"
                  if together > 1 else ""))
  searched = [c for c in ledger["cells"] if c.get("settings_per_run", 1) > 1]
  if searched:
    lines.append(f"- search: {sum(c['runs'] * c['settings_per_run'] for c in searched)} settings "
                 f"trained in {sum(c['runs'] for c in searched)} runs (each run's settings "
                 "together, in its head seconds above)")
  lines.append(f"- cached total: {fmt(totals['cached_seconds'], 1)} s; backbone in every epoch: "
               f"{fmt(totals['backbone_every_epoch_seconds'], 1)} s; speed-up "
               f"{fmt(totals['speedup'], 1)}x")
  return lines


# ---------------------------------------------------------------------------------------------
# Text


def fmt(value: Any, digits: int = 3) -> str:
  """A number for tables: fixed digits, `-` for missing."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def score_text(mean: float | None, std: float | None) -> str:
  """`mean ± std`, or just the mean when one seed leaves the std undefined."""
  if mean is None:
    return "-"
  return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """CSV of `rows` with exactly `columns` (missing values as empty cells)."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in columns})
  return buffer.getvalue()


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The leaderboard as a markdown table (also what `compare` prints)."""
  searched = any(row.get("search") for row in rows)
  header = ["#", "backbone", "weights", "head", "metric", "test (mean ± std)",
            "val (mean ± std)", "seeds", "params", "train s", "examples/s",
            *(["search: chosen (val spread)"] if searched else [])]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    metric = row["metric"] + (" (lower is better)" if row["better"] == "lower" else "")
    search = ([f"{row['search']} ({fmt(row.get('search_val_spread_mean'))})"
               if row.get("search") else "-"] if searched else [])
    lines.append("| " + " | ".join([
        str(row["rank"]), f"{row['backbone']} ({row['dataset']})", row["weights"], row["head"],
        metric, score_text(row["test_mean"], row["test_std"]),
        score_text(row["val_mean"], row["val_std"]), str(row["seeds"]),
        f"{row['params']:,}" if row["params"] is not None else "-",
        fmt(row["train_seconds_mean"], 1), fmt(row["examples_per_second_mean"], 0),
        *search]) + " |")
  return "\n".join(lines)


def markdown_page(rows: Sequence[Mapping[str, Any]], ledger: Mapping[str, Any],
                  notes: Sequence[str] = ()) -> str:
  """`leaderboard.md`: the table, the cost-ledger lines and the grid's notes."""
  return ("# headstart compare\n\n" + markdown_table(rows) + "\n\n"
          + "\n".join(ledger_lines(ledger)) + "\n"
          + "".join(f"\n- note: {note}" for note in notes) + "\n")
