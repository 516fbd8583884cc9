"""`headstart extract --estimate`: a sample run predicts images/s, worker-hours and cost, and the
real run keeps the prediction beside its measured figures, up to compare's cost ledger.

    .venv/bin/python -m pytest tests/test_estimate.py -q
"""
from __future__ import annotations

import json

import pytest

import headstart
from features import estimate as estimate_lib
from features import run as extract
from heads import grid, leaderboard
from contracts import datasets


def test_estimate_then_real_run_keeps_it_beside_the_measured_figures(tiny_image_dataset,
                                                                      tmp_path, capsys):
  out = tmp_path / "features"
  args = ["--images", str(tiny_image_dataset), "--out", str(out), "--backbones", "mobilenet_v2",
          "--weights", "none", "--input-size", "32", "--batch-size", "8", "--views", "1"]
  assert extract.run([*args, "--estimate", "--price-per-hour", "2.5",
                      "--estimate-images", "10"]) is None
  printed = capsys.readouterr().out
  result = json.loads((out / estimate_lib.ESTIMATE_NAME).read_text())
  assert not (out / "index.json").exists()  # nothing extracted
  manifest = datasets.read_manifest(str(tiny_image_dataset))
  train = manifest["splits"]["train"]["num_examples"]
  assert result["images"] == 24 + train  # every record, plus one view per train image
  assert result["sample_images"] == 10 and result["device"].startswith("CPU")
  (entry,) = result["backbones"]
  assert entry["backbone"] == "mobilenet_v2" and entry["forward_images_per_second"] > 0
  assert result["worker_hours"] == pytest.approx(
      result["images"] / result["images_per_second_per_worker"] / 3600)
  assert result["cost"] == pytest.approx(2.5 * result["worker_hours"])
  assert "mobilenet_v2:" in printed and "worker-hours, cost" in printed

  extract.run(args)
  (entry_dir,) = [p for p in out.iterdir() if p.is_dir()]
  features = datasets.read_manifest(str(entry_dir))
  assert features["cache_key"] == entry["cache_key"]
  assert features["estimate"]["forward_images_per_second"] == entry["forward_images_per_second"]
  assert features["estimate"]["cost"] == result["cost"] and features["extraction_seconds"] > 0
  ledger = leaderboard.cost_ledger(grid.read_index(str(out)), [])
  assert ledger["backbones"][0]["estimate"] == features["estimate"]
  assert "estimated beforehand on CPU" in leaderboard.ledger_lines(ledger)[1]


def test_bad_price_is_one_line(tiny_image_dataset, tmp_path, capsys):
  code = headstart.main(["extract", "--images", str(tiny_image_dataset), "--out", str(tmp_path),
                         "--estimate", "--price-per-hour", "cheap"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "'cheap' is not a number" in err[0]
