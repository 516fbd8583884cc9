"""Fine-tuning starts where the head left off, on the real sample (issue 18).

    .venv/bin/python -m pytest tests/test_head_quality.py -q -m slow     # ~1 min on 2 cores

The emoji categories of `data/sample/category.csv` (6 classes, 159/51/54 images) ingested at
128 px, MobileNet features with the shipped ImageNet weights, a `gap_dense` head, then
`headstart finetune --unfreeze 20` on the images: its first epoch's training loss stays within
1.5x the loss the loaded model starts from, and its test accuracy within 2 points of the head's.
The rate fine-tuning used before (the run's 1e-3 x 0.1, no warm-up) is run for contrast: its
first epoch undoes the head, and the run says so.
"""
from __future__ import annotations

import csv
import json

import pytest

from features import run as extract
from heads import config as config_lib
from heads import finetune, training
from tests.conftest import MOBILENET_WEIGHTS as WEIGHTS_FILE
from tests.conftest import ingest_emoji_sample


def _first_epoch_loss(run_dir) -> float:
  with open(run_dir / "history.csv") as f:
    return float(next(csv.DictReader(f))["loss"])


@pytest.mark.slow
@pytest.mark.real_weights
def test_finetune_on_the_sample_starts_at_the_head_and_keeps_its_accuracy(tmp_path):
  images = ingest_emoji_sample("category", "category", tmp_path / "images")
  extract.run(["--images", str(images), "--out", str(tmp_path / "features"),
               "--backbones", "mobilenet", "--weights", str(WEIGHTS_FILE)])
  index = json.loads((tmp_path / "features" / "index.json").read_text())
  features = tmp_path / "features" / index["datasets"][0]["dir"]
  head = training.train(str(features), "gap_dense", str(tmp_path / "head"),
                        config_lib.override(config_lib.Config(), {"train": {"epochs": 20}}),
                        verbose=0)
  tuned = finetune.finetune(str(tmp_path / "head"), str(images), unfreeze=20,
                            out_dir=str(tmp_path / "ft"), epochs=2, verbose=0)
  start = tuned["start"]["train"]["loss"]
  first = _first_epoch_loss(tmp_path / "ft")
  print(f"head test {head['test']['accuracy']:.3f}; fine-tune start loss {start:.4g}, first "
        f"epoch {first:.4g}, test {tuned['test']['accuracy']:.3f}; notes {tuned['notes']}")
  assert first <= 1.5 * start, (first, start)
  assert tuned["test"]["accuracy"] >= head["test"]["accuracy"] - 0.02
  assert not any("first epoch" in note for note in tuned["notes"])
  # The old default (1e-3 x 0.1, no warm-up) undoes the head in its first epoch, and says so.
  old = finetune.finetune(str(tmp_path / "head"), str(images), unfreeze=20,
                          out_dir=str(tmp_path / "old"), epochs=1, learning_rate=1e-4,
                          warmup_epochs=0, verbose=0)
  assert _first_epoch_loss(tmp_path / "old") > 1.5 * old["start"]["train"]["loss"]
  assert any("first epoch's training loss" in note for note in old["notes"]), old["notes"]
