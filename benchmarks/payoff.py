"""Caching pay-off (benchmark R5): the same head trained from cached features vs end to end
through the frozen backbone on the same images, same batch size, same device.

    python -m benchmarks.payoff --features DATA/features/mobilenet-imagenet-8a3abaab --head gap_dense

Both sides cache their input after the first epoch (features, or decoded images), so the
steady-state rate (epochs after the first) compares head work against backbone+head work, not
JPEG decoding. Prints one JSON line: examples/s of each side and their ratio.
"""
from __future__ import annotations

import json
from typing import Any

import keras

from heads import config as config_lib
from heads import export, fitting, reader, training, zoo


def _rate(model: keras.Model, spec: reader.DatasetSpec, input_kind: str, *, epochs: int,
          batch_size: int, seed: int) -> dict[str, Any]:
  count = reader.count_examples(spec, "train")
  batches = reader.make_for_train(reader.read_split(spec, "train", input_kind=input_kind),
                                  batch_size=batch_size, shuffle_buffer=count + 1, seed=seed,
                                  num_examples=count)
  timer = fitting.EpochTimer()
  model.fit(batches, epochs=epochs, callbacks=[timer], verbose=0, shuffle=False)
  steady = sum(timer.seconds[1:])
  return {"examples": count, "epoch_seconds": timer.seconds,
          "examples_per_second": count * (epochs - 1) / steady if steady else None}


def measure(features_dir: str, head: str, *, epochs: int = 3, batch_size: int = 32,
            config: config_lib.Config = config_lib.Config()) -> dict[str, Any]:
  """Trains `head` both ways for `epochs` epochs; returns rates and the ratio.

  Raises:
    ValueError: fewer than 2 epochs (the first one only fills the caches), or a scratch head.
  """
  if epochs < 2:
    raise ValueError(f"epochs must be at least 2 (the first fills the caches), got {epochs!r}")
  if zoo.input_kind(head) == "image":
    raise ValueError("head 'scratch' has no cached-feature side to compare")
  spec = training.resolve_dataset(features_dir, head)
  images = reader.load_spec(spec.manifest["image_dataset"])
  results = {}
  for side in ("cached", "end_to_end"):
    keras.utils.set_random_seed(config.train.seed)
    model = zoo.build_head(head, spec, config.head)
    if side == "end_to_end":
      model = export.assemble(model, spec, head=head)   # frozen backbone + the same head
    training.compile_head(model, spec.task, keras.optimizers.Adam(config.train.learning_rate))
    results[side] = _rate(model, spec if side == "cached" else images,
                          zoo.input_kind(head) if side == "cached" else "image", epochs=epochs,
                          batch_size=batch_size, seed=config.train.seed)
  cached, end_to_end = (results[s]["examples_per_second"] for s in ("cached", "end_to_end"))
  return {"head": head, "backbone": spec.backbone, "batch_size": batch_size, "epochs": epochs,
          **results, "ratio": cached / end_to_end if cached and end_to_end else None}


if __name__ == "__main__":
  from benchmarks import measure as measure_lib
  parser = measure_lib.head_parser("python -m benchmarks.payoff", __doc__.split("\n")[0],
                                   head="gap_dense", epochs=3)
  parser.add_argument("--batch-size", type=int, default=32)
  args = parser.parse_args()
  print(json.dumps(measure(args.features, args.head, epochs=args.epochs,
                           batch_size=args.batch_size)))
