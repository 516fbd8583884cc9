"""`headstart reproduce`: expectation checks, sample preparation, and every config's tiny variant.

    .venv/bin/pytest tests/test_reproduce.py -q      # ~2-3 min on 2 cores (six tiny runs)

Each tiny variant runs all stages in process on data/sample (<= 40 images, 96-128 px, MobileNet
v1 with the shipped ImageNet weights and/or random init) and must report PASS on every check;
the checks compare numbers this run measured with the config's documented expectation.
"""
from __future__ import annotations

import csv
import pathlib

import pytest

from headstart import reproduce

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (REPO_ROOT / "configs").glob("*.py"))


def _row(backbone, weights, head, test, val=None, better="higher", metric="accuracy"):
  return {"backbone": backbone, "weights": weights, "head": head, "test_mean": test,
          "val_mean": val, "better": better, "metric": metric}


ROWS = [
    _row("vgg16", "imagenet", "conv", 0.90, 0.88),
    _row("vgg16", "none (random init)", "conv", 0.55, 0.50),
    _row("none (from scratch)", "n/a (trained from scratch)", "scratch", 0.70, 0.35),
]


@pytest.mark.parametrize("spec, passed", [
    ({"backbone": "vgg16", "head": "conv", "value": 0.89, "tolerance": 0.03}, True),
    ({"backbone": "vgg16", "head": "conv", "value": 0.80, "tolerance": 0.03}, False),
    ({"head": "scratch", "split": "validation", "at_least": 0.3, "at_most": 0.4}, True),
    ({"head": "scratch", "at_least": 0.82}, False),
    ({"backbone": "vgg16", "weights": "imagenet", "head": "conv", "beats": {"weights": "none"},
      "margin": 0.3}, True),
    ({"backbone": "vgg16", "weights": "none", "head": "conv", "beats": {"weights": "imagenet"}},
     False),
    ({"backbone": "resnet50", "head": "conv", "value": 0.9, "tolerance": 1.0}, False),  # missing
])
def test_check_expectation(spec, passed):
  check = reproduce.check_expectation(ROWS, spec)
  assert check.passed is passed
  assert check.line().startswith("PASS" if passed else "FAIL")


def test_lower_is_better_for_keypoints():
  rows = [_row("vgg16", "imagenet", "keypoints", 5.0, better="lower", metric="mae_px"),
          _row("vgg16", "none (random init)", "keypoints", 20.0, better="lower",
               metric="mae_px")]
  spec = {"backbone": "vgg16", "weights": "imagenet", "head": "keypoints",
          "beats": {"weights": "none"}, "margin": 10.0}
  assert reproduce.check_expectation(rows, spec).passed
  assert not reproduce.check_expectation(rows, {**spec, "margin": 20.0}).passed


def test_bad_config_and_missing_data_raise_value_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    reproduce.load_experiment(str(tmp_path / "nope.py"), tiny=True)
  (tmp_path / "empty.py").write_text("X = 1\n")
  with pytest.raises(ValueError, match="get_config"):
    reproduce.load_experiment(str(tmp_path / "empty.py"), tiny=True)
  with pytest.raises(ValueError, match="--source"):
    reproduce.reproduce(str(REPO_ROOT / "configs" / "gender_faces.py"),
                        source=str(tmp_path / "missing.csv"), out=str(tmp_path / "out"))
  with pytest.raises(ValueError, match="split"):
    reproduce.check_expectation(ROWS, {"head": "conv", "split": "train", "at_least": 0})


@pytest.mark.parametrize("name", CONFIGS)
def test_config_documents_command_source_and_both_variants(name):
  path = REPO_ROOT / "configs" / name
  text = path.read_text()
  assert text.startswith('"""') and f"headstart reproduce configs/{name}" in text
  assert "--tiny" in text and "Published" in text
  full = reproduce.load_experiment(str(path), tiny=False)
  tiny = reproduce.load_experiment(str(path), tiny=True)
  assert full["expect"] and tiny["expect"]
  assert int(tiny["sample"]["rows"]) <= 40
  sizes = [int(flags[flags.index("--input-size") + 1]) for flags in tiny["extract"]]
  assert max(sizes) <= 128


def test_sample_csv_subset_keeps_ids_relative(tmp_path):
  path, flags = reproduce.prepare_sample({"csv": "data/sample/gender.csv", "rows": 10},
                                         REPO_ROOT, str(tmp_path))
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 10 and {r["gender"] for r in rows} == {"man", "woman"}
  assert all(pathlib.Path(r["image_url"]).is_absolute() for r in rows)
  assert flags == ["--allow-root", str((REPO_ROOT / "data" / "sample").resolve())]


def test_sample_split_tree(tmp_path):
  root, flags = reproduce.prepare_sample(
      {"csv": "data/sample/category.csv", "rows": 12, "layout": "split_tree",
       "label_column": "category", "validation_every": 4}, REPO_ROOT, str(tmp_path))
  files = sorted(pathlib.Path(root).rglob("*.png"))
  assert len(files) == 12 and flags == []
  assert sum(f.parts[-3] == "val" for f in files) == 3


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_variant_runs_and_passes(name, tmp_path):
  lines = []
  outcome = reproduce.reproduce(str(REPO_ROOT / "configs" / name), tiny=True,
                                out=str(tmp_path / "run"), log=lines.append)
  assert all(check.measured is not None for check in outcome.checks), lines
  assert any(line.startswith(("PASS", "FAIL")) for line in lines)
  assert (tmp_path / "run" / "compare" / "report.html").exists()
  assert outcome.passed, "\n".join(check.line() for check in outcome.checks)
