"""`headstart weights`: see where each backbone's ImageNet weights come from, and stage them for
workers without internet.

    headstart weights list [--input-size 224] [--weights-dir DIR]
    headstart weights stage --backbones vgg16,resnet50 --to gs://bucket/weights   # then
    headstart extract ... --weights-dir gs://bucket/weights   (or HEADSTART_WEIGHTS_DIR)
"""
from __future__ import annotations

import sys
import urllib.request

from contracts import cli
from features import backbones as backbones_lib
from features import weights as weights_lib

_PROBE_TIMEOUT_SECONDS = 3.0


def _online(url: str) -> bool:
  # A HEAD request on Keras' weights bucket: "download" is only promised when it answers.
  try:
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_SECONDS):
      return True
  except Exception:  # DNS failure, refused, timeout, HTTP error: all mean "not now"
    return False


def list_weights(input_size: int, weights_dir: str | None) -> list[dict[str, str | None]]:
  """Where each registered backbone's ImageNet weights would come from right now.

  Returns:
    One row per backbone: `backbone`, `source` (dir, cache, shipped, download, unavailable),
    `file` (path or URL) and `sha256` (None unless a local/staged file was found).
  """
  rows = []
  online = None
  for name, spec in backbones_lib.BACKBONES.items():
    found = weights_lib.find_imagenet(spec, max(input_size, spec.min_size),
                                      weights_lib.weights_dir_from(weights_dir))
    if found:
      source, path = found
      rows.append({"backbone": name, "source": source, "file": path,
                   "sha256": weights_lib.file_sha256(path)})
      continue
    url = spec.keras_url(input_size)
    if online is None:
      online = _online(url)
    rows.append({"backbone": name, "source": "download" if online else "unavailable",
                 "file": url, "sha256": None})
  return rows


def stage(backbone_names: list[str], target: str, input_size: int,
          weights_dir: str | None) -> list[tuple[str, str, str]]:
  """Copies (downloading first when needed and possible) weight files into `target`.

  Files keep the name Keras downloads (the shipped MobileNet file keeps its own name), which is
  what `--weights-dir` lookups expect.

  Returns:
    (backbone, staged path, sha256) per backbone staged.

  Raises:
    ValueError: a backbone is unknown, or some weights could not be found or downloaded (the
      others are staged first).
  """
  import tensorflow as tf
  tf.io.gfile.makedirs(target)
  staged, failures = [], []
  for name in backbone_names:
    if name not in backbones_lib.BACKBONES:
      raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(backbones_lib.BACKBONES)}")
    try:
      choice = weights_lib.resolve(name, "imagenet", input_size=input_size,
                                   weights_dir=weights_dir)
    except ValueError as error:
      failures.append(f"{name}: {error}")
      continue
    destination = f"{target.rstrip('/')}/{choice.file_name}"
    if choice.path != destination:
      tf.io.gfile.copy(choice.path, destination, overwrite=True)
    staged.append((name, destination, choice.sha256))
  if failures:
    raise ValueError(f"staged {len(staged)} of {len(backbone_names)} backbones; "
                     + " | ".join(failures))
  return staged


def main(argv: list[str] | None = None) -> int:
  """`headstart weights list|stage`; returns 0 on success."""
  parser = cli.Parser(prog="headstart weights", description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
  listing = commands.add_parser("list", help="where each backbone's weights come from now")
  staging = commands.add_parser("stage", help="copy weight files to a folder or bucket")
  staging.add_argument("--backbones", required=True, help="comma list of registered backbones")
  staging.add_argument("--to", required=True, help="folder or gs:// URI read via --weights-dir")
  for sub in (listing, staging):
    sub.add_argument("--input-size", type=int, default=224,
                     help="MobileNet weight files depend on it (default 224)")
    sub.add_argument("--weights-dir", default=None,
                     help="also look here (or $HEADSTART_WEIGHTS_DIR)")
  args = parser.parse_args(argv)
  if args.input_size <= 0:
    raise ValueError(f"--input-size {args.input_size!r} must be a positive integer")
  if args.command == "list":
    for row in list_weights(args.input_size, args.weights_dir):
      print(f"{row['backbone']:<16} {row['source']:<12} {row['file']}  "
            f"sha256={row['sha256'] or '-'}")
    return 0
  names = [name.strip() for name in args.backbones.split(",") if name.strip()]
  for name, path, sha in stage(names, args.to, args.input_size, args.weights_dir):
    print(f"staged {name}: {path} sha256={sha}")
  print(f"workers: headstart extract ... --weights-dir {args.to}", file=sys.stderr)
  return 0
