"""The two densities of IDDPM's variational bound (Nichol & Dhariwal 2021, their ``losses.py``):
the KL between two diagonal Gaussians, and the decoder's log-likelihood of data discretized to 256
bins. ``GaussianDiffusion.vlb_terms_bpd`` combines them; adaptive's held-out losses use the KL.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

# IDDPM discretizes data in [-1, 1] into 256 bins of width 2 / 255.
_HALF_BIN = 1.0 / 255.0
_LOG_FLOOR = 1e-12


def normal_kl(
  mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
  """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats.

  Args:
    mean1, logvar1, mean2, logvar2: broadcastable float arrays, e.g. [B, H, W, C] float32.

  Returns:
    The broadcast shape, float32.
  """
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def discretized_gaussian_log_likelihood(
  x: jax.Array, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
  """Log-likelihood of data discretized to 256 bins in [-1, 1] under a Gaussian (IDDPM decoder).

  Bin j covers [x_j - 1/255, x_j + 1/255]; the two edge bins extend to -inf / +inf so the 256
  probabilities sum to one.

  Args:
    x: [B, H, W, C] float32, values on the grid -1 + 2j/255.
    means: [B, H, W, C] float32.
    log_scales: [B, H, W, C] float32, log standard deviations.

  Returns:
    [B, H, W, C] float32 log-probabilities in nats.
  """
  chex.assert_equal_shape([x, means, log_scales])
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  upper = inv_std * (centered + _HALF_BIN)
  lower = inv_std * (centered - _HALF_BIN)
  # The exact normal CDF (not IDDPM's tanh approximation); log_ndtr keeps tails accurate.
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)
  log_sf_lower = jax.scipy.special.log_ndtr(-lower)
  delta = jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower)
  log_delta = jnp.log(jnp.maximum(delta, _LOG_FLOOR))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_delta))
