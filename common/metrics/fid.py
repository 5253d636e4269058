"""Frechet distance between Gaussian fits of feature sets (the maths behind FID).

The feature extractor is someone else's business: everything here takes ``[N, D]`` feature
arrays and works in float64, because FID subtracts traces of large, nearly equal matrices and
float32 accumulation visibly moves the score at the usual D = 2048.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import scipy.linalg

from common import fileio


def _as_features(features: Any, name: str = "features") -> np.ndarray:
  # Cast before any arithmetic so sums are accumulated in float64, not the input dtype.
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected a [N, D] array, got shape {x.shape}")
  return x


def compute_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance of a feature set.

  Args:
    features: [N, D] float (any float dtype; cast to float64 first), N >= 2.

  Returns:
    (mu [D] float64, sigma [D, D] float64), with sigma using ddof=1 as pytorch-fid does.
  """
  x = _as_features(features)
  if x.shape[0] < 2:
    raise ValueError(f"compute_statistics: need at least 2 samples, got {x.shape[0]}")
  mu = x.mean(axis=0)
  sigma = np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])
  return mu, sigma


def _check_stats(mu: Any, sigma: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
  if mu.ndim != 1:
    raise ValueError(f"frechet_distance: mu{which} must be [D], got shape {mu.shape}")
  d = mu.shape[0]
  if sigma.shape != (d, d):
    raise ValueError(
      f"frechet_distance: sigma{which} must be [{d}, {d}] to match mu{which}, got {sigma.shape}"
    )
  return mu, sigma


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
  """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``.

  Args:
    mu1, mu2: [D] float means.
    sigma1, sigma2: [D, D] float covariances.
    eps: diagonal offset added to both covariances when ``sigma1 @ sigma2`` is too singular
      for ``sqrtm`` to return a finite result (e.g. fewer samples than dimensions).

  Returns:
    The distance as a Python float.

  Raises:
    ValueError: on mismatched shapes, or when the matrix square root has a non-negligible
      imaginary part (a sign the covariances are not PSD or are badly conditioned).
  """
  mu1, sigma1 = _check_stats(mu1, sigma1, "1")
  mu2, sigma2 = _check_stats(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise ValueError(f"frechet_distance: dimension mismatch, {mu1.shape} vs {mu2.shape}")

  diff = mu1 - mu2
  # The product of two PSD matrices is not symmetric, so a general (Schur) sqrtm is needed.
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)) or _large_imaginary(covmean):
    # Singular products (rank-deficient sigmas: fewer samples than dimensions, as in a per-class
    # group of a few images) have no well-defined root, which shows as non-finite values or a
    # non-negligible imaginary part; a tiny ridge on both covariances makes it well-defined while
    # changing the score negligibly.
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    # Rounding gives tiny imaginary parts even for valid inputs; large ones mean a real error.
    if _large_imaginary(covmean):
      max_imag = np.max(np.abs(covmean.imag))
      raise ValueError(f"frechet_distance: sqrtm has imaginary component {max_imag:.3g}")
    covmean = covmean.real

  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _large_imaginary(covmean: np.ndarray) -> bool:
  """An imaginary part on the diagonal beyond rounding (pytorch-fid's 1e-3)."""
  return np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)


class StatsAccumulator:
  """Streaming mean/covariance over feature batches, so 50k-sample FID never holds all features.

  Batches are merged with Chan et al.'s pairwise update (per-batch centred second moments plus
  a mean-shift correction) rather than raw sums of ``x x^T``, because subtracting
  ``n mu mu^T`` from raw sums loses most float64 digits when features have a large mean.

  ``statistics()`` equals ``compute_statistics`` on the concatenation of all batches (to
  floating-point rounding).
  """

  def __init__(self, dim: int | None = None):
    self._dim = dim
    self.count = 0
    self._mean: np.ndarray | None = None
    self._m2: np.ndarray | None = None  # sum of centred outer products, [D, D] float64

  @property
  def dim(self) -> int | None:
    return self._dim

  def update(self, features: Any) -> None:
    """Adds a batch. ``features``: [B, D] float; B may be 0 or 1."""
    x = _as_features(features)
    if self._dim is None:
      self._dim = x.shape[1]
    if x.shape[1] != self._dim:
      raise ValueError(f"StatsAccumulator.update: expected D={self._dim}, got shape {x.shape}")
    nb = x.shape[0]
    if nb == 0:
      return
    mean_b = x.mean(axis=0)
    centred = x - mean_b
    m2_b = centred.T @ centred
    if self.count == 0:
      self._mean, self._m2, self.count = mean_b, m2_b, nb
      return
    na = self.count
    n = na + nb
    delta = mean_b - self._mean
    self._mean = self._mean + delta * (nb / n)
    self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (na * nb / n)
    self.count = n

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns (mu [D] float64, sigma [D, D] float64, ddof=1); needs count >= 2."""
    if self.count < 2:
      raise ValueError(f"StatsAccumulator.statistics: need at least 2 samples, got {self.count}")
    return self._mean.copy(), self._m2 / (self.count - 1)


def save_statistics(path: str | os.PathLike, mu: Any, sigma: Any, /, **meta: Any) -> None:
  """Writes ``mu`` [D], ``sigma`` [D, D] (as float64) and scalar/array ``meta`` to an .npz.

  Meta values are stored as numpy arrays; keys ``mu`` and ``sigma`` are reserved.
  """
  for key in ("mu", "sigma"):
    if key in meta:
      raise ValueError(f"save_statistics: meta key {key!r} is reserved")
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  _check_stats(mu, sigma, "")
  path = os.fspath(path)
  if not path.endswith(".npz"):  # np.savez's naming, kept
    path += ".npz"
  meta_arrays = {f"meta_{k}": np.asarray(v) for k, v in meta.items()}
  fileio.save_npz(path, mu=mu, sigma=sigma, **meta_arrays)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Reads what ``save_statistics`` wrote: (mu [D] float64, sigma [D, D] float64, meta dict).

  0-d meta arrays come back as Python scalars (``.item()``), others as numpy arrays.
  """
  with np.load(path, allow_pickle=False) as data:
    mu = data["mu"]
    sigma = data["sigma"]
    meta = {}
    for key in data.files:
      if key.startswith("meta_"):
        value = data[key]
        meta[key[len("meta_") :]] = value.item() if value.ndim == 0 else value
  return mu, sigma, meta
