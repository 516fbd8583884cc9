"""Gender on a cleaner face set: frozen VGG19 at 256 px with a wider conv head.

    headstart reproduce configs/gender_vgg19_clean.py --source DATA/faces_clean/manifest.csv
    headstart reproduce configs/gender_vgg19_clean.py --tiny     # CI, data/sample emoji, ~20 s

Published: a Keras transfer-learning write-up (figures as summarised in the project's issue 6;
the exact publication could not be checked offline here): VGG19 ImageNet features of 256x256
face crops from a cleaner, face-centred set -> Conv2D -> MaxPool -> Flatten -> Dense 1024 ->
Dropout 0.6 -> sigmoid, ~0.95 test accuracy. It is the same recipe as `gender_faces.py`; the
gain comes from cleaner data and the wider head.

Data you supply: a CSV `image_url,gender` of aligned face crops; ingested at 256 px.

Tiny variant: 40 Twemoji man/woman images at 128 px through MobileNet v1 with the shipped
ImageNet weights (VGG19's weights are not shipped), with the same Dense 1024 / dropout 0.6 head
shape (fewer conv filters). Expectation: honest for 40 cartoon images, see `expect`.
"""
from __future__ import annotations

from typing import Any


def get_config(tiny: bool = False) -> dict[str, Any]:
  """The full experiment, or (`tiny=True`) its CI variant on the sample data."""
  config: dict[str, Any] = {
      "name": "gender_vgg19_clean",
      "published": "VGG19 @256 px, Dense 1024 / dropout 0.6 head: ~0.95 test accuracy on a "
                   "cleaner face set (per issue 6)",
      "data": {"description": "a CSV image_url,gender of aligned face crops",
               "source": "data/faces_clean/manifest.csv"},
      "ingest": ["--image-size", "256", "--label-column", "gender",
                 "--splits", "train=80,val=10,test=10"],
      "extract": [["--backbones", "vgg19", "--weights", "imagenet", "--input-size", "256"]],
      "compare": {
          "heads": ["conv"], "seeds": 3, "epochs": 10,
          "config": {"head": {"conv_filters": 512, "dense_units": 1024, "dropout": 0.6},
                     "train": {"batch_size": 32}},
      },
      "expect": [
          {"backbone": "vgg19", "head": "conv", "split": "test", "value": 0.95,
           "tolerance": 0.03},
      ],
  }
  if not tiny:
    return config
  return {
      **config,
      "sample": {"csv": "data/sample/gender.csv", "rows": 40},
      "ingest": ["--image-size", "128", "--label-column", "gender", "--group-column", "group",
                 "--splits", "train=60,val=20,test=20"],
      "extract": [["--backbones", "mobilenet", "--weights", "imagenet", "--input-size", "128"]],
      "compare": {
          "heads": ["conv", "linear"], "seeds": 1, "epochs": 8,
          "config": {"head": {"conv_filters": 32, "dense_units": 1024, "dropout": 0.6},
                     "train": {"batch_size": 8, "shuffle_buffer": 64}},
      },
      # Measured here (seed 0, epoch-seeded shuffles): linear probe 0.6, conv head 0.2 (0.6
      # with the previous shuffle order), on 10 test images (chance 0.5). Ten images cannot
      # show the published 0.95: this variant runs the pipeline and pins both values within
      # two images, so a behaviour change is noticed.
      "expect": [
          {"backbone": "mobilenet", "head": "linear", "split": "test", "value": 0.6,
           "tolerance": 0.2},
          {"backbone": "mobilenet", "head": "conv", "split": "test", "value": 0.2,
           "tolerance": 0.2},
      ],
  }
