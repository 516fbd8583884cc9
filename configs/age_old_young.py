"""Old vs young faces at 100 px: a from-scratch CNN vs heads on frozen backbones.

    headstart reproduce configs/age_old_young.py --source DATA/age/manifest.csv   # CPU: ~30 min
    headstart reproduce configs/age_old_young.py --tiny    # CI, data/sample emoji, ~20 s

Published: a Keras age-classification write-up (figures as summarised in the project's issue 6;
the exact publication could not be checked offline here): binary old/young face photos at
100x100 px; a small CNN trained from scratch reaches ~0.82-0.91 accuracy depending on the run,
and heads on frozen ImageNet backbones are the comparison.

Data you supply: a CSV `image_url,age_group` (`old` / `young`); ingested at 100 px (InceptionV3
needs at least 75 px, so every registered backbone accepts it).

Tiny variant: no age data ships with the repo, so the binary man/woman emoji of
data/sample/gender.csv stand in (40 images, 96 px, grouped split): the from-scratch CNN vs a
linear probe and an MLP on MobileNet v1 with the shipped ImageNet weights.
"""
from __future__ import annotations

from typing import Any


def get_config(tiny: bool = False) -> dict[str, Any]:
  """The full experiment, or (`tiny=True`) its CI variant on the sample data."""
  config: dict[str, Any] = {
      "name": "age_old_young",
      "published": "old vs young faces @100 px: from-scratch CNN ~0.82-0.91 accuracy vs frozen "
                   "backbone heads (per issue 6)",
      "data": {"description": "a CSV image_url,age_group of face photos (old/young)",
               "source": "data/age/manifest.csv"},
      "ingest": ["--image-size", "100", "--label-column", "age_group",
                 "--splits", "train=80,val=10,test=10"],
      "extract": [["--backbones", "vgg16,resnet50,mobilenet", "--weights", "imagenet",
                   "--input-size", "100"]],
      "compare": {
          "heads": ["scratch", "linear", "conv"], "seeds": 3, "epochs": 30,
          "config": {"train": {"batch_size": 32}},
      },
      "expect": [
          {"head": "scratch", "split": "test", "at_least": 0.82, "at_most": 0.91},
          {"backbone": "vgg16", "head": "conv", "split": "test", "beats": {"head": "scratch"}},
      ],
  }
  if not tiny:
    return config
  return {
      **config,
      "sample": {"csv": "data/sample/gender.csv", "rows": 40},
      "ingest": ["--image-size", "96", "--label-column", "gender", "--group-column", "group",
                 "--splits", "train=60,val=20,test=20"],
      "extract": [["--backbones", "mobilenet", "--weights", "imagenet", "--input-size", "96"]],
      "compare": {
          "heads": ["scratch", "linear", "mlp"], "seeds": 1, "epochs": 10,
          "config": {"head": {"hidden_units": 32, "scratch_filters": [8, 16]},
                     "train": {"batch_size": 8, "shuffle_buffer": 64}},
      },
      # Measured here (seed 0), 10 test images: scratch 0.8, linear probe 0.8, MLP 0.4. Ten
      # images cannot separate 0.8 from 0.9, so the checks are the published scratch range
      # widened by two images, and the linear probe above chance.
      "expect": [
          {"head": "scratch", "split": "test", "at_least": 0.6, "at_most": 1.0},
          {"backbone": "mobilenet", "head": "linear", "split": "test", "at_least": 0.6},
      ],
  }
