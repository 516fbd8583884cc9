"""`headstart compare` and `headstart report`: grid, leaderboards, cost ledger, report.html.

    .venv/bin/pytest tests/test_compare.py -q      # ~1 min on 2 cores

The end-to-end tests share one session fixture: conftest's 24-image dataset (64 px) extracted
with MobileNet v1 at the shipped ImageNet weights and at random init, through the real entry
points in process; the grid then trains linear, mlp, conv (and the from-scratch CNN once) with
the `tiny` head config for 2 epochs and 2 seeds.
"""
from __future__ import annotations

import json
import logging
import pathlib
import re
import subprocess
import sys

import pandas as pd
import pytest

from contracts import progress
from heads import compare, config as config_lib, grid as grid_lib, leaderboard, report, run

HEADS = ["linear", "mlp", "conv", "scratch"]


# ---------------------------------------------------------------------------------------------
# Pure functions


def _seed(dataset, head, seed, test, val, *, task="binary", weights="imagenet", seconds=1.0,
          epochs=3):
  return {"dataset": dataset, "backbone": dataset.split("-")[0],
          "weights": leaderboard.weights_label(weights), "head": head, "seed": seed, "task": task,
          "metric": leaderboard.metric_of(task)[0], "test": test, "val": val, "params": 10,
          "epochs": epochs, "train_seconds": seconds, "examples_per_second": 100.0,
          "run_dir": f"cells/{dataset}/{head}/seed{seed}"}


def test_weights_label_spells_out_random_init():
  assert leaderboard.weights_label("none") == "none (random init)"
  assert leaderboard.weights_label("imagenet") == "imagenet"
  assert "scratch" in leaderboard.weights_label("scratch")


def test_aggregate_one_row_per_cell_with_mean_std_and_rank():
  seeds = [_seed("a-imagenet-1", "linear", s, t, 0.5) for s, t in enumerate((0.6, 0.8))]
  seeds += [_seed("b-none-2", "linear", s, t, 0.9, weights="none")
            for s, t in enumerate((0.5, 0.5))]
  seeds += [_seed("a-imagenet-1", "conv", 0, 0.9, 0.4)]
  rows = leaderboard.aggregate(seeds)
  assert [(r["dataset"], r["head"]) for r in rows] == [
      ("a-imagenet-1", "conv"), ("a-imagenet-1", "linear"), ("b-none-2", "linear")]
  linear = rows[1]
  assert linear["rank"] == 2 and linear["seeds"] == 2
  assert linear["test_mean"] == pytest.approx(0.7)
  assert linear["test_std"] == pytest.approx(0.1414, abs=1e-3)    # sample std (ddof=1)
  assert rows[0]["test_std"] is None                               # one seed: undefined
  assert rows[2]["weights"] == "none (random init)"
  # The report's best cell is chosen on validation, not on test.
  best = leaderboard.best_run(rows, seeds)
  assert (best["dataset"], best["head"]) == ("b-none-2", "linear")


def test_keypoints_rank_lower_error_first():
  seeds = [_seed("a-x-1", "keypoints", 0, 9.0, 9.0, task="keypoints"),
           _seed("b-x-2", "keypoints", 0, 3.0, 4.0, task="keypoints")]
  rows = leaderboard.aggregate(seeds)
  assert [r["dataset"] for r in rows] == ["b-x-2", "a-x-1"]
  assert rows[0]["metric"] == "mae_px" and rows[0]["better"] == "lower"
  assert leaderboard.split_metric({"mae_px": 2.0, "mae_px_source": 3.0}, "keypoints") == 3.0


def test_cost_ledger_counts_extraction_once_and_backbone_per_epoch():
  manifest = {"splits": {"train": {"num_examples": 80}, "validation": {"num_examples": 10},
                         "test": {"num_examples": 10}},
              "extraction_seconds": 20.0, "images_per_second": 5.0,
              "forward_images_per_second": 10.0}
  entry = grid_lib.FeatureEntry("a-imagenet-1", "/x/a", "a", "imagenet", "k", manifest)
  seeds = [_seed("a-imagenet-1", head, 0, 0.5, 0.5, seconds=2.0, epochs=4)
           for head in ("linear", "mlp")]
  ledger = leaderboard.cost_ledger([entry], seeds)
  totals = ledger["totals"]
  assert totals["extraction_seconds"] == 20.0 and totals["head_seconds"] == 4.0
  # Each run: (80 + 10) x 4 epochs + 10 test = 370 images at 10 images/s = 37 s, plus 2 s head.
  assert totals["backbone_every_epoch_seconds"] == pytest.approx(2 * (37.0 + 2.0))
  assert totals["speedup"] == pytest.approx(78.0 / 24.0)
  assert any("speed-up" in line for line in leaderboard.ledger_lines(ledger))


def test_leaderboard_module_is_pure():
  """Leaderboard, ranking and ledger load neither TensorFlow nor matplotlib (a fresh process)."""
  code = ("import sys, heads.leaderboard; "
          "print(sorted({'tensorflow', 'matplotlib', 'keras'} & set(sys.modules)))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                        cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert done.stdout.strip() == "[]"


def test_bad_arguments_raise_value_errors(tmp_path):
  with pytest.raises(ValueError, match="'nope'"):
    grid_lib.parse_heads("linear,nope")
  with pytest.raises(ValueError, match="repeats"):
    grid_lib.parse_heads("linear,linear")
  with pytest.raises(ValueError, match="index.json"):
    grid_lib.read_index(str(tmp_path))
  with pytest.raises(ValueError, match="--seeds"):
    compare.compare(str(tmp_path), ["linear"], str(tmp_path / "out"), seeds=0)


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="session")
def feature_dir(tiny_image_dataset, tmp_path_factory) -> pathlib.Path:
  """MobileNet v1 features of conftest's tiny dataset: shipped ImageNet weights and random init."""
  from features import run as extract
  out = tmp_path_factory.mktemp("compare_features") / "features"
  for weights in ("imagenet", "none"):
    extract.run(["--images", str(tiny_image_dataset), "--out", str(out), "--backbones",
                 "mobilenet", "--weights", weights, "--input-size", "64"])
  return out


@pytest.fixture(scope="session")
def grid(feature_dir, tmp_path_factory):
  """The compare grid, run once through the library (the CLI test re-runs it: all skipped)."""
  out = tmp_path_factory.mktemp("compare") / "cmp"
  lines = []
  result = compare.compare(str(feature_dir), HEADS, str(out), seeds=2, epochs=2,
                           config=config_lib.tiny(), log=lines.append)
  return out, result, lines


def test_grid_writes_one_row_per_cell_and_per_seed_rows(grid):
  out, result, _ = grid
  board = pd.read_csv(out / "leaderboard.csv")
  # 2 feature datasets x (linear, mlp, conv) + the from-scratch CNN once.
  assert len(board) == 7
  assert set(board["head"]) == set(HEADS)
  assert "none (random init)" in set(board["weights"]) and "imagenet" in set(board["weights"])
  assert set(board["seeds"]) == {2}
  assert board["test_mean"].between(0, 1).all()
  assert list(board["rank"]) == list(range(1, 8))
  seeds = pd.read_csv(out / "leaderboard_seeds.csv")
  assert len(seeds) == 14
  for run_dir in seeds["run_dir"]:
    assert (pathlib.Path(run_dir) / "metrics.json").exists()
  assert (out / "cells" / "from-scratch" / "scratch" / "seed1" / "metrics.json").exists()
  assert "| # | backbone |" in (out / "leaderboard.md").read_text()
  assert (out / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def test_cost_ledger_file(grid):
  out, result, _ = grid
  ledger = json.loads((out / "cost_ledger.json").read_text())
  assert {b["dataset"] for b in ledger["backbones"]} == {
      p.name for p in out.joinpath("cells").iterdir() if p.name != "from-scratch"}
  assert all(b["extraction_seconds"] > 0 for b in ledger["backbones"])
  assert ledger["totals"]["runs"] == 14 and ledger["totals"]["speedup"] > 0
  assert "speed-up" in (out / "leaderboard.md").read_text()


def test_exactly_one_self_contained_report(grid):
  out, result, _ = grid
  pages = list(out.rglob("*.html"))
  assert pages == [out / "report.html"]
  text = pages[0].read_text()
  sources = re.findall(r'src="([^"]+)"', text)
  # Leaderboard chart, curves, confusion matrix, misclassified grid (or none), activation maps,
  # all by relative path next to the page.
  assert len(sources) >= 4
  for source in sources:
    assert not source.startswith(("/", "http", "data:"))
    assert (out / source).read_bytes()[:4] == b"\x89PNG"
  assert "http://" not in text and "https://" not in text
  for heading in ("Leaderboard", "Cost ledger", "Learning curves", "Confusion matrix",
                  "Activation maps"):
    assert heading in text
  assert "none (random init)" in text


def test_rerun_skips_finished_cells_and_prints_leaderboard(grid, feature_dir, tmp_path, capsys):
  out, result, _ = grid
  before = (out / "leaderboard_seeds.csv").read_text()
  config_file = tmp_path / "tiny.json"
  config_file.write_text(json.dumps(config_lib.to_dict(config_lib.tiny())))
  assert run.compare_main(["--features", str(feature_dir), "--heads", ",".join(HEADS),
                           "--seeds", "2", "--epochs", "2", "--out", str(out),
                           "--config", str(config_file), "--no-report"]) == 0
  printed = capsys.readouterr().out
  assert printed.count("finished earlier, skipped") == 14
  assert "| # | backbone |" in printed and "speed-up" in printed
  assert (out / "leaderboard_seeds.csv").read_text() == before


def test_grid_reports_one_progress_step_per_run(grid, feature_dir):
  """`contracts.progress` records (headstart's progress bar draws them): sized, one per run,
  closed at the end."""
  out, _, _ = grid
  events = []
  handler = logging.Handler()
  handler.emit = lambda record: events.append(record.progress)
  logger = logging.getLogger(progress.LOGGER)
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:   # every seed finished earlier: a rerun walks the grid without training
    compare.compare(str(feature_dir), HEADS, str(out), seeds=2, epochs=2,
                    config=config_lib.tiny(), report=False, log=lambda line: None)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  assert events[0]["task"] == "compare" and events[0]["total"] == 14
  assert events[0]["unit"] == "run"
  assert [e["advance"] for e in events[1:-1]] == [1] * 14
  assert events[-1]["done"]


def test_grid_trains_each_cell_through_the_given_trainer(feature_dir, tmp_path):
  calls = []

  def trainer(cell, seed, run_dir, run_config):
    calls.append((cell.dataset, cell.head, seed, run_config.train.seed))
    return compare.train_cell(cell, seed, run_dir, run_config)

  result = compare.compare(str(feature_dir), ["linear"], str(tmp_path / "cmp"), seeds=1,
                           epochs=1, config=config_lib.tiny(), report=False,
                           log=lambda line: None, train_one=trainer)
  assert calls == [(row["dataset"], "linear", 0, 0) for row in result.seed_rows]
  assert len(calls) == 2
  for row in result.seed_rows:
    assert (pathlib.Path(row["run_dir"]) / "metrics.json").exists()


def test_rerun_with_other_settings_is_refused(grid, feature_dir):
  out, _, _ = grid
  with pytest.raises(ValueError, match="other train settings \\(epochs\\)"):
    compare.compare(str(feature_dir), ["linear"], str(out), seeds=1, epochs=3,
                    config=config_lib.tiny(), report=False, log=lambda line: None)


def test_report_on_one_run(grid):
  out, result, _ = grid
  run_dir = pathlib.Path(result.seed_rows[0]["run_dir"])
  assert run.report_main(["--run", str(run_dir)]) == 0
  text = (run_dir / "report.html").read_text()
  assert "Learning curves" in text
  for source in re.findall(r'src="([^"]+)"', text):
    assert (run_dir / source).exists()
  (run_dir / "report.html").unlink()   # keep "exactly one report.html" true for the grid
  with pytest.raises(ValueError, match="not a finished headstart run"):
    report.write_run_report(str(out))


def test_backbone_filter(feature_dir):
  entries = grid_lib.read_index(str(feature_dir), ["mobilenet"])
  assert len(entries) == 2
  with pytest.raises(ValueError, match="'vgg16'"):
    grid_lib.read_index(str(feature_dir), ["vgg16"])


def test_only_the_best_run_is_exported(grid):
  out, result, _ = grid
  exported = sorted(out.rglob("model.keras"))
  assert exported == [pathlib.Path(result.best["run_dir"]) / "model.keras"]
  metrics = json.loads((exported[0].parent / "metrics.json").read_text())
  assert metrics["exported"] == "model.keras"
  assert not any(n.startswith("model.keras not exported") for n in metrics["notes"])
