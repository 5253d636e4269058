"""Improved precision and recall (Kynkaanniemi et al. 2019) on feature sets.

Each set's manifold is approximated by the union of balls around its points, with radius the
distance to the point's k-th nearest neighbour in its own set. Precision asks how many generated
samples fall inside the real manifold (fidelity); recall asks how many real samples fall inside
the generated manifold (coverage).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_DEFAULT_BATCH_SIZE = 1024


def _sq_dists(x: np.ndarray, y: np.ndarray, y_sq: np.ndarray) -> np.ndarray:
  # Expanded form ||x||^2 + ||y||^2 - 2 x.y keeps memory at [Bx, By] instead of [Bx, By, D];
  # float64 keeps the cancellation error far below typical k-NN radii, and the clip removes the
  # tiny negatives it can still produce for coincident points.
  d = np.sum(x * x, axis=1)[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
  return np.maximum(d, 0.0)


def _knn_sq_radii(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Squared distance from each row of ``x`` to its k-th nearest other row: [N] float64."""
  n = x.shape[0]
  x_sq = np.sum(x * x, axis=1)
  radii = np.empty(n, dtype=np.float64)
  for start in range(0, n, batch_size):
    chunk = x[start : start + batch_size]
    d = _sq_dists(chunk, x, x_sq)
    # Force each point's own distance to the minimum so index k (0-based) is the k-th
    # neighbour excluding itself, even when rounding makes the self-distance slightly > 0.
    rows = np.arange(chunk.shape[0])
    d[rows, start + rows] = -1.0
    radii[start : start + chunk.shape[0]] = np.partition(d, k, axis=1)[:, k]
  return radii


def _coverage(manifold: np.ndarray, sq_radii: np.ndarray, queries: np.ndarray, batch_size: int):
  """Fraction of ``queries`` within at least one ball (centre in ``manifold``, its radius)."""
  m_sq = np.sum(manifold * manifold, axis=1)
  inside = 0
  for start in range(0, queries.shape[0], batch_size):
    d = _sq_dists(queries[start : start + batch_size], manifold, m_sq)
    inside += int(np.count_nonzero(np.any(d <= sq_radii[None, :], axis=1)))
  return inside / queries.shape[0]


def precision_recall(
  real_features: Any,
  fake_features: Any,
  *,
  k: int = 3,
  batch_size: int = _DEFAULT_BATCH_SIZE,
) -> tuple[float, float]:
  """Improved precision and recall of ``fake_features`` against ``real_features``.

  Args:
    real_features: [Nr, D] float features of real data (cast to float64), Nr > k.
    fake_features: [Nf, D] float features of generated data (cast to float64), Nf > k.
    k: neighbourhood size for the ball radii (the paper uses k = 3).
    batch_size: rows per chunk of the pairwise-distance matrix; peak memory is about
      ``batch_size * max(Nr, Nf) * 8`` bytes per temporary.

  Returns:
    (precision, recall) as Python floats in [0, 1].
  """
  real = np.asarray(real_features, dtype=np.float64)
  fake = np.asarray(fake_features, dtype=np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall: expected [N, D] arrays, got {real.shape}, {fake.shape}")
  if k < 1:
    raise ValueError(f"precision_recall: k must be >= 1, got {k}")
  if min(real.shape[0], fake.shape[0]) <= k:
    raise ValueError(
      f"precision_recall: each set needs more than k={k} samples, got {real.shape[0]}, "
      f"{fake.shape[0]}"
    )
  if batch_size < 1:
    raise ValueError(f"precision_recall: batch_size must be >= 1, got {batch_size}")

  real_radii = _knn_sq_radii(real, k, batch_size)
  fake_radii = _knn_sq_radii(fake, k, batch_size)
  precision = _coverage(real, real_radii, fake, batch_size)
  recall = _coverage(fake, fake_radii, real, batch_size)
  return precision, recall
