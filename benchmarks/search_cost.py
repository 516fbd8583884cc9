"""What a per-head search costs: one head, a `--search small` (6 settings trained together) and
the same 6 settings trained one after another, side by side on the same features.

    python -m benchmarks.search_cost --features DATA/features/mobilenet-imagenet-8a3abaab --head mlp

Each side is a real `headstart train` run (no export) in a temporary directory, timed by its
`train_seconds` (the fit: every epoch, input included). Prints one JSON line: the seconds of each
side, the search over one head (what 6 settings cost in units of one) and the 6 separate runs
over the search (what training them together saves).
"""
from __future__ import annotations

import json
import tempfile
from typing import Any

from heads import config as config_lib
from heads import search, training


def measure(features_dir: str, head: str, *, epochs: int = 10,
            config: config_lib.Config = config_lib.Config()) -> dict[str, Any]:
  """Trains `head` once, as a search, and at each search point separately; returns seconds."""
  config = config_lib.override(config, {"train": {"epochs": epochs}})
  points = search.points("small", head)
  with tempfile.TemporaryDirectory(prefix="headstart-search-") as tmp:
    def seconds(name: str, run_config: config_lib.Config) -> float:
      result = training.train(features_dir, head, f"{tmp}/{name}", run_config, verbose=0,
                              export_model=False)
      return float(result["train_seconds"])

    one = seconds("one", config)
    together = seconds("search", config_lib.override(config, {"train": {"search": "small"}}))
    apart = sum(seconds(f"point{index}", search.apply(config, point))
                for index, point in enumerate(points))
  return {"head": head, "epochs": epochs, "points": len(points), "one_head_seconds": one,
          "search_seconds": together, "separate_runs_seconds": apart,
          "search_over_one_head": together / one, "separate_over_search": apart / together}


if __name__ == "__main__":
  from benchmarks import measure as measure_lib
  parser = measure_lib.head_parser("python -m benchmarks.search_cost", __doc__.split("\n")[0],
                                   head="mlp", epochs=10)
  args = parser.parse_args()
  print(json.dumps(measure(args.features, args.head, epochs=args.epochs)))
