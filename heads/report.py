"""Plots and a self-contained `report.html` for one head run, or for a whole compare grid.

    headstart report --run runs/compare/cells/mobilenet-imagenet-990de60e/linear/seed0
    # writes RUN/report.html in a few seconds (activation maps rebuild the backbone once)

A run's report holds: learning curves (loss and metric, train vs validation, from
`history.csv`), the test confusion matrix, a grid of misclassified test images with true and
predicted label and confidence (most confident mistakes first), keypoint overlays (true vs
predicted points) for keypoint runs, and activation maps of the frozen backbone (a few channels
from three depths) for a few test images. Images are joined to predictions by `id` from the
image dataset the features name (`image_dataset` in the feature manifest).

Figures are PNG files in `report_files/` next to the page, referenced by relative path, so the
page shows offline and keeps working when the folder is copied (no CDN, no scripts).
`headstart compare` writes one such page at the top of its `--out`: the leaderboard, the cost
ledger and the best cell's run report.
"""
from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")   # no display here or on CI; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from contracts import datasets  # noqa: E402

REPORT_NAME = "report.html"
ASSETS_DIR = "report_files"
MAX_MISCLASSIFIED = 16
MAX_KEYPOINT_IMAGES = 8
ACTIVATION_IMAGES = 3
ACTIVATION_LAYERS = 3
ACTIVATION_CHANNELS = 4

_STYLE = """
body { font-family: sans-serif; margin: 24px; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #eee; margin: 4px 0; }
.note { color: #666; font-size: 13px; }
.random { color: #b35900; font-weight: bold; }
"""


# ---------------------------------------------------------------------------------------------
# Reading a run


def _read_json(path: str) -> dict[str, Any]:
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)


def _read_csv(path: str) -> list[dict[str, str]]:
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path, "r") as f:
    return list(csv.DictReader(f))


def load_run(run_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(config.json, metrics.json)` of a finished run.

  Raises:
    ValueError: the directory holds no finished run.
  """
  run_dir = run_dir.rstrip("/")
  if not tf.io.gfile.exists(f"{run_dir}/metrics.json"):
    raise ValueError(f"--run {run_dir!r} is not a finished headstart run (no metrics.json)")
  return _read_json(f"{run_dir}/config.json"), _read_json(f"{run_dir}/metrics.json")


def image_dataset_dir(run_config: Mapping[str, Any]) -> str | None:
  """The image dataset a run's examples come from (features name it; scratch runs read it)."""
  if run_config.get("dataset_kind") == "images":
    return run_config.get("features")
  image = run_config.get("image") or {}
  if image.get("image_dataset"):
    return image["image_dataset"]
  features = run_config.get("features")
  if features and datasets.has_manifest(features):
    return datasets.read_manifest(features).get("image_dataset")
  return None


def load_split_images(image_dir: str, split: str = "test") -> dict[str, dict[str, Any]]:
  """`id -> {"image": uint8 HxWx3, "label" | "targets"}` for one split of an image dataset.

  Read through the manifest's shard list (like every reader here), decoded with TF.

  Raises:
    ValueError: no manifest or no such split.
  """
  from heads import reader
  spec = reader.load_spec(image_dir)
  if split not in spec.splits:
    raise ValueError(f"image dataset {image_dir!r} has no {split!r} split")
  files = datasets.shard_paths(image_dir, spec.manifest, split)
  parse = spec.schema.batch_parser(("id", "image", spec.target_key))
  examples = {}
  for batch in tf.data.TFRecordDataset(files).batch(256).map(parse).as_numpy_iterator():
    for index, identifier in enumerate(batch["id"]):
      image = tf.io.decode_image(batch["image"][index], channels=3, expand_animations=False)
      examples[identifier.decode()] = {"image": image.numpy(),
                                       spec.target_key: batch[spec.target_key][index]}
  return examples


# ---------------------------------------------------------------------------------------------
# Figures (each returns a PNG data URI)


def figure_png(figure) -> bytes:
  """Renders a matplotlib figure to PNG bytes and closes it."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
  plt.close(figure)
  return buffer.getvalue()


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


def learning_curves(history: Sequence[Mapping[str, str]], task: str) -> bytes | None:
  """Loss and metric per epoch, train vs validation; None without history."""
  if not history:
    return None
  epochs = [int(row["epoch"]) + 1 for row in history]
  metric = next((key for key in history[0] if key not in ("epoch", "loss", "learning_rate")
                 and not key.startswith("val_")), None)
  figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
  for axis, name in zip(axes, ("loss", metric)):
    if name is None:
      axis.set_visible(False)
      continue
    for prefix, style in (("", "-o"), ("val_", "--s")):
      values = [float(row[prefix + name]) if row.get(prefix + name) else np.nan for row in history]
      if not np.all(np.isnan(values)):
        axis.plot(epochs, values, style, markersize=3,
                  label="validation" if prefix else "train")
    axis.set_xlabel("epoch")
    axis.set_ylabel(name + (" (normalised coordinates)" if task == "keypoints" and name != "loss"
                            else ""))
    axis.legend()
    axis.grid(alpha=0.3)
  figure.suptitle("learning curves")
  return figure_png(figure)


def confusion_figure(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
  """Test confusion matrix: rows true class, columns predicted, counts annotated."""
  matrix = np.asarray(confusion)
  size = max(3.0, 0.55 * len(class_names) + 1.5)
  figure, axis = plt.subplots(figsize=(size + 1, size))
  image = axis.imshow(matrix, cmap="Blues")
  axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
  axis.set_yticks(range(len(class_names)), class_names)
  axis.set_xlabel("predicted")
  axis.set_ylabel("true")
  for (i, j), value in np.ndenumerate(matrix):
    axis.text(j, i, str(value), ha="center", va="center",
              color="white" if value > matrix.max() / 2 else "black")
  figure.colorbar(image, ax=axis, fraction=0.046)
  axis.set_title("test confusion matrix")
  return figure_png(figure)


def misclassified(predictions: Sequence[Mapping[str, str]], examples: Mapping[str, Any],
                  class_names: Sequence[str], *, limit: int = MAX_MISCLASSIFIED
                  ) -> tuple[bytes | None, int, int]:
  """Grid of wrong test predictions, most confident first.

  Returns:
    `(PNG or None when nothing is wrong or no image joins, wrong count, joined count)`.
  """
  wrong = []
  joined = 0
  for row in predictions:
    example = examples.get(row["id"])
    if example is None:
      continue
    joined += 1
    true = class_names[int(example["label"])]
    if row["label"] != true:
      confidence = float(row.get(f"prob_{row['label']}") or 0.0)
      wrong.append((confidence, true, row["label"], example["image"]))
  wrong.sort(key=lambda item: -item[0])
  if not wrong:
    return None, 0, joined
  shown = wrong[:limit]
  columns = min(len(shown), 8)
  rows = -(-len(shown) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 2.0 * rows), squeeze=False)
  for axis in axes.flat:
    axis.axis("off")
  for axis, (confidence, true, predicted, image) in zip(axes.flat, shown):
    axis.imshow(image)
    axis.set_title(f"true {true}\npred {predicted} {confidence:.2f}", fontsize=7)
  figure.suptitle(f"misclassified test images ({len(wrong)} of {joined}; "
                  f"showing {len(shown)}, most confident first)", fontsize=9)
  return figure_png(figure), len(wrong), joined


def keypoint_overlays(predictions: Sequence[Mapping[str, str]], examples: Mapping[str, Any],
                      num_keypoints: int, *, limit: int = MAX_KEYPOINT_IMAGES) -> bytes | None:
  """Test images with true (green circles) and predicted (red crosses) keypoints."""
  pairs = []
  for row in predictions:
    example = examples.get(row["id"])
    if example is None:
      continue
    predicted = np.array([[float(row[f"x{k}"]), float(row[f"y{k}"])]
                          for k in range(num_keypoints)])
    pairs.append((example["image"], np.asarray(example["targets"]).reshape(-1, 2), predicted))
    if len(pairs) >= limit:
      break
  if not pairs:
    return None
  columns = min(len(pairs), 4)
  rows = -(-len(pairs) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.7 * rows), squeeze=False)
  for axis in axes.flat:
    axis.axis("off")
  for axis, (image, true, predicted) in zip(axes.flat, pairs):
    height, width = image.shape[:2]
    axis.imshow(image)
    # Targets are normalised to the stored image; pixel centres sit at (size - 1) * t.
    axis.scatter(true[:, 0] * (width - 1), true[:, 1] * (height - 1), s=22, facecolors="none",
                 edgecolors="lime", linewidths=1.2, label="true")
    axis.scatter(predicted[:, 0] * (width - 1), predicted[:, 1] * (height - 1), s=22, c="red",
                 marker="x", linewidths=1.2, label="predicted")
  axes.flat[0].legend(fontsize=7, loc="lower left")
  figure.suptitle("test keypoints: true (green circles) vs predicted (red crosses)", fontsize=9)
  return figure_png(figure)


def _probe_layers(base) -> list[Any]:
  """Up to three conv-block outputs of a backbone at increasing depth (after their ReLU)."""
  import keras
  candidates = []
  for layer in base.layers:
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    if shape is None or len(shape) != 4:
      continue
    activated = isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)) or (
        isinstance(layer, keras.layers.Conv2D)
        and getattr(layer, "activation", None) is not keras.activations.linear)
    if activated:
      candidates.append(layer)
  if len(candidates) <= ACTIVATION_LAYERS:
    return candidates
  picks = np.linspace(0, len(candidates) - 1, ACTIVATION_LAYERS).round().astype(int)
  return [candidates[i] for i in picks]


def activation_maps(model, images: Sequence[np.ndarray], input_size: int,
                    title: str) -> bytes | None:
  """A few channels from three depths of `model` (an extractor or a scratch CNN) per image.

  `model` takes float32 images in [0, 255]; a nested base model (the extractor's frozen
  application) is probed directly after the extractor's own preprocessing layers. For each layer
  the channels whose activations vary most over the shown images are drawn.
  """
  import keras
  nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
  base = nested[0] if nested else model
  before = []
  if nested:
    for layer in model.layers[1:]:
      if layer is base:
        break
      before.append(layer)
  picked = _probe_layers(base)
  if not picked or not images:
    return None
  probe = keras.Model(base.inputs, [layer.output for layer in picked])
  batch = tf.image.resize(np.stack(images).astype(np.float32), (input_size, input_size))
  x = batch
  for layer in before:
    x = layer(x)
  outputs = probe(x, training=False)
  outputs = [np.asarray(o, np.float32) for o in (outputs if isinstance(outputs, list)
                                                 else [outputs])]
  columns = 1 + len(picked) * ACTIVATION_CHANNELS
  figure, axes = plt.subplots(len(images), columns, figsize=(1.15 * columns, 1.3 * len(images)),
                              squeeze=False)
  for axis in axes.flat:
    axis.axis("off")
  for row, image in enumerate(images):
    axes[row, 0].imshow(image)
    if row == 0:
      axes[row, 0].set_title("image", fontsize=7)
  for index, (layer, values) in enumerate(zip(picked, outputs)):
    # The most varied channels: a channel stuck at 0 (or at ReLU6's 6) shows nothing.
    channels = np.argsort(-values.std(axis=(0, 1, 2)))[:ACTIVATION_CHANNELS]
    for c_index, channel in enumerate(channels):
      column = 1 + index * ACTIVATION_CHANNELS + c_index
      for row in range(len(images)):
        axes[row, column].imshow(values[row, :, :, channel], cmap="viridis")
        if row == 0:
          axes[row, column].set_title(f"{layer.name}\n#{channel} "
                                      f"{values.shape[1]}x{values.shape[2]}", fontsize=6)
  figure.suptitle(title, fontsize=9)
  return figure_png(figure)


def _activation_section(run_dir: str, run_config: Mapping[str, Any],
                        images: Sequence[np.ndarray]) -> tuple[bytes | None, str]:
  """Activation maps of the run's backbone, or (None, why not)."""
  import keras
  if not images:
    return None, "no test images could be joined, so no activation maps"
  if run_config.get("dataset_kind") == "images":
    model = keras.models.load_model(f"{run_dir}/head.keras", compile=False)
    return activation_maps(model, images, int(model.input_shape[1]),
                           "activation maps of the from-scratch CNN"), ""
  from features import backbones
  features_dir = run_config["features"]
  manifest = datasets.read_manifest(features_dir)
  try:
    model = backbones.load_backbone_for_features(features_dir, manifest)
  except (ValueError, OSError) as error:
    return None, f"backbone could not be rebuilt for activation maps: {error}"
  weights = manifest.get("weights_kind")
  label = "random init" if weights == "none" else weights
  return activation_maps(model, images, int(manifest["input_size"]),
                         f"activation maps of the frozen {manifest['backbone']} ({label} "
                         "weights): top channels at three depths"), ""


# ---------------------------------------------------------------------------------------------
# HTML


def _img(src: str, alt: str) -> str:
  return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                 for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _weights_text(weights_kind: str) -> str:
  from heads import compare
  label = compare.weights_label(weights_kind)
  css = ' class="random"' if weights_kind == "none" else ""
  return f"<span{css}>{html.escape(label)}</span>"


def run_sections(run_dir: str, assets: Assets, *, log: Callable[[str], None] = print) -> str:
  """The HTML body of one run's report (headings, metrics table, figures, notes).

  Args:
    run_dir: a finished run.
    assets: where the figures go (their paths are relative to the page).
    log: progress lines.
  """
  run_dir = run_dir.rstrip("/")
  run_config, result = load_run(run_dir)
  task = result.get("task", run_config.get("task"))
  class_names = result.get("class_names") or run_config.get("class_names") or []
  weights = ("scratch" if run_config.get("dataset_kind") == "images"
             else str(result.get("weights_kind")))
  parts = [f"<h2>Run {html.escape(run_dir)}</h2>",
           f"<p>head <b>{html.escape(str(result.get('head')))}</b> on backbone "
           f"<b>{html.escape(str(result.get('backbone')))}</b>, weights "
           f"{_weights_text(weights)}; "
           f"{result.get('params')} head "
           f"parameters, {result.get('epochs')} epochs, "
           f"{(result.get('train_seconds') or 0):.1f} s training.</p>"]
  rows = []
  for split in ("validation", "test"):
    block = result.get(split) or {}
    rows.append([split, block.get("num_examples"), *(
        (f"{block[k]:.4f}" if isinstance(block.get(k), float) else block.get(k, "-"))
        for k in (("mae_px", "mae_px_source", "rmse_px") if task == "keypoints"
                  else ("accuracy", "loss")))])
  header = ["split", "examples", *(("MAE px (stored)", "MAE px (source)", "RMSE px")
                                   if task == "keypoints" else ("accuracy", "loss"))]
  parts.append(_table(header, rows))
  notes = list(result.get("notes") or [])

  curves = learning_curves(_read_csv(f"{run_dir}/history.csv"), task)
  if curves:
    parts += ["<h3>Learning curves</h3>",
              _img(assets.add("learning_curves", curves), "learning curves")]
  confusion = (result.get("test") or {}).get("confusion_matrix")
  if confusion and class_names:
    parts += ["<h3>Confusion matrix (test)</h3>", _img(
        assets.add("confusion_matrix", confusion_figure(confusion, class_names)),
        "confusion matrix")]

  predictions = _read_csv(f"{run_dir}/predictions_test.csv")
  image_dir = image_dataset_dir(run_config)
  examples: dict[str, Any] = {}
  if image_dir and datasets.has_manifest(image_dir):
    try:
      examples = load_split_images(image_dir, "test")
    except ValueError as error:
      notes.append(f"test images not shown: {error}")
  else:
    notes.append(f"image dataset {image_dir!r} is not reachable: no example images")
  if predictions and examples:
    if task == "keypoints":
      overlay = keypoint_overlays(predictions, examples, int(run_config.get("num_keypoints") or 0))
      if overlay:
        parts += ["<h3>Keypoints (test)</h3>",
                  _img(assets.add("keypoints", overlay), "keypoint overlays")]
    else:
      grid, wrong, joined = misclassified(predictions, examples, class_names)
      parts.append("<h3>Misclassified test images</h3>")
      parts.append(_img(assets.add("misclassified", grid), "misclassified test images") if grid else
                   f"<p>No misclassified image among the {joined} test images joined by id.</p>")
  shown = [examples[row["id"]]["image"] for row in predictions[:ACTIVATION_IMAGES]
           if row["id"] in examples]
  log(f"report {run_dir}: activation maps")
  activations, why = _activation_section(run_dir, run_config, shown)
  if activations:
    parts += ["<h3>Activation maps</h3>",
              _img(assets.add("activation_maps", activations), "activation maps")]
  elif why:
    notes.append(why)
  if notes:
    parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                 + "</ul>")
  return "\n".join(parts)


def _page(title: str, body: str) -> str:
  return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
          f"</title><style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n"
          "</body></html>\n")


def write_run_report(run_dir: str, *, log: Callable[[str], None] = print) -> str:
  """Writes `RUN_DIR/report.html`; returns its path.

  Raises:
    ValueError: not a finished run.
  """
  run_dir = run_dir.rstrip("/")
  body = run_sections(run_dir, Assets(run_dir), log=log)
  path = f"{run_dir}/{REPORT_NAME}"
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(_page("headstart report", body))
  return path


def write_compare_report(out_dir: str, rows: Sequence[Mapping[str, Any]],
                         ledger: Mapping[str, Any], best: Mapping[str, Any] | None, *,
                         notes: Sequence[str] = (),
                         log: Callable[[str], None] = print) -> str:
  """Writes the one `OUT/report.html` of a compare grid; returns its path.

  Holds the leaderboard (table and chart), the cost ledger, and the best cell's run report
  (best on validation, so the page does not pick on the test set).
  """
  from heads import compare
  out_dir = out_dir.rstrip("/")
  table_rows = [[r["rank"], r["backbone"], r["dataset"], r["weights"], r["head"], r["metric"],
                 compare.score_text(r["test_mean"], r["test_std"]),
                 compare.score_text(r["val_mean"], r["val_std"]), r["seeds"], r["params"],
                 compare.fmt(r["train_seconds_mean"], 1),
                 compare.fmt(r["examples_per_second_mean"], 0)] for r in rows]
  parts = ["<h2>Leaderboard</h2>",
           "<p class='note'>One row per (feature dataset, head); mean ± sample std over seeds. "
           "Weights <span class='random'>none (random init)</span> mean the backbone was never "
           "trained: those rows show what the architecture alone gives.</p>",
           _table(["#", "backbone", "dataset", "weights", "head", "metric", "test", "validation",
                   "seeds", "params", "train s", "examples/s"], table_rows),
           _img(compare.LEADERBOARD_PNG, "leaderboard chart"),
           "<h2>Cost ledger</h2>",
           "<pre>" + html.escape("\n".join(compare.ledger_lines(ledger))) + "</pre>",
           f"<p class='note'>{html.escape(ledger.get('method', ''))}</p>"]
  if notes:
    parts.append("<ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                 + "</ul>")
  if best:
    parts.append(f"<h2>Best cell: {html.escape(best['backbone'])} "
                 f"({html.escape(best['weights'])}) / {html.escape(best['head'])}, seed "
                 f"{best['seed']}</h2><p class='note'>Chosen by validation "
                 f"{html.escape(best['metric'])}.</p>")
    parts.append(run_sections(best["run_dir"], Assets(out_dir, prefix="best_"), log=log))
  path = f"{out_dir}/{REPORT_NAME}"
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(_page("headstart compare", "\n".join(parts)))
  return path
