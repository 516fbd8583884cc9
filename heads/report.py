"""A self-contained `report.html` for one head run, or for a whole compare grid.

    headstart report --run runs/compare/cells/mobilenet-imagenet-990de60e/linear/seed0
    # writes RUN/report.html in a few seconds (activation maps rebuild the backbone once)

A run's report holds: learning curves (loss and metric, train vs validation, from
`history.csv`), the test confusion matrix, a grid of misclassified test images with true and
predicted label and confidence (most confident mistakes first), keypoint overlays (true vs
predicted points) for keypoint runs, and activation maps of the frozen backbone (a few channels
from three depths) for a few test images. Images are joined to predictions by `id` from the
image dataset the features name (`image_dataset` in the feature manifest). The figures are
drawn by `heads.plots`; this module assembles the page.

Figures are PNG files in `report_files/` next to the page, referenced by relative path, so the
page shows offline and keeps working when the folder is copied (no CDN, no scripts).
`headstart compare` writes one such page at the top of its `--out`: the leaderboard, the cost
ledger and the best cell's run report.
"""
from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from contracts import datasets, runs
from heads import leaderboard, plots, reader, training

REPORT_NAME = "report.html"
ASSETS_DIR = "report_files"
ACTIVATION_IMAGES = 3

_STYLE = """
body { font-family: sans-serif; margin: 24px; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #eee; margin: 4px 0; }
.note { color: #666; font-size: 13px; }
.random { color: #b35900; font-weight: bold; }
"""


class Assets:
  """Writes a page's figures to `<page folder>/report_files/` and returns their relative paths."""

  def __init__(self, page_dir: str, prefix: str = ""):
    self.page_dir = page_dir.rstrip("/")
    self.prefix = prefix
    tf.io.gfile.makedirs(f"{self.page_dir}/{ASSETS_DIR}")

  def add(self, name: str, png: bytes) -> str:
    """Stores one PNG; returns the `src` to use in the page."""
    relative = f"{ASSETS_DIR}/{self.prefix}{name}.png"
    with tf.io.gfile.GFile(f"{self.page_dir}/{relative}", "wb") as f:
      f.write(png)
    return relative

  def figure(self, name: str, png: bytes, heading: str, alt: str) -> list[str]:
    """`<h3>heading</h3>` and the stored figure."""
    return [f"<h3>{html.escape(heading)}</h3>", _img(self.add(name, png), alt)]


def _img(src: str, alt: str) -> str:
  return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                 for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _notes(notes: Sequence[str]) -> str:
  return "<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"


def _weights_text(weights_kind: str) -> str:
  label = leaderboard.weights_label(weights_kind)
  css = ' class="random"' if weights_kind == "none" else ""
  return f"<span{css}>{html.escape(label)}</span>"


def _summary(run: runs.RunDir, run_config: Mapping[str, Any], result: Mapping[str, Any],
             task: str) -> list[str]:
  """The run's heading, one line on what was trained, and its metrics table."""
  weights = ("scratch" if run_config.get("dataset_kind") == "images"
             else str(result.get("weights_kind")))
  parts = [f"<h2>Run {html.escape(run.path)}</h2>",
           f"<p>head <b>{html.escape(str(result.get('head')))}</b> on backbone "
           f"<b>{html.escape(str(result.get('backbone')))}</b>, weights "
           f"{_weights_text(weights)}; "
           f"{result.get('params')} head "
           f"parameters, {result.get('epochs')} epochs, "
           f"{(result.get('train_seconds') or 0):.1f} s training.</p>"]
  keys = ("mae_px", "mae_px_source", "rmse_px") if task == "keypoints" else ("accuracy", "loss")
  rows = []
  for split in ("validation", "test"):
    block = result.get(split) or {}
    rows.append([split, block.get("num_examples"), *(
        (f"{block[k]:.4f}" if isinstance(block.get(k), float) else block.get(k, "-"))
        for k in keys)])
  header = ["split", "examples", *(("MAE px (stored)", "MAE px (source)", "RMSE px")
                                   if task == "keypoints" else ("accuracy", "loss"))]
  return [*parts, _table(header, rows)]


def _test_examples(run_config: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
  """The run's test images by id (empty, with a note, when the image dataset is unreachable)."""
  image_dir = training.image_dataset_dir(run_config)
  if not image_dir or not datasets.has_manifest(image_dir):
    notes.append(f"image dataset {image_dir!r} is not reachable: no example images")
    return {}
  try:
    return reader.load_split_images(image_dir, "test")
  except ValueError as error:
    notes.append(f"test images not shown: {error}")
    return {}


def _example_figures(run_config: Mapping[str, Any], task: str, class_names: Sequence[str],
                     predictions: Sequence[Mapping[str, str]], examples: Mapping[str, Any],
                     assets: Assets) -> list[str]:
  """Keypoint overlays, or the misclassified grid, of the test images joined by id."""
  if not predictions or not examples:
    return []
  if task == "keypoints":
    overlay = plots.keypoint_overlays(predictions, examples,
                                      int(run_config.get("num_keypoints") or 0))
    return assets.figure("keypoints", overlay, "Keypoints (test)",
                         "keypoint overlays") if overlay else []
  png, wrong, joined = plots.misclassified(predictions, examples, class_names)
  return ["<h3>Misclassified test images</h3>",
          _img(assets.add("misclassified", png), "misclassified test images") if png else
          f"<p>No misclassified image among the {joined} test images joined by id.</p>"]


def run_sections(run_dir: str, assets: Assets, *, log: Callable[[str], None] = print) -> str:
  """The HTML body of one run's report (headings, metrics table, figures, notes).

  Args:
    run_dir: a finished run.
    assets: where the figures go (their paths are relative to the page).
    log: progress lines.

  Raises:
    ValueError: not a finished run.
  """
  run = runs.RunDir(run_dir)
  run_config, result = run.load()
  task = result.get("task", run_config.get("task"))
  class_names = result.get("class_names") or run_config.get("class_names") or []
  parts = _summary(run, run_config, result, task)
  notes = list(result.get("notes") or [])
  curves = plots.learning_curves(run.history(), task)
  if curves:
    parts += assets.figure("learning_curves", curves, "Learning curves", "learning curves")
  confusion = (result.get("test") or {}).get("confusion_matrix")
  if confusion and class_names:
    parts += assets.figure("confusion_matrix", plots.confusion_figure(confusion, class_names),
                           "Confusion matrix (test)", "confusion matrix")
  predictions = run.predictions()
  examples = _test_examples(run_config, notes)
  parts += _example_figures(run_config, task, class_names, predictions, examples, assets)
  shown = [examples[row["id"]]["image"] for row in predictions[:ACTIVATION_IMAGES]
           if row["id"] in examples]
  log(f"report {run.path}: activation maps")
  activations, why = plots.run_activation_maps(run, run_config, shown)
  if activations:
    parts += assets.figure("activation_maps", activations, "Activation maps", "activation maps")
  elif why:
    notes.append(why)
  if notes:
    parts.append(_notes(notes))
  return "\n".join(parts)


def _page(title: str, body: str) -> str:
  return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
          f"</title><style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n"
          "</body></html>\n")


def _write_page(path: str, title: str, body: str) -> str:
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(_page(title, body))
  return path


def write_run_report(run_dir: str, *, log: Callable[[str], None] = print) -> str:
  """Writes `RUN_DIR/report.html`; returns its path.

  Raises:
    ValueError: not a finished run.
  """
  run = runs.RunDir(run_dir)
  body = run_sections(run.path, Assets(run.path), log=log)
  return _write_page(run.file(REPORT_NAME), "headstart report", body)


def _leaderboard_sections(rows: Sequence[Mapping[str, Any]],
                          ledger: Mapping[str, Any]) -> list[str]:
  """The leaderboard table and chart, and the cost ledger."""
  table_rows = [[r["rank"], r["backbone"], r["dataset"], r["weights"], r["head"], r["metric"],
                 leaderboard.score_text(r["test_mean"], r["test_std"]),
                 leaderboard.score_text(r["val_mean"], r["val_std"]), r["seeds"], r["params"],
                 leaderboard.fmt(r["train_seconds_mean"], 1),
                 leaderboard.fmt(r["examples_per_second_mean"], 0)] for r in rows]
  return ["<h2>Leaderboard</h2>",
          "<p class='note'>One row per (feature dataset, head); mean ± sample std over seeds. "
          "Weights <span class='random'>none (random init)</span> mean the backbone was never "
          "trained: those rows show what the architecture alone gives.</p>",
          _table(["#", "backbone", "dataset", "weights", "head", "metric", "test", "validation",
                  "seeds", "params", "train s", "examples/s"], table_rows),
          _img(leaderboard.LEADERBOARD_PNG, "leaderboard chart"),
          "<h2>Cost ledger</h2>",
          "<pre>" + html.escape("\n".join(leaderboard.ledger_lines(ledger))) + "</pre>",
          f"<p class='note'>{html.escape(ledger.get('method', ''))}</p>"]


def write_compare_report(out_dir: str, rows: Sequence[Mapping[str, Any]],
                         ledger: Mapping[str, Any], best: Mapping[str, Any] | None, *,
                         notes: Sequence[str] = (),
                         log: Callable[[str], None] = print) -> str:
  """Writes the one `OUT/report.html` of a compare grid; returns its path.

  Holds the leaderboard (table and chart), the cost ledger, and the best cell's run report
  (best on validation, so the page does not pick on the test set).
  """
  out_dir = out_dir.rstrip("/")
  parts = _leaderboard_sections(rows, ledger)
  if notes:
    parts.append(_notes(notes))
  if best:
    parts.append(f"<h2>Best cell: {html.escape(best['backbone'])} "
                 f"({html.escape(best['weights'])}) / {html.escape(best['head'])}, seed "
                 f"{best['seed']}</h2><p class='note'>Chosen by validation "
                 f"{html.escape(best['metric'])}.</p>")
    parts.append(run_sections(best["run_dir"], Assets(out_dir, prefix="best_"), log=log))
  return _write_page(f"{out_dir}/{REPORT_NAME}", "headstart compare", "\n".join(parts))
