"""Gender from face photos with frozen ImageNet backbones and a conv head.

    headstart reproduce configs/gender_faces.py --source DATA/gender/manifest.csv   # GPU: ~1 h
    headstart reproduce configs/gender_faces.py --tiny     # CI, data/sample emoji, ~20 s on 2 cores

Published: V Kishore Ayyadevara, "Neural Networks with Keras Cookbook" (Packt, 2019), chapter
"Transfer Learning", sections "Gender classification using VGG16 / VGG19 / Inception v3 /
ResNet 50 architecture-based models": 300x300 face photos from a manifest of image URLs with a
gender label; VGG16's frozen 9x9x512 maps -> Conv2D 512 -> MaxPool -> Flatten -> Dense 512 ->
Dropout 0.5 -> sigmoid reaches ~0.89 test accuracy; VGG19 ~0.89; Inception v3 ~0.90; ResNet50
with two conv blocks before the dense layer ~0.92 (figures as summarised in the project's issue 6).

Data you supply: a CSV `image_url,gender` of face photos (the book uses a few thousand images of
two classes); ingested at 300 px, split 80/10/10.

Tiny variant: 40 Twemoji man/woman images (data/sample/gender.csv, grouped so skin-tone copies
of one emoji never straddle splits) at 96 px; MobileNet v1 with the shipped ImageNet weights vs
the same MobileNet at random init; conv and conv2 heads scaled down. Its expectation is honest
for 40 cartoon images, not the book's number: see `expect` below.
"""
from __future__ import annotations

from typing import Any


def get_config(tiny: bool = False) -> dict[str, Any]:
  """The full experiment, or (`tiny=True`) its CI variant on the sample data."""
  config: dict[str, Any] = {
      "name": "gender_faces",
      "published": "Ayyadevara, Neural Networks with Keras Cookbook (2019), ch. Transfer "
                   "Learning: VGG16 ~0.89, VGG19 ~0.89, InceptionV3 ~0.90, ResNet50 ~0.92",
      "data": {"description": "a CSV image_url,gender of face photos",
               "source": "data/gender/manifest.csv"},
      "ingest": ["--image-size", "300", "--url-column", "image_url", "--label-column", "gender",
                 "--splits", "train=80,val=10,test=10"],
      "extract": [["--backbones", "vgg16,vgg19,inception_v3,resnet50", "--weights", "imagenet",
                   "--input-size", "300"]],
      "compare": {
          "heads": ["conv", "conv2"], "seeds": 3, "epochs": 10,
          # The book's heads: conv for the VGGs and Inception, two conv blocks for ResNet50.
          "pairs": [["vgg16", "conv"], ["vgg19", "conv"], ["inception_v3", "conv"],
                    ["resnet50", "conv2"]],
          "config": {"head": {"conv_filters": 512, "dense_units": 512, "dropout": 0.5},
                     "train": {"batch_size": 32}},
      },
      "expect": [
          {"backbone": "vgg16", "head": "conv", "split": "test", "value": 0.89, "tolerance": 0.03},
          {"backbone": "vgg19", "head": "conv", "split": "test", "value": 0.89, "tolerance": 0.03},
          {"backbone": "inception_v3", "head": "conv", "split": "test", "value": 0.90,
           "tolerance": 0.03},
          {"backbone": "resnet50", "head": "conv2", "split": "test", "value": 0.92,
           "tolerance": 0.03},
      ],
  }
  if not tiny:
    return config
  return {
      **config,
      "sample": {"csv": "data/sample/gender.csv", "rows": 40},
      "ingest": ["--image-size", "96", "--label-column", "gender", "--group-column", "group",
                 "--splits", "train=60,val=20,test=20"],
      "extract": [["--backbones", "mobilenet", "--weights", "imagenet", "--input-size", "96"],
                  ["--backbones", "mobilenet", "--weights", "none", "--input-size", "96"]],
      "compare": {
          "heads": ["conv", "conv2"], "seeds": 1, "epochs": 6,
          "config": {"head": {"conv_filters": 32, "conv2_filters": 16, "dense_units": 32,
                              "dropout": 0.5},
                     "train": {"batch_size": 8, "shuffle_buffer": 64}},
      },
      # Measured here (seed 0, epoch-seeded shuffles): ImageNet conv2 0.7 vs random init 0.3;
      # conv 0.4 vs 0.5, on 10 test images from ~7 groups. Ten images are noise (the order of
      # training batches alone moved conv from 0.6 to 0.4), so only conv2's gap is claimed and
      # conv's value is pinned within two images to notice behaviour changes.
      "expect": [
          {"backbone": "mobilenet", "weights": "imagenet", "head": "conv", "split": "test",
           "value": 0.4, "tolerance": 0.2},
          {"backbone": "mobilenet", "weights": "imagenet", "head": "conv2", "split": "test",
           "beats": {"weights": "none"}, "margin": 0.2},
      ],
  }
