"""Noise schedules (betas) and the alpha-bar / SNR quantities derived from them.

Everything here is float64 numpy: the tables are built once on the host and only cast to float32
when they become device arrays, because products of thousands of (1 - beta) factors and
differences like 1 - abar_k / abar_j lose most of their digits in float32.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "cosine")

# IDDPM's cosine offset: keeps beta_0 from being vanishingly small near t = 0.
COSINE_S = 0.008
# IDDPM clips cosine betas so the last step does not divide by abar_T ~ 0.
MAX_BETA = 0.999


def _cosine_f(u: np.ndarray) -> np.ndarray:
  """f(u) = cos^2((u + s) / (1 + s) * pi / 2) for u = t / T in [0, 1]; float64."""
  return np.cos((u + COSINE_S) / (1.0 + COSINE_S) * (math.pi / 2.0)) ** 2


def get_betas(name: str, num_timesteps: int) -> np.ndarray:
  """Returns the 0-based beta array of a named schedule.

  Args:
    name: "linear" (DDPM, scaled by 1000 / T as in IDDPM so any T spans the same noise range;
      needs T > 20) or "cosine" (IDDPM, s = 0.008, betas clipped at 0.999).
    num_timesteps: T >= 1.

  Returns:
    betas: [T] float64, each in (0, 1).

  Raises:
    ValueError: unknown ``name``, T < 1, or T <= 20 for linear.
  """
  if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
  t_count = int(num_timesteps)
  if name == "linear":
    scale = 1000.0 / t_count
    if scale * 0.02 >= 1.0:
      # The scaled end beta reaches 1 (abar = 0, infinite x0 reconstruction) for T <= 20.
      raise ValueError(f"the linear schedule needs num_timesteps > 20, got {num_timesteps}")
    return np.linspace(scale * 1e-4, scale * 0.02, t_count, dtype=np.float64)
  if name == "cosine":
    u = np.arange(t_count + 1, dtype=np.float64) / t_count
    f = _cosine_f(u)
    # beta_i = 1 - f((i+1)/T) / f(i/T) telescopes so that abar = f(t/T) / f(0) before clipping.
    return np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
  raise ValueError(f"unknown beta schedule {name!r}; allowed: {', '.join(SCHEDULES)}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  """abar[t] = prod_{i <= t} (1 - beta_i), the 0-based (IDDPM) table.

  Args:
    betas: [T] float.

  Returns:
    [T] float64, strictly decreasing in (0, 1).
  """
  return np.cumprod(1.0 - np.asarray(betas, np.float64))


def alpha_bar_levels(betas: np.ndarray) -> np.ndarray:
  """abar indexed by level k in {0..T}: abar(0) = 1 (clean data), abar(k) = alphas_cumprod[k-1].

  Args:
    betas: [T] float.

  Returns:
    [T + 1] float64.
  """
  return np.concatenate([[1.0], alphas_cumprod(betas)])


def snr(alpha_bar: np.ndarray) -> np.ndarray:
  """SNR = abar / (1 - abar); infinite where abar == 1 (level 0).

  Args:
    alpha_bar: [...] float.

  Returns:
    [...] float64.
  """
  a = np.asarray(alpha_bar, np.float64)
  with np.errstate(divide="ignore"):
    return a / (1.0 - a)


def log_snr(alpha_bar: np.ndarray) -> np.ndarray:
  """log SNR = log(abar) - log(1 - abar), via log1p so small (1 - abar) keeps its digits.

  Args:
    alpha_bar: [...] float.

  Returns:
    [...] float64 (+inf where abar == 1).
  """
  a = np.asarray(alpha_bar, np.float64)
  with np.errstate(divide="ignore"):
    return np.log(a) - np.log1p(-a)
