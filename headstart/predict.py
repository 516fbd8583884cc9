"""Predicts new images with a run's exported `model.keras` (backbone + head in one model).

    headstart predict --model runs/gender_vgg16 --images some/folder --out predictions.csv
    headstart predict --model runs/x --images urls.csv --allow-network 10.0.0.0/8   # URLs too

Sources are what `headstart ingest` accepts: a folder (recursive) or a CSV whose `image_url`
(else first) column holds local paths, `gs://` objects or http(s) URLs, fetched by ingest's
fetcher with the same address guard, timeouts and byte cap.
Images are prepared exactly like the training images: `pipeline.image_decode.decode_and_resize`
with the image dataset's size, resize mode and pad colour, then encoded in the dataset's format
and decoded again (JPEG is lossy, and the backbone saw the stored JPEG), then run through the
model in batches. Ids are those ingest gives: sha256 of the path relative to the folder (or as
written in the CSV, relative to the CSV's folder), so rows join with `predictions_test.csv`.
An image that cannot be read or decoded becomes a row with its `error` and no label.
"""
from __future__ import annotations

import csv
import io
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contracts import cli, pixels, runs
from heads import export
from pipeline import fetch, image_decode, paths, redact, sources

_URL_COLUMN = "image_url"


def _list_folder(folder: str) -> Iterator[tuple[str, str, str]]:
  folder = folder.rstrip("/")
  for directory, _, files in sorted(tf.io.gfile.walk(folder)):
    relative_dir = directory[len(folder):].strip("/")
    for name in sorted(files):
      if name.lower().endswith(sources.IMAGE_EXTENSIONS):
        relative = f"{relative_dir}/{name}" if relative_dir else name
        yield f"{folder}/{relative}", relative, ""


def _list_csv(path: str) -> Iterator[tuple[str, str, str]]:
  base_dir = paths.real_path(path.rsplit("/", 1)[0] if "/" in path else ".")
  with tf.io.gfile.GFile(path, "r") as f:
    rows = list(csv.reader(f))
  if not rows:
    raise ValueError(f"CSV {path!r} is empty")
  header = rows[0]
  column = header.index(_URL_COLUMN) if _URL_COLUMN in header else 0
  for row in rows[1:]:
    if not row or not row[column].strip():
      continue
    source = row[column].strip()
    if urllib.parse.urlsplit(source).scheme.lower() in sources.REMOTE_SCHEMES:
      yield source, source, ""   # the id is ingest's: the URL as written
      continue
    try:
      # Absolute paths are the user's own files here, so any root is allowed.
      location, canonical = sources.resolve_location(source, base_dir, allow_roots=("/",))
    except sources.RowError as error:
      yield "", source, error.reason
      continue
    yield location, canonical, ""


def list_images(images: str) -> list[tuple[str, str, str]]:
  """`(location, canonical source, error reason)` of a folder (recursive) or a CSV of paths.

  Raises:
    ValueError: the path is neither a folder nor a CSV file.
  """
  if tf.io.gfile.isdir(images):
    return list(_list_folder(images))
  if images.lower().endswith(".csv") and tf.io.gfile.exists(images):
    return list(_list_csv(images))
  raise ValueError(f"--images {images!r} is neither a folder nor a CSV file of image paths")


def prepare_image(data: bytes, settings: dict[str, Any]) -> np.ndarray:
  """Encoded image bytes -> float32 `[S, S, 3]` in [0, 255]: the pixels the model saw in
  training. Ingest's own decode/resize gives the image ingest would store, encoded as it would
  be stored (JPEG is lossy, and the backbone saw the stored JPEG), then `contracts.pixels.decode`
  decodes it as extraction did.

  Raises:
    pipeline.image_decode.ImageError: the bytes are not a usable image.
  """
  background = tuple(settings.get("background") or (255, 255, 255))
  decoded = image_decode.decode_and_resize(
      data, size=int(settings["image_size"]), resize=settings.get("resize") or "stretch",
      background=background)
  image_format = settings.get("format")
  if image_format not in image_decode.FORMATS:
    return decoded.rgb.astype(np.float32)   # a dataset that does not record its format
  stored = image_decode.encode(decoded.rgb, image_format)
  return pixels.decode(stored).numpy().astype(np.float32)


def predict_images(run_dir: str, images: str, out_path: str, *, batch_size: int = 32,
                   fetch_config: fetch.FetchConfig = fetch.FetchConfig()) -> dict[str, Any]:
  """Writes `id,source,error,label,prob_<class>...` (or keypoint columns) for every image.

  Args:
    run_dir: a finished `headstart train` run with `model.keras`.
    images: folder of images or CSV whose `image_url` (else first) column holds paths or URLs.
    out_path: the CSV to write.
    batch_size: images per model call.
    fetch_config: limits and address guard of downloads (ingest's fetcher).

  Returns:
    A summary: rows written, images predicted, images in error.

  Raises:
    ValueError: not a run, no exported model, or no images found.
  """
  run_dir = run_dir.rstrip("/")
  trained = runs.RunDir(run_dir)
  run, _ = trained.load()
  if not trained.exists(runs.MODEL_NAME):
    raise ValueError(f"run {run_dir!r} has no {runs.MODEL_NAME} (see notes in its metrics.json)")
  settings = dict(run["image"])
  if not settings.get("image_size"):
    raise ValueError(f"run {run_dir!r} does not record the image size its model expects")
  listed = list_images(images)
  if not listed:
    raise ValueError(f"no images found in {images!r}")
  model = keras.models.load_model(trained.model_path, compile=False)
  outputs, errors = _predict_rows(model, listed, settings, batch_size, fetch.Fetcher(fetch_config))
  _write_csv(out_path, run, listed, outputs, errors)
  predicted = sum(output is not None for output in outputs)
  return {"rows": len(listed), "predicted": predicted, "errors": len(listed) - predicted,
          "out": out_path}


def _predict_rows(model: keras.Model, listed: list[tuple[str, str, str]],
                  settings: dict[str, Any], batch_size: int, fetcher: fetch.Fetcher
                  ) -> tuple[list[np.ndarray | None], list[str]]:
  """The model's output per listed image (None where it failed) and each row's error reason."""
  outputs: list[np.ndarray | None] = [None] * len(listed)
  errors = [reason for _, _, reason in listed]
  pending: list[tuple[int, np.ndarray]] = []

  def flush():
    if pending:
      result = np.asarray(model.predict_on_batch(np.stack([image for _, image in pending])))
      for (row, _), output in zip(pending, result):
        outputs[row] = output
      pending.clear()

  for row, (location, _, reason) in enumerate(listed):
    if reason:
      continue
    try:
      pending.append((row, prepare_image(fetcher.fetch(location), settings)))
    except (fetch.FetchError, image_decode.ImageError) as error:
      errors[row] = error.reason
    if len(pending) == batch_size:
      flush()
  flush()
  return outputs, errors


def _write_csv(out_path: str, run: dict[str, Any], listed: list[tuple[str, str, str]],
               outputs: list[np.ndarray | None], errors: list[str]) -> None:
  """Predicted rows as `heads.export.predictions_csv` writes them, then the rows in error."""
  ids = [sources.source_id(canonical) for _, canonical, _ in listed]
  # Ids hash the URL as written; what is shown never carries its secrets.
  shown = [redact.redact(canonical) for _, canonical, _ in listed]
  width = len(run["class_names"]) if run["task"] == "multiclass" else (
      1 if run["task"] == "binary" else 2 * int(run["num_keypoints"]))
  good = [row for row, output in enumerate(outputs) if output is not None]
  text = export.predictions_csv(
      [ids[row] for row in good], np.array([outputs[row] for row in good]).reshape(-1, width),
      task=run["task"], class_names=run["class_names"], num_keypoints=run["num_keypoints"] or 0,
      extra={"source": [shown[row] for row in good], "error": ["" for _ in good]})
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  for row, output in enumerate(outputs):
    if output is None:
      writer.writerow([ids[row], shown[row], errors[row]])
  with tf.io.gfile.GFile(out_path, "w") as f:
    f.write(text + buffer.getvalue())


def main(argv: list[str]) -> int:
  """`headstart predict`: exported model over a folder or CSV of images -> predictions CSV."""
  parser = cli.Parser(prog="headstart predict", description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="run directory written by headstart train")
  parser.add_argument("--images", required=True,
                      help="folder of images, or CSV of image paths, gs:// objects or URLs")
  parser.add_argument("--out", default="predictions.csv")
  parser.add_argument("--batch-size", type=cli.positive_int, default=32)
  parser.add_argument("--timeout", type=cli.positive_float, default=fetch.FetchConfig.deadline,
                      help="total seconds allowed per download")
  parser.add_argument("--allow-network", action="append", default=[],
                      help="CIDR allowed despite the address guard (as in headstart ingest)")
  args = parser.parse_args(argv)
  config = fetch.FetchConfig(deadline=args.timeout, allowed_networks=tuple(args.allow_network))
  summary = predict_images(args.model, args.images, args.out, batch_size=args.batch_size,
                           fetch_config=config)
  print(json.dumps(summary))
  return 0
