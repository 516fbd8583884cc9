"""Head and training hyperparameters: frozen dataclasses, overridable from one config file.

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head conv --out runs/x \
        --config configs/conv_small.json

Precedence, lowest first: the defaults below, then `--config FILE`, then explicit command-line
flags. A config file is JSON (`{"train": {...}, "head": {...}}`) or a Python file whose
`get_config()` returns such a dict or a `Config`. Unknown keys are refused, so a typo never
silently trains with a default.
"""
from __future__ import annotations

import dataclasses
import json
import runpy
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

OPTIMIZERS = ("adam", "sgd", "rmsprop")
SEARCHES = ("none", "small")      # heads.search: settings each run tries, chosen on validation
CLASS_WEIGHTS = ("none", "balanced")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Architecture knobs of the head zoo (see `heads.zoo`)."""
  hidden_units: int = 256          # mlp hidden layer
  gap_units: int = 128             # gap_dense: GAP -> Dense(gap_units) -> output
  conv_filters: int = 512          # conv / conv2 / keypoints: first conv block
  conv2_filters: int = 256         # conv2: second conv block
  dense_units: int = 512           # conv / conv2 / keypoints: Dense after Flatten
  dropout: float = 0.5
  l2: float = 0.0                  # kernel L2 on the output layer (the linear probe's knob)
  # keypoints: start at a ridge fit on the flattened map (frozen) and learn a correction to it;
  # off: start at the mean face (see heads.zoo.build_head, heads.ridge.linear_start).
  ridge_start: bool = True
  scratch_filters: tuple[int, ...] = (16, 32, 64)   # --head scratch: one conv block per entry


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation knobs shared by every head."""
  epochs: int = 30
  batch_size: int = 64
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  lr_decay: bool = False
  # ExponentialDecay multiplies the rate by this once per epoch when lr_decay is on.
  lr_decay_rate: float = 0.9
  early_stopping: int = 0          # patience in epochs; 0 = off
  seed: int = 0
  views: bool = False              # also train on augmented views (view > 0)
  class_weight: str = "none"
  search: str = "none"             # a per-head search of `SEARCHES` (see heads.search)
  shuffle_buffer: int = 10_000
  # L2 grid for `--head linear --sweep`, log-spaced: 1e-6 ... 1e0.
  sweep_grid: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
  sweep_steps: int = 300
  # ridge heads: strengths relative to the mean squared norm of a centred train example, and the
  # memory the solve may hold (see heads.ridge).
  ridge_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
  ridge_memory_mb: float = 1024.0
  # finetune: Adam's rate for the unfrozen backbone layers and the head (fine-tuning guides use
  # ~1e-5; the run's rate x 0.1 = 1e-4 wrecked the head in its first epoch, issue 18), reached
  # by a linear warm-up over the first epochs (0: none).
  finetune_learning_rate: float = 1e-5
  finetune_warmup_epochs: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs besides paths; written to `RUN_DIR/config.json`."""
  train: TrainConfig = TrainConfig()
  head: HeadConfig = HeadConfig()


def tiny() -> Config:
  """The CI variant: small layers and buffers so a head trains in a second on a laptop core."""
  return Config(
      train=TrainConfig(epochs=2, batch_size=8, shuffle_buffer=64, sweep_steps=50),
      head=HeadConfig(hidden_units=16, gap_units=16, conv_filters=16, conv2_filters=8,
                      dense_units=16, scratch_filters=(4, 8)))


def _validate(config: Config) -> Config:
  train = config.train
  if train.optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer {train.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
  if train.search not in SEARCHES:
    raise ValueError(f"search {train.search!r} is not one of {', '.join(SEARCHES)}")
  if train.class_weight not in CLASS_WEIGHTS:
    raise ValueError(
        f"class_weight {train.class_weight!r} is not one of {', '.join(CLASS_WEIGHTS)}")
  for name in ("epochs", "batch_size"):
    if getattr(train, name) < 1:
      raise ValueError(f"{name} must be at least 1, got {getattr(train, name)!r}")
  for name in ("learning_rate", "finetune_learning_rate"):
    if getattr(train, name) <= 0:
      raise ValueError(f"{name} must be positive, got {getattr(train, name)!r}")
  if train.finetune_warmup_epochs < 0:
    raise ValueError(f"finetune_warmup_epochs must be >= 0, got {train.finetune_warmup_epochs!r}")
  if train.early_stopping < 0:
    raise ValueError(f"early_stopping patience must be >= 0, got {train.early_stopping!r}")
  if not 0.0 <= config.head.dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {config.head.dropout!r}")
  return config


def _replace(section: Any, overrides: Mapping[str, Any], where: str) -> Any:
  fields = {field.name: field for field in dataclasses.fields(section)}
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"unknown {where} config key(s) {unknown!r}; allowed: {', '.join(fields)}")
  # JSON has no tuples; the dataclasses keep tuples so configs stay hashable and frozen.
  values = {key: tuple(value) if isinstance(value, list) else value
            for key, value in overrides.items()}
  return dataclasses.replace(section, **values)


def override(config: Config, overrides: Mapping[str, Any]) -> Config:
  """Returns `config` with `{"train": {...}, "head": {...}}` overrides applied and checked.

  Raises:
    ValueError: an unknown section or key, or a value out of range.
  """
  unknown = sorted(set(overrides) - {"train", "head"})
  if unknown:
    raise ValueError(f"unknown config section(s) {unknown!r}; allowed: train, head")
  return _validate(Config(
      train=_replace(config.train, overrides.get("train", {}), "train"),
      head=_replace(config.head, overrides.get("head", {}), "head")))


def load_file(path: str, base: Config | None = None) -> Config:
  """Applies a JSON or Python config file on top of `base` (defaults when None).

  Raises:
    ValueError: the file is missing, malformed or has unknown keys.
  """
  base = base or Config()
  if not tf.io.gfile.exists(path):
    raise ValueError(f"config file {path!r} does not exist")
  if path.endswith(".py"):
    loaded = runpy.run_path(path).get("get_config")
    if loaded is None:
      raise ValueError(f"config file {path!r} defines no get_config()")
    loaded = loaded()
    if isinstance(loaded, Config):
      return _validate(loaded)
    return override(base, loaded)
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      payload = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"config file {path!r} is not valid JSON: {error}") from error
  if not isinstance(payload, dict):
    raise ValueError(f"config file {path!r} must hold a JSON object, got {type(payload).__name__}")
  return override(base, payload)


def to_dict(config: Config) -> dict[str, Any]:
  """JSON-ready view of a config (the shape `override` and `load_file` accept)."""
  return dataclasses.asdict(config)


# Keys older runs' config.json files hold that no longer exist; `from_dict` drops them so those
# runs still load (`finetune_lr_scale` gave way to `finetune_learning_rate`).
RETIRED_KEYS = {"train": ("finetune_lr_scale",), "head": ()}


def from_dict(payload: Mapping[str, Any]) -> Config:
  """Rebuilds a config written by `to_dict` (e.g. from `RUN_DIR/config.json`)."""
  return override(Config(), {
      section: {key: value for key, value in payload[section].items()
                if key not in RETIRED_KEYS[section]}
      for section in ("train", "head") if section in payload})
