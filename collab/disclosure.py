"""How much of a client's private data the server sees or can produce (spec §5).

Everything the server handles is compared with the client's *training* images (its private data):

* the cut images ``x_cut`` it receives in training,
* its hand-off latents ``x_hat_cut`` (what it sends a client at inference),
* its own network continued alone to ``t = 0`` (what it could generate without the client).

Three distances, all "higher = less disclosed": Frechet distance and KID in the feature network's
space, the mean pixel MSE over all (server image, training image) pairs (the ECIS code's measure),
and the mean nearest-neighbour distance (per-pixel RMS) from each server image to the training set,
which is what a memorising server would drive to zero. Images are float32 in [-1, 1].
"""

from __future__ import annotations

from typing import Any

import chex
import numpy as np

from common.diffusion import GaussianDiffusion


def _flat(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x.reshape(x.shape[0], -1)


def pixel_mse_all_pairs(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over all pairs (i, j) of ``||a_i - b_j||^2 / d``; a [N, H, W, C], b [M, H, W, C].

  Computed in closed form, ``E||a||^2 + E||b||^2 - 2 <mean a, mean b>`` per pixel, so it costs
  O((N + M) d) instead of O(N M d).
  """
  chex.assert_equal_shape_suffix([a, b], 3)
  fa, fb = _flat(a), _flat(b)
  d = fa.shape[1]
  sq_a = np.mean(np.sum(fa**2, axis=1))
  sq_b = np.mean(np.sum(fb**2, axis=1))
  return float((sq_a + sq_b - 2.0 * fa.mean(0) @ fb.mean(0)) / d)


def nearest_neighbour_distance(a: np.ndarray, b: np.ndarray, chunk: int = 512) -> float:
  """Mean over ``a`` of the per-pixel RMS distance to its nearest image in ``b``.

  a [N, H, W, C] (server images), b [M, H, W, C] (the client's training images); 0 means every
  server image is a copy of a training image.
  """
  chex.assert_equal_shape_suffix([a, b], 3)
  fa, fb = _flat(a), _flat(b)
  sq_b = np.sum(fb**2, axis=1)
  nearest = []
  for start in range(0, len(fa), chunk):
    block = fa[start : start + chunk]
    d2 = np.sum(block**2, axis=1)[:, None] + sq_b[None, :] - 2.0 * block @ fb.T
    nearest.append(np.min(np.maximum(d2, 0.0), axis=1))
  return float(np.mean(np.sqrt(np.concatenate(nearest) / fa.shape[1])))


def cut_mse_measured(x0: np.ndarray, x_cut: np.ndarray) -> float:
  """``E ||x_cut - x0||^2 / d`` over paired images [N, H, W, C]."""
  chex.assert_equal_shape([x0, x_cut])
  return float(np.mean((np.asarray(x_cut, np.float64) - np.asarray(x0, np.float64)) ** 2))


def cut_mse_analytic(diffusion: GaussianDiffusion, cut_point: int, x0: np.ndarray) -> float:
  """The spec's §5 value of ``E ||x_cut - x0||^2 / d`` for images ``x0`` [N, H, W, C]:

  ``(1 - sqrt(abar))^2 E||x0||^2 / d + (1 - abar)`` with abar = abar(cut_point), since
  ``x_cut - x0 = (sqrt(abar) - 1) x0 + sqrt(1 - abar) eps`` and eps is independent of x0.
  """
  abar = float(diffusion.np_alpha_bar_levels()[cut_point])
  second_moment = float(np.mean(np.asarray(x0, np.float64) ** 2))
  return (1.0 - np.sqrt(abar)) ** 2 * second_moment + (1.0 - abar)


def disclosure_metrics(
  server_images: np.ndarray,
  client_images: np.ndarray,
  server_features: np.ndarray,
  client_features: np.ndarray,
  seed: int,
) -> dict[str, Any]:
  """All distances between what the server has and one client's private images.

  Args:
    server_images: [N, H, W, C]; client_images: [M, H, W, C] (the client's training data).
    server_features, client_features: their feature-network embeddings [N, D], [M, D].

  Returns:
    ``fid``, ``kid_mean``, ``kid_std`` (feature space), ``pixel_mse`` (all pairs),
    ``nn_distance`` (per-pixel RMS to the nearest training image).
  """
  from common.eval import distribution_metrics

  chex.assert_equal_shape_prefix([server_images, server_features], 1)
  chex.assert_equal_shape_prefix([client_images, client_features], 1)
  feats = distribution_metrics(client_features, server_features, seed)
  return {
    "fid": feats["fid"],
    "kid_mean": feats["kid_mean"],
    "kid_std": feats["kid_std"],
    "pixel_mse": pixel_mse_all_pairs(server_images, client_images),
    "nn_distance": nearest_neighbour_distance(server_images, client_images),
  }
