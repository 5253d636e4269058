"""Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel (Binkowski et al. 2018).

Unlike FID it has an unbiased estimator, so it is comparable across sample sizes; the price is
variance, hence the mean and std over random subsets (as clean-fid and torchmetrics report).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _polynomial_kernel(
  x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float
) -> np.ndarray:
  return (gamma * (x @ y.T) + coef0) ** degree


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
  m = kxx.shape[0]
  # Diagonals k(x_i, x_i) are dropped: including them is exactly the bias of the V-statistic.
  sum_xx = kxx.sum() - np.trace(kxx)
  sum_yy = kyy.sum() - np.trace(kyy)
  return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(
  features_a: Any,
  features_b: Any,
  *,
  num_subsets: int = 100,
  subset_size: int = 1000,
  degree: int = 3,
  gamma: float | None = None,
  coef0: float = 1.0,
  seed: int = 0,
) -> tuple[float, float]:
  """KID between two feature sets.

  Args:
    features_a: [Na, D] float features (cast to float64).
    features_b: [Nb, D] float features (cast to float64).
    num_subsets: number of random subset pairs the estimate is averaged over.
    subset_size: samples per subset, clipped to ``min(Na, Nb)``; drawn without replacement.
    degree, gamma, coef0: kernel ``k(x, y) = (gamma x.y + coef0) ** degree``; gamma defaults
      to ``1 / D``.
    seed: seed of the numpy Generator that picks the subsets (same seed -> same result).

  Returns:
    (mean, std) over subsets of the unbiased MMD^2 estimate, as Python floats. The mean can be
    slightly negative when the two distributions are equal. std uses ddof=0 (torchmetrics).
  """
  a = np.asarray(features_a, dtype=np.float64)
  b = np.asarray(features_b, dtype=np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"kernel_inception_distance: expected [N, D] arrays, got {a.shape}, {b.shape}")
  if num_subsets < 1:
    raise ValueError(f"kernel_inception_distance: num_subsets must be >= 1, got {num_subsets}")
  m = min(subset_size, a.shape[0], b.shape[0])
  if m < 2:
    raise ValueError(f"kernel_inception_distance: subsets need >= 2 samples, got {m}")
  gamma = 1.0 / a.shape[1] if gamma is None else gamma

  rng = np.random.default_rng(seed)
  scores = np.empty(num_subsets, dtype=np.float64)
  for i in range(num_subsets):
    x = a[rng.choice(a.shape[0], m, replace=False)]
    y = b[rng.choice(b.shape[0], m, replace=False)]
    scores[i] = _mmd2_unbiased(
      _polynomial_kernel(x, x, degree, gamma, coef0),
      _polynomial_kernel(y, y, degree, gamma, coef0),
      _polynomial_kernel(x, y, degree, gamma, coef0),
    )
  return float(scores.mean()), float(scores.std())
