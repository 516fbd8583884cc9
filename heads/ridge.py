"""Ridge heads: a linear map solved in closed form, its strength chosen on validation.

    headstart train --features DATA/features/mobilenet-imagenet-8d96f6ea --head ridge --out runs/r
    headstart compare --features DATA/features --heads ridge,keypoints --out runs/cmp

`ridge` reads the flattened feature map, `ridge_pooled` the pooled vector. Keypoints regress
their normalised coordinates. Classification regresses +-1 codes (one column for binary, one per
class otherwise: one-vs-rest least squares); a temperature T fitted on validation then turns the
scores into probabilities (sigmoid or softmax of T x score), a one-parameter logistic
calibration after the ridge that changes no decision (so validation loss is that of a calibrated
model; accuracy and the choice of strength are not affected).

With centred inputs X (N x D) and targets Y, W = (X'X + l I)^-1 X'Y = X'(XX' + l I)^-1 Y. One
symmetric eigendecomposition (of X'X, D x D: "primal", or of XX', N x N: "dual") serves every
strength of the grid: f(x) = mean(Y) + ((x - mean(X)) B) diag(1 / (s + l)) C, with basis B,
eigenvalues s and coefficients C (`Spectral`). Strengths are relative to the data's scale:
l = r x the mean squared norm of a centred train example, r from `TrainConfig.ridge_grid`. The
best r has the best validation accuracy (keypoints: lowest validation MAE); ties go to the lower
validation squared error. Without a validation split there is nothing to choose on: refused.

Memory is bounded by `TrainConfig.ridge_memory_mb`, never by the number of examples:
- dual, when N <= D and the train split fits as float32: exact;
- primal, otherwise when D x D fits: X'X and X'Y accumulated batch by batch, exact, any N;
- neither (many examples of a large map): the dual on a uniform reservoir sample of as many
  examples as fit, said in the run's notes.

The solution is stored as the `output` Dense layer of an ordinary head (`heads.zoo`: Flatten ->
Dense), so `head.keras`, `model.keras`, export and predict work unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from heads import reader, zoo
from heads.config import Config

HEADS = ("ridge", "ridge_pooled")
BATCH = 256                        # examples per streamed batch
_CHUNK = 4096                      # feature columns per float64 block of the dual's kernel
_TEMPERATURES = np.logspace(-2, 3, 101)


@dataclasses.dataclass(frozen=True)
class Spectral:
  """The ridge fit for every strength at once: f(x) = y_mean + ((x - x_mean) B) / (s + l) C."""
  x_mean: np.ndarray         # [D]
  y_mean: np.ndarray         # [O]
  basis: np.ndarray          # [D, R]
  eigenvalues: np.ndarray    # [R], >= 0
  coef: np.ndarray           # [R, O]
  scale: float               # mean squared norm of a centred example: l = r * scale
  num_examples: int
  method: str                # primal, dual, or dual on a sample

  def weights(self, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """`(kernel [D, O], bias [O])` of the linear map at relative strength `strength`."""
    kernel = self.basis @ (self.coef / (self.eigenvalues + strength * self.scale)[:, None])
    return kernel, self.y_mean - self.x_mean @ kernel

  def predict(self, x: np.ndarray, strengths: Sequence[float]) -> np.ndarray:
    """`[G, N, O]` predictions of `x` `[N, D]` at every strength."""
    projected = (np.asarray(x, np.float64) - self.x_mean) @ self.basis
    return np.stack([self.y_mean + (projected / (self.eigenvalues + r * self.scale)) @ self.coef
                     for r in strengths])


def encode_targets(y: np.ndarray, task: str, num_outputs: int) -> np.ndarray:
  """Regression targets `[N, O]` float64: keypoints as they are, labels as +-1 codes."""
  if task == "keypoints":
    return np.asarray(y, np.float64).reshape(len(y), -1)
  labels = np.asarray(y, np.int64).reshape(-1)
  if task == "binary":
    return (2.0 * labels - 1.0)[:, None]
  return 2.0 * np.eye(num_outputs)[labels] - 1.0


def plan(num_examples: int, dim: int, budget_bytes: int) -> tuple[str, int]:
  """`(method, examples to solve on)` within `budget_bytes`, preferring an exact solve.

  Raises:
    ValueError: not even a few examples fit (a budget far too small for this feature size).
  """
  def dual_bytes(n: int) -> int:
    # float32 examples and basis, float64 kernel, eigenvectors and a temporary.
    return 8 * n * dim + 24 * n * n

  if num_examples <= dim and dual_bytes(num_examples) <= budget_bytes:
    return "dual", num_examples
  if 24 * dim * dim <= budget_bytes:
    return "primal", num_examples
  fitting = (math.isqrt((8 * dim) ** 2 + 96 * budget_bytes) - 8 * dim) // 48
  if fitting < 2:
    raise ValueError(f"ridge: a {budget_bytes}-byte budget holds no examples of {dim} features; "
                     "raise ridge_memory_mb")
  return "dual (sample)", min(fitting, num_examples)


def _batches(records: tf.data.Dataset, task: str, num_outputs: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Flattened float32 inputs and encoded targets, `BATCH` examples at a time."""
  for batch in records.batch(BATCH).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
    x = batch["x"].reshape(len(batch["x"]), -1).astype(np.float32)
    yield x, encode_targets(batch["y"], task, num_outputs)


def _finish(x_mean: np.ndarray, y_mean: np.ndarray, basis: np.ndarray, eigenvalues: np.ndarray,
            coef: np.ndarray, trace: float, count: int, method: str) -> Spectral:
  return Spectral(x_mean, y_mean, basis, np.maximum(eigenvalues, 0.0), coef,
                  max(trace / count, 1e-12), count, method)


def solve_primal(batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Spectral:
  """Accumulates X'X, X'Y and the sums in float64 over a stream, then centres and decomposes."""
  gram = cross = x_sum = y_sum = None
  count = 0
  for x, y in batches:
    x = x.astype(np.float64)
    if gram is None:
      gram, cross = np.zeros((x.shape[1],) * 2), np.zeros((x.shape[1], y.shape[1]))
      x_sum, y_sum = np.zeros(x.shape[1]), np.zeros(y.shape[1])
    gram += x.T @ x
    cross += x.T @ y
    x_sum += x.sum(axis=0)
    y_sum += y.sum(axis=0)
    count += len(x)
  if not count:
    raise ValueError("ridge: the train split is empty")
  x_mean, y_mean = x_sum / count, y_sum / count
  gram -= count * np.outer(x_mean, x_mean)
  cross -= count * np.outer(x_mean, y_mean)
  eigenvalues, vectors = np.linalg.eigh(gram)
  return _finish(x_mean, y_mean, vectors, eigenvalues, vectors.T @ cross, float(np.trace(gram)),
                 count, "primal")


def solve_dual(x: np.ndarray, y: np.ndarray, method: str = "dual") -> Spectral:
  """The kernel form on examples in memory (`x` float32 `[N, D]`, centred here in place)."""
  if not len(x):
    raise ValueError("ridge: the train split is empty")
  x_mean, y_mean = x.mean(axis=0, dtype=np.float64), y.mean(axis=0)
  kernel = np.zeros((len(x), len(x)))
  for start in range(0, x.shape[1], _CHUNK):
    block = x[:, start:start + _CHUNK].astype(np.float64) - x_mean[start:start + _CHUNK]
    kernel += block @ block.T
  eigenvalues, vectors = np.linalg.eigh(kernel)
  # B = Xc' U, a block of feature columns at a time, kept as float32 like the examples.
  basis = np.empty((x.shape[1], len(x)), np.float32)
  for start in range(0, x.shape[1], _CHUNK):
    block = x[:, start:start + _CHUNK].astype(np.float64) - x_mean[start:start + _CHUNK]
    basis[start:start + _CHUNK] = block.T @ vectors
  return _finish(x_mean, y_mean, basis, eigenvalues, vectors.T @ (y - y_mean),
                 float(np.trace(kernel)), len(x), method)


def reservoir_sample(batches: Iterator[tuple[np.ndarray, np.ndarray]], size: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray, int]:
  """A uniform sample of `size` examples from a stream (Algorithm R); `(x, y, examples seen)`."""
  rng = np.random.default_rng(seed)
  x_kept = y_kept = None
  seen = 0
  for x, y in batches:
    if x_kept is None:
      x_kept = np.empty((size, x.shape[1]), np.float32)
      y_kept = np.empty((size, y.shape[1]))
    for row in range(len(x)):
      slot = seen if seen < size else int(rng.integers(0, seen + 1))
      if slot < size:
        x_kept[slot], y_kept[slot] = x[row], y[row]
      seen += 1
  kept = min(seen, size)
  return x_kept[:kept], y_kept[:kept], seen


def validation_outputs(spectral: Spectral, batches: Iterator[tuple[np.ndarray, np.ndarray]],
                       grid: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """`([G, N, O] predictions at every strength, [N, O] codes)` of a split, in one pass."""
  predictions, targets = [], []
  for x, y in batches:
    predictions.append(spectral.predict(x, grid))
    targets.append(y)
  if not targets:
    raise ValueError("ridge: the validation split is empty; nothing to choose a strength on")
  return np.concatenate(predictions, axis=1), np.concatenate(targets)


def validation_rows(outputs: np.ndarray, y: np.ndarray, grid: Sequence[float], scale: float,
                    task: str) -> list[dict[str, Any]]:
  """One row per strength: `val_score` (accuracy, or -MAE for keypoints) and `val_loss` (MSE)."""
  squared = ((outputs - y[None]) ** 2).mean(axis=(1, 2))
  if task == "keypoints":
    score = -np.abs(outputs - y[None]).mean(axis=(1, 2))
  elif task == "binary":
    score = ((outputs[..., 0] > 0) == (y[None, :, 0] > 0)).mean(axis=1)
  else:
    score = (outputs.argmax(axis=-1) == y.argmax(axis=-1)[None]).mean(axis=1)
  return [{"strength": float(r), "lambda": float(r * scale), "val_score": float(s),
           "val_loss": float(v)} for r, s, v in zip(grid, score, squared)]


def temperature(scores: np.ndarray, codes: np.ndarray, task: str) -> float:
  """The T minimising cross-entropy of sigmoid/softmax(T x scores) against the +-1 `codes`."""
  losses = []
  for t in _TEMPERATURES:
    logits = t * scores
    if task == "binary":
      labels = codes[:, 0] > 0
      losses.append(np.mean(np.logaddexp(0.0, np.where(labels, -logits[:, 0], logits[:, 0]))))
    else:
      top = logits.max(axis=1, keepdims=True)
      log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
      losses.append(np.mean(log_norm - logits[np.arange(len(codes)), codes.argmax(axis=1)]))
  return float(_TEMPERATURES[int(np.argmin(losses))])


def _solve(records: tf.data.Dataset, spec: reader.DatasetSpec, num_train: int, dim: int,
           config: Config, notes: list[str]) -> Spectral:
  """The train split's `Spectral` by the plan's method (see the module docstring)."""
  method, size = plan(num_train, dim, int(config.train.ridge_memory_mb * 2**20))
  batches = _batches(records, spec.task, spec.num_outputs)
  if method == "primal":
    return solve_primal(batches)
  x, y, seen = reservoir_sample(batches, size, config.train.seed)
  if len(x) < seen:
    notes.append(f"ridge solved on a uniform sample of {len(x)} of {seen} train examples "
                 f"({dim} features; ridge_memory_mb={config.train.ridge_memory_mb})")
  return solve_dual(x, y, method)


def _fit(spec: reader.DatasetSpec, kind: str, dim: int, train_records: tf.data.Dataset,
         num_train: int, config: Config, notes: list[str]
         ) -> tuple[Spectral, dict[str, Any], np.ndarray, np.ndarray]:
  """Solves on train, scores the grid on validation: `(fit, block, chosen outputs, codes)`.

  The block is `metrics.json`'s record of the solve (method, examples, chosen strength, grid).
  """
  if "validation" not in spec.splits:
    raise ValueError(f"a ridge fit picks its strength on validation; {spec.data_dir!r} has no "
                     "validation split")
  started = time.perf_counter()
  spectral = _solve(train_records, spec, num_train, dim, config, notes)
  grid = config.train.ridge_grid
  outputs, codes = validation_outputs(spectral, _batches(
      reader.read_split(spec, "validation", input_kind=kind), spec.task, spec.num_outputs), grid)
  rows = validation_rows(outputs, codes, grid, spectral.scale, spec.task)
  chosen = max(range(len(rows)), key=lambda i: (rows[i]["val_score"], -rows[i]["val_loss"]))
  block = {"method": spectral.method, "examples": spectral.num_examples, "features": dim,
           "strength": rows[chosen]["strength"], "lambda": rows[chosen]["lambda"],
           "seconds": time.perf_counter() - started, "grid": rows}
  return spectral, block, outputs[chosen], codes


def fit_head(head: str, spec: reader.DatasetSpec, train_records: tf.data.Dataset,
             num_train: int, config: Config, notes: list[str]
             ) -> tuple[keras.Model, dict[str, Any], np.ndarray | None]:
  """Solves a ridge head on `spec`'s train split and picks its strength on validation.

  Args:
    head: `ridge` (flattened map) or `ridge_pooled`.
    spec: the feature dataset.
    train_records: the train split from `reader.read_split` (views as configured).
    num_train: examples in `train_records`.
    config: `ridge_grid`, `ridge_memory_mb`, the seed of the reservoir sample.
    notes: the run's notes (a sampled solve is said there).

  Returns:
    `(model, block, target_mean)`: the head with the solved `output` layer, the `ridge` block
    for `metrics.json`, and for keypoints the mean train targets when every example was used
    (the mean-shape baseline; None otherwise, so evaluation computes it).

  Raises:
    ValueError: no validation split, or an empty split.
  """
  model = zoo.build_head(head, spec, config.head)
  spectral, block, outputs, codes = _fit(spec, zoo.input_kind(head),
                                         int(np.prod(model.input_shape[1:])), train_records,
                                         num_train, config, notes)
  kernel, bias = spectral.weights(block["strength"])
  scale = 1.0 if spec.task == "keypoints" else temperature(outputs, codes, spec.task)
  model.get_layer("output").set_weights([(kernel * scale).astype(np.float32),
                                         (bias * scale).astype(np.float32)])
  block["temperature"] = scale
  exact = spectral.num_examples == num_train and spectral.method != "dual (sample)"
  return model, block, (spectral.y_mean if spec.task == "keypoints" and exact else None)


def starts_from_ridge(head: str, config: Config) -> bool:
  """Whether the head starts from a ridge solve on the train split (`head.ridge_start`)."""
  return head == "keypoints" and config.head.ridge_start


def linear_start(head: str, spec: reader.DatasetSpec, train_records: tf.data.Dataset | None,
                 num_train: int, has_validation: bool, config: Config, notes: list[str]
                 ) -> tuple[tuple[np.ndarray, np.ndarray] | None, dict[str, Any]]:
  """The `keypoints` head's start, `((kernel, bias), {"ridge_start": block})`: a ridge fit on
  the flattened map, chosen on validation; `(None, {})` for other heads, without
  `ridge_start` or without a validation split (noted).

  Started there (`zoo.build_head(linear_start=)`), and with that start as the checkpoint to
  beat, the head is at least as good as the ridge fit on validation.
  """
  if not starts_from_ridge(head, config):
    return None, {}
  if not has_validation:
    notes.append("no validation split: the keypoints head starts at the mean face, not at a "
                 "ridge fit")
    return None, {}
  spectral, block, _, _ = _fit(spec, "map", int(np.prod(spec.feature_map_shape)),
                               train_records, num_train, config, notes)
  return spectral.weights(block["strength"]), {"ridge_start": block}
