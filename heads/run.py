"""Command-line entry points of stage 3: argument parsing only, then one library call each.

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head conv --out runs/x --epochs 30
    headstart compare --features DATA/features --heads linear,mlp --seeds 3 --out runs/cmp
    headstart finetune --model runs/x --images DATA/images --unfreeze 20

Hyperparameters: defaults < `--config FILE` (JSON or Python, see `heads.config`) < flags given
on the command line.
"""
from __future__ import annotations

import json

from contracts import cli, runs
from heads import config as config_lib
from heads import zoo


def _train_parser() -> cli.Parser:
  parser = cli.Parser(prog="headstart train", description=__doc__.splitlines()[0])
  parser.add_argument("--features", required=True,
                      help="feature dataset directory (an image dataset for --head scratch)")
  parser.add_argument("--head", required=True, choices=zoo.HEADS)
  parser.add_argument("--out", required=True, help="run directory")
  parser.add_argument("--config", help="JSON or .py file overriding head/train settings")
  parser.add_argument("--sweep", action="store_true",
                      help="linear head: pick the L2 strength on validation first")
  # None = not given: the config file or the default decides.
  parser.add_argument("--epochs", type=cli.positive_int)
  parser.add_argument("--batch-size", type=cli.positive_int)
  parser.add_argument("--optimizer", choices=config_lib.OPTIMIZERS)
  parser.add_argument("--learning-rate", type=cli.positive_float)
  parser.add_argument("--lr-decay", action="store_true", default=None)
  parser.add_argument("--early-stopping", type=cli.non_negative_int, metavar="PATIENCE")
  parser.add_argument("--seed", type=cli.non_negative_int)
  parser.add_argument("--views", action="store_true", default=None,
                      help="also train on augmented views (view > 0)")
  parser.add_argument("--class-weights", choices=config_lib.CLASS_WEIGHTS)
  parser.add_argument("--search", choices=config_lib.SEARCHES,
                      help="train a few settings together, keep the best on validation")
  parser.add_argument("--units", type=cli.positive_int, help="conv/conv2/keypoints Dense units")
  parser.add_argument("--dropout", type=cli.fraction)
  parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
  add_cache_flags(parser)
  return parser


def add_cache_flags(parser: cli.Parser) -> None:
  """`--cache-budget` and `--cache-dir` (see `heads.caching`)."""
  parser.add_argument("--cache-budget", type=cli.size_bytes, default=None, metavar="SIZE",
                      help="memory the parsed input may take (1MB, 512MB, 2GiB or bytes; "
                      "default a quarter of the available memory); beyond it a local file "
                      "cache, else streaming from the shards every epoch")
  parser.add_argument("--cache-dir", default=None,
                      help="local folder for the file cache (default: the run or compare "
                      "folder when local, else a temporary folder)")


_TRAIN_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "optimizer": "optimizer",
                "learning_rate": "learning_rate", "lr_decay": "lr_decay",
                "early_stopping": "early_stopping", "seed": "seed", "views": "views",
                "class_weights": "class_weight", "search": "search"}
_HEAD_FLAGS = {"units": "dense_units", "dropout": "dropout"}


def train_main(argv: list[str]) -> int:
  """`headstart train`: fits one head and prints where its metrics are."""
  from heads import training

  args = _train_parser().parse_args(argv)
  config = config_lib.load_file(args.config) if args.config else config_lib.Config()
  config = config_lib.override(config, {
      "train": {key: getattr(args, flag) for flag, key in _TRAIN_FLAGS.items()
                if getattr(args, flag) is not None},
      "head": {key: getattr(args, flag) for flag, key in _HEAD_FLAGS.items()
               if getattr(args, flag) is not None}})
  result = training.train(args.features, args.head, args.out, config, sweep_l2=args.sweep,
                          verbose=0 if args.quiet else 2, cache_budget=args.cache_budget,
                          cache_dir=args.cache_dir)
  print(json.dumps(_summary(result)))
  print(f"wrote {runs.RunDir(args.out).metrics_path}")
  return 0


def _summary(result: dict) -> dict:
  keys = ("head", "backbone", "weights_kind", "params", "epochs", "examples_per_second",
          "examples_per_second_cached")
  summary = {key: result.get(key) for key in keys}
  for split in ("validation", "test"):
    block = result.get(split) or {}
    for name in ("accuracy", "loss", "mae_px", "mae_px_source"):
      if block.get(name) is not None:
        summary[f"{split}_{name}"] = block[name]
  return summary


def finetune_main(argv: list[str]) -> int:
  """`headstart finetune`: unfreezes the last N backbone layers and trains on the images."""
  from heads import finetune

  parser = cli.Parser(prog="headstart finetune")
  parser.add_argument("--model", required=True, help="run directory written by headstart train")
  parser.add_argument("--images", required=True, help="the image dataset (stage 1 output)")
  parser.add_argument("--unfreeze", type=cli.positive_int, required=True, metavar="N")
  parser.add_argument("--out", help="output run directory (default MODEL/finetune)")
  parser.add_argument("--epochs", type=cli.positive_int, default=5)
  parser.add_argument("--learning-rate", type=cli.positive_float,
                      help="Adam's rate for the unfrozen layers and the head (default 1e-5)")
  parser.add_argument("--warmup-epochs", type=cli.non_negative_int, metavar="N",
                      help="linear warm-up to the rate over the first N epochs (default 1)")
  parser.add_argument("--batch-size", type=cli.positive_int)
  args = parser.parse_args(argv)
  result = finetune.finetune(args.model, args.images, unfreeze=args.unfreeze, out_dir=args.out,
                             epochs=args.epochs, learning_rate=args.learning_rate,
                             batch_size=args.batch_size, warmup_epochs=args.warmup_epochs)
  print(json.dumps(_summary(result)))
  return 0


def compare_main(argv: list[str]) -> int:
  """`headstart compare`: every head x every feature dataset x seeds -> leaderboard + report."""
  from heads import compare, grid, leaderboard

  parser = cli.Parser(prog="headstart compare")
  parser.add_argument("--features", required=True,
                      help="the --out folder of headstart extract (holds index.json)")
  parser.add_argument("--heads", default="linear,mlp,conv", help=f"comma list of {zoo.HEADS}")
  parser.add_argument("--backbones", help="only these backbones of the index (comma list)")
  parser.add_argument("--seeds", type=cli.positive_int, default=3)
  parser.add_argument("--out", required=True, help="compare directory")
  parser.add_argument("--epochs", type=cli.positive_int)
  parser.add_argument("--config", help="JSON or .py file with head/train settings for every cell")
  parser.add_argument("--search", choices=config_lib.SEARCHES,
                      help="per cell: a few settings trained together, the best on validation "
                           "(small: learning rate x dropout, 6 points)")
  parser.add_argument("--no-report", action="store_true", help="skip report.html")
  parser.add_argument("--parallel-runs", type=cli.positive_int,
                      help="runs trained at once in this process (default: one per core, at "
                           "most 4; results do not depend on it)")
  add_cache_flags(parser)
  # Unknown flags are Beam pipeline options: with any of them, runs become Beam elements.
  args, beam_args = parser.parse_known_args(argv)
  if beam_args:
    from heads import grid_beam
    grid_beam.check_beam_args(beam_args)
  config = config_lib.load_file(args.config) if args.config else None
  result = compare.compare(
      args.features, grid.parse_heads(args.heads), args.out, seeds=args.seeds,
      backbones=cli.comma_list(args.backbones) if args.backbones else None,
      epochs=args.epochs, config=config, report=not args.no_report,
      cache_budget=args.cache_budget, cache_dir=args.cache_dir, beam_args=beam_args,
      search=args.search, parallel_runs=args.parallel_runs)
  print(leaderboard.markdown_table(result.rows))
  print("\n".join(leaderboard.ledger_lines(result.ledger)))
  print(f"wrote {result.out_dir}/{leaderboard.LEADERBOARD_CSV}"
        + (f" and {result.report}" if result.report else ""))
  return 0


def report_main(argv: list[str]) -> int:
  """`headstart report`: plots and RUN_DIR/report.html for one finished run."""
  from heads import report

  parser = cli.Parser(prog="headstart report")
  parser.add_argument("--run", required=True, help="run directory written by headstart train")
  args = parser.parse_args(argv)
  print(f"wrote {report.write_run_report(args.run)}")
  return 0


def features_main(argv: list[str]) -> int:
  """`headstart features export DIR --out OUT`: a feature dataset as .npy files or Parquet."""
  from heads import feature_export

  parser = cli.Parser(prog="headstart features")
  commands = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
  export = commands.add_parser("export", help="write pooled vectors (and maps) with ids, labels")
  export.add_argument("dataset", help="a feature dataset directory")
  export.add_argument("--out", required=True, help="local output folder")
  export.add_argument("--format", choices=feature_export.FORMATS, default="npy")
  export.add_argument("--maps", action="store_true", help="also the feature maps (float16)")
  export.add_argument("--views", action="store_true", help="also augmented views (view > 0)")
  args = parser.parse_args(argv)
  summary = feature_export.export_features(args.dataset, args.out, fmt=args.format,
                                           maps=args.maps, views=args.views)
  print(json.dumps({"out": args.out, "format": args.format, "counts": summary["counts"]}))
  return 0
