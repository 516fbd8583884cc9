"""Linear-probe L2 sweep: every strength of a log grid trained at once on in-memory features.

    headstart train --features DATA/features/vgg16-imagenet-3fa2c1d0 --head linear --sweep --out runs/x

The pooled vectors of train and validation fit in memory, so one `tf.function` trains a stack of
G linear models (one per L2 strength, weights `[G, D, outputs]`) full-batch with Adam on the same
loss Keras uses for the linear head (`loss + l2 * sum(W**2)`), then picks the strength with the
best validation score. A grid of 7 costs about as much as one small fit.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf


def _loss(task: str, logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """Per-grid-point mean loss, `logits` `[G, N, O]` -> `[G]`."""
  if task == "binary":
    labels = tf.broadcast_to(tf.cast(y, tf.float32)[None, :, None], tf.shape(logits))
    return tf.reduce_mean(
        tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), axis=[1, 2])
  if task == "multiclass":
    labels = tf.broadcast_to(tf.cast(y, tf.int32)[None, :], tf.shape(logits)[:2])
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits), axis=1)
  return tf.reduce_mean(tf.abs(logits - tf.cast(y, tf.float32)[None]), axis=[1, 2])


def _scores(task: str, logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(score to maximise, loss) per grid point on held-out data."""
  loss = _loss(task, tf.constant(logits), tf.constant(y)).numpy()
  if task == "binary":
    accuracy = ((logits[..., 0] > 0) == (y[None] > 0)).mean(axis=1)
  elif task == "multiclass":
    accuracy = (logits.argmax(axis=-1) == y[None]).mean(axis=1)
  else:
    return -loss, loss
  return accuracy, loss


def sweep_l2(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
             task: str, num_outputs: int, grid: Sequence[float], steps: int = 300,
             learning_rate: float = 1e-2, seed: int = 0) -> tuple[float, list[dict[str, Any]]]:
  """Trains one linear model per L2 strength and returns the best strength and the table.

  Args:
    train_x: `[N, D]` pooled features.
    train_y: `[N]` labels or `[N, 2K]` targets.
    val_x: validation features.
    val_y: validation labels or targets.
    task: `binary`, `multiclass` or `keypoints`.
    num_outputs: width of the output layer.
    grid: L2 strengths to try.
    steps: full-batch Adam steps.
    learning_rate: Adam step size.
    seed: initialisation seed.

  Returns:
    `(best_l2, rows)`; each row holds `l2`, `val_score` (accuracy, or -MAE for keypoints) and
    `val_loss`. Ties in score go to the lower validation loss.

  Raises:
    ValueError: empty grid or no validation examples.
  """
  if not grid:
    raise ValueError("the L2 sweep grid is empty")
  if len(val_x) == 0:
    raise ValueError("--sweep needs a validation split to pick the L2 strength; this dataset "
                     "has none")
  strengths = tf.constant(np.asarray(grid, np.float32))
  x = tf.constant(train_x, tf.float32)
  y = tf.constant(train_y)
  rng = np.random.default_rng(seed)
  limit = np.sqrt(6.0 / (train_x.shape[1] + num_outputs))   # Glorot uniform, as Dense uses
  weights = tf.Variable(rng.uniform(-limit, limit, (len(grid), train_x.shape[1], num_outputs))
                        .astype(np.float32))
  bias = tf.Variable(np.zeros((len(grid), 1, num_outputs), np.float32))
  optimizer = keras.optimizers.Adam(learning_rate)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      logits = tf.einsum("nd,gdo->gno", x, weights) + bias
      penalty = strengths * tf.reduce_sum(tf.square(weights), axis=[1, 2])
      # Sum over the grid: each model's gradient only sees its own loss term.
      total = tf.reduce_sum(_loss(task, logits, y) + penalty)
    gradients = tape.gradient(total, [weights, bias])
    optimizer.apply_gradients(zip(gradients, [weights, bias]))

  for _ in range(steps):
    step()
  val_logits = np.einsum("nd,gdo->gno", val_x.astype(np.float32), weights.numpy()) + bias.numpy()
  score, loss = _scores(task, val_logits, np.asarray(val_y))
  rows = [{"l2": float(l2), "val_score": float(s), "val_loss": float(v)}
          for l2, s, v in zip(grid, score, loss)]
  best = max(rows, key=lambda row: (row["val_score"], -row["val_loss"]))
  return best["l2"], rows
