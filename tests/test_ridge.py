"""Ridge heads: the closed-form solve against NumPy, its memory plan, and full runs on synthetic
feature datasets (classification and keypoints) through `headstart train`'s library call.

    .venv/bin/pytest tests/test_ridge.py -q      # seconds

The sample-face keypoint checks (ridge vs the mean face, the keypoints head vs ridge) are in
`tests/test_heads_e2e.py`, on real stage-1/2 output.
"""
from __future__ import annotations

import csv

import keras
import numpy as np
import pytest

from heads import config as config_lib
from heads import reader, ridge, training
from tests.test_heads_unit import keypoints_dir, tiny, write_feature_dataset  # noqa: F401


def reference(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
  """Ridge with an unpenalised intercept in the plainest NumPy: (kernel, bias)."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - x_mean, y - y_mean
  kernel = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
  return kernel, y_mean - x_mean @ kernel


@pytest.mark.parametrize("examples,dim", [(40, 6), (12, 30)])
def test_primal_and_dual_equal_the_numpy_solve_at_every_strength(examples, dim):
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (examples, dim)).astype(np.float32)
  y = rng.normal(size=(examples, 3))
  primal = ridge.solve_primal(iter([(x[:7], y[:7]), (x[7:], y[7:])]))
  dual = ridge.solve_dual(x.copy(), y)
  for strength in (1e-4, 1e-1, 10.0):
    for fit in (primal, dual):
      kernel, bias = fit.weights(strength)
      want_kernel, want_bias = reference(x, y, strength * fit.scale)
      np.testing.assert_allclose(kernel, want_kernel, atol=1e-5, rtol=1e-4)
      np.testing.assert_allclose(bias, want_bias, atol=1e-5, rtol=1e-4)
  # Both forms predict alike, and `predict` is the weights' affine map.
  grid = (1e-3, 1.0)
  np.testing.assert_allclose(primal.predict(x, grid), dual.predict(x, grid), atol=1e-5)
  kernel, bias = dual.weights(1.0)
  np.testing.assert_allclose(dual.predict(x, (1.0,))[0], x @ kernel + bias, atol=1e-5)


def test_plan_is_exact_when_it_fits_and_samples_within_the_budget_otherwise():
  assert ridge.plan(100, 5000, 2**30) == ("dual", 100)
  assert ridge.plan(100_000, 512, 2**30) == ("primal", 100_000)
  method, size = ridge.plan(100_000, 50_176, 2**30)
  assert method == "dual (sample)" and 1000 < size < 100_000
  assert 8 * size * 50_176 + 24 * size * size <= 2**30
  with pytest.raises(ValueError, match="ridge_memory_mb"):
    ridge.plan(10, 10**9, 2**20)


def test_reservoir_sample_keeps_a_uniform_subset():
  x = np.arange(1000, dtype=np.float32)[:, None]
  batches = [(x[i:i + 64], x[i:i + 64].astype(np.float64)) for i in range(0, 1000, 64)]
  kept, targets, seen = ridge.reservoir_sample(iter(batches), 100, seed=0)
  assert seen == 1000 and len(kept) == 100 and len(set(kept[:, 0])) == 100
  np.testing.assert_array_equal(kept[:, 0], targets[:, 0])
  assert 350 < kept.mean() < 650       # not the first 100 (mean 49.5)


def test_ridge_classifier_run_equals_numpy_and_exports_as_a_plain_dense(tmp_path):
  data = write_feature_dataset(tmp_path / "d", task="multiclass",
                               counts={"train": 30, "validation": 12, "test": 12})
  result = training.train(str(data), "ridge", str(tmp_path / "run"), tiny(), verbose=0)
  block = result["ridge"]
  assert block["method"] == "dual" and block["features"] == 36    # 30 examples of 3x3x4
  assert len(block["grid"]) == len(config_lib.tiny().train.ridge_grid)
  assert result["epochs"] == 0 and result["validation"]["accuracy"] > 0.5
  spec = reader.load_spec(str(data))
  arrays = {split: reader.load_arrays(reader.read_split(spec, split, input_kind="map"))
            for split in ("train", "test")}
  x = {split: a["x"].reshape(len(a["x"]), -1) for split, a in arrays.items()}
  codes = 2.0 * np.eye(3)[arrays["train"]["y"]] - 1.0
  kernel, bias = reference(x["train"], codes, block["lambda"])
  logits = block["temperature"] * (x["test"] @ kernel + bias)
  want = np.exp(logits - logits.max(axis=1, keepdims=True))
  want /= want.sum(axis=1, keepdims=True)
  rows = list(csv.DictReader((tmp_path / "run" / "predictions_test.csv").open()))
  got = np.array([[float(row[f"prob_{name}"]) for name in spec.class_names] for row in rows])
  np.testing.assert_allclose(got, want, atol=1e-4)
  head = keras.models.load_model(tmp_path / "run" / "head.keras")
  assert [type(layer).__name__ for layer in head.layers] == ["InputLayer", "Flatten", "Dense"]
  # The stored layer is the solve itself (probabilities alone saturate on separable data).
  stored_kernel, stored_bias = head.get_layer("output").get_weights()
  np.testing.assert_allclose(stored_kernel, block["temperature"] * kernel, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(stored_bias, block["temperature"] * bias, atol=1e-4, rtol=1e-4)


def test_ridge_chooses_on_validation_and_a_small_budget_samples(keypoints_dir, tmp_path):
  result = training.train(str(keypoints_dir), "ridge", str(tmp_path / "run"), tiny(), verbose=0)
  rows = result["ridge"]["grid"]
  best = max(rows, key=lambda row: (row["val_score"], -row["val_loss"]))
  assert result["ridge"]["strength"] == best["strength"]
  assert result["validation"]["loss"] == pytest.approx(-best["val_score"], rel=1e-4)
  assert not any("sample" in note for note in result["notes"])
  # ~10 KB holds 15 of the 24 train maps (3x3x4), and X'X does not fit: a sample, said so.
  sampled = training.train(str(keypoints_dir), "ridge", str(tmp_path / "s"),
                           config_lib.override(tiny(), {"train": {"ridge_memory_mb": 0.01}}),
                           verbose=0)
  assert sampled["ridge"]["method"] == "dual (sample)" and sampled["ridge"]["examples"] == 15
  assert any("sample of 15 of 24" in note for note in sampled["notes"]), sampled["notes"]
  with pytest.raises(ValueError, match="ridge_memory_mb"):
    training.train(str(keypoints_dir), "ridge", str(tmp_path / "none"),
                   config_lib.override(tiny(), {"train": {"ridge_memory_mb": 1e-6}}), verbose=0)
  no_val = write_feature_dataset(tmp_path / "nv", task="keypoints", counts={"train": 9})
  with pytest.raises(ValueError, match="validation"):
    training.train(str(no_val), "ridge", str(tmp_path / "nvrun"), tiny(), verbose=0)
