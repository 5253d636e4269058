"""Gaussian diffusion maths in IDDPM (Nichol & Dhariwal 2021) conventions.

Timestep / latent convention (the whole repo relies on it):

* Latents are indexed by *level* k in {0, ..., T}. x_0 is clean data, x_T is (almost) pure noise,
  and x_k ~ q(x_k | x_0) = N(sqrt(abar(k)) x_0, (1 - abar(k)) I) with abar(0) = 1 and
  abar(k) = prod_{i < k} (1 - beta_i) over the 0-based beta array, i.e. IDDPM's
  ``alphas_cumprod[k - 1]``.
* The network's timestep input for the reverse step x_k -> x_{k-1} is the 0-based index
  t = k - 1 in {0, ..., T - 1} (IDDPM's convention). Every method here that takes ``t`` means this
  0-based index: ``q_sample(x0, t, noise)`` noises with ``alphas_cumprod[t]`` (level t + 1) and
  ``p_mean_variance(out, x_t, t)`` describes the step from level t + 1 to level t.
* Training draws t uniformly in {0, ..., T - 1}. Methods whose name ends in ``_levels`` take levels
  k instead, where level 0 (clean data) is meaningful.

Tables are computed in float64 numpy and stored as float32 device arrays on a
``flax.struct.dataclass``, so a ``GaussianDiffusion`` can be closed over or passed into ``jit``;
its configuration fields are static.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common.diffusion import schedules
from common.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSSES = ("simple", "hybrid")
FIXED_VARIANCES = ("small", "large")
# How a sampler bounds its x0 estimate: "static" clips to [-1, 1] (IDDPM), "dynamic" is Imagen's
# dynamic thresholding (Saharia et al. 2022, the official CollaFuse sampler's).
X0_CLIPPINGS = ("static", "dynamic")


def _mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the leading batch axis: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def check_x0_clipping(clipping: str, percentile: float) -> None:
  """Raises ValueError unless ``clipping`` is one of ``X0_CLIPPINGS`` and ``percentile`` is in
  (0, 1]: the one check of the bound's settings, for ``clip_x0`` and the samplers."""
  if clipping not in X0_CLIPPINGS:
    raise ValueError(f"unknown x0_clipping {clipping!r}; allowed: {', '.join(X0_CLIPPINGS)}")
  if not 0.0 < percentile <= 1.0:
    raise ValueError(f"dynamic_threshold_percentile must be in (0, 1], got {percentile}")


def clip_x0(x0: jax.Array, clipping: str = "static", percentile: float = 0.95) -> jax.Array:
  """Bounds a predicted x0 to the data range [-1, 1].

  "static": clip to [-1, 1]. "dynamic" (Imagen): per sample, s = max(quantile(|x0|, percentile)
  over all its values, 1), then clip to [-s, s] and divide by s: a sample that overshoots is
  shrunk back into range instead of saturating, and with s = 1 this is exactly the static clip.

  Args:
    x0: [B, ...] float32 predicted clean data.
    clipping: one of ``X0_CLIPPINGS``.
    percentile: the quantile of |x0| (in (0, 1]) used by "dynamic" (Imagen's default 0.95).

  Returns:
    [B, ...] like x0.

  Raises:
    ValueError: an unknown ``clipping`` or a percentile outside (0, 1] (``check_x0_clipping``).
  """
  check_x0_clipping(clipping, percentile)
  if clipping == "static":
    return jnp.clip(x0, -1.0, 1.0)
  b = x0.shape[0]
  s = jnp.quantile(jnp.abs(x0).reshape(b, -1), percentile, axis=-1)
  # Never expand a sample already inside [-1, 1]: the threshold is at least 1.
  s = jnp.maximum(s, 1.0).astype(x0.dtype).reshape((b,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def _check_batch(x: jax.Array, t: jax.Array) -> None:
  chex.assert_rank(t, 1)
  chex.assert_axis_dimension(x, 0, t.shape[0])


def _f32(a: np.ndarray) -> jax.Array:
  return jnp.asarray(np.asarray(a, np.float64), jnp.float32)


@struct.dataclass
class GaussianDiffusion:
  """Schedule tables plus the forward / reverse / loss maths; build with ``create``.

  All [T] tables are indexed by the 0-based timestep t; ``alpha_bar_levels`` and
  ``log_alpha_bar_levels`` ([T + 1]) are indexed by level k = t + 1 (level 0 = clean data).
  """

  betas: jax.Array
  log_betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  fixed_large_log_variance: jax.Array
  snr_table: jax.Array
  log_snr_table: jax.Array
  alpha_bar_levels: jax.Array
  log_alpha_bar_levels: jax.Array

  schedule: str = struct.field(pytree_node=False)
  num_timesteps: int = struct.field(pytree_node=False)
  parameterization: str = struct.field(pytree_node=False)
  learn_sigma: bool = struct.field(pytree_node=False)
  loss: str = struct.field(pytree_node=False)
  vlb_weight: float = struct.field(pytree_node=False)
  min_snr_gamma: float = struct.field(pytree_node=False)
  fixed_variance: str = struct.field(pytree_node=False)
  # > 0: this chain is the tail of `schedule` over (num_timesteps + skip) steps after its first
  # `skip` steps, i.e. its "data" is the level-`skip` latent of that chain (see `rebased`).
  skip: int = struct.field(pytree_node=False, default=0)

  @classmethod
  def create(
    cls,
    schedule: str,
    num_timesteps: int,
    *,
    parameterization: str = "eps",
    learn_sigma: bool | None = None,
    loss: str = "simple",
    vlb_weight: float = 0.001,
    min_snr_gamma: float = 0.0,
    fixed_variance: str = "small",
    skip: int = 0,
  ) -> GaussianDiffusion:
    """Builds the tables for a named schedule.

    Args:
      schedule: "linear" | "cosine" (see ``schedules.get_betas``).
      num_timesteps: T >= 1.
      parameterization: what the network predicts: "eps" | "x0" | "v".
      learn_sigma: the network also outputs C channels of variance interpolation values in
        [-1, 1] (output has 2C channels). None means ``loss == "hybrid"``, since the hybrid loss
        only makes sense with a learned variance.
      loss: "simple" (MSE on the parameterization's target) | "hybrid" (simple +
        vlb_weight * L_vlb, IDDPM).
      vlb_weight: lambda of the hybrid loss (IDDPM: 0.001).
      min_snr_gamma: > 0 enables min-SNR-gamma weighting of the MSE (Hang et al. 2023).
      fixed_variance: reverse variance when not learned: "small" (posterior variance
        beta-tilde) | "large" (beta, IDDPM's FIXED_LARGE).
      skip: build the chain of the last ``num_timesteps`` betas of a ``num_timesteps + skip``
        schedule (what ``rebased`` returns); 0 for an ordinary chain.

    Returns:
      A GaussianDiffusion.

    Raises:
      ValueError: an unknown option, or hybrid loss with learn_sigma=False.
    """
    if parameterization not in PARAMETERIZATIONS:
      raise ValueError(
        f"unknown parameterization {parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}"
      )
    if loss not in LOSSES:
      raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
    if fixed_variance not in FIXED_VARIANCES:
      raise ValueError(
        f"unknown fixed_variance {fixed_variance!r}; allowed: {', '.join(FIXED_VARIANCES)}"
      )
    if learn_sigma is None:
      learn_sigma = loss == "hybrid"
    if loss == "hybrid" and not learn_sigma:
      raise ValueError("loss='hybrid' needs learn_sigma=True (L_vlb trains the learned variance)")
    if vlb_weight < 0 or min_snr_gamma < 0:
      raise ValueError(
        f"vlb_weight and min_snr_gamma must be >= 0, got {vlb_weight!r}, {min_snr_gamma!r}"
      )

    if skip < 0:
      raise ValueError(f"skip must be >= 0, got {skip}")
    betas = schedules.get_betas(schedule, num_timesteps + skip)[skip:]
    ac = schedules.alphas_cumprod(betas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # post_var[0] == 0 (x_0 is determined); IDDPM substitutes post_var[1] to keep the log finite.
    # With T == 1 there is no post_var[1], so fall back to beta_0.
    first = post_var[1] if num_timesteps > 1 else betas[0]
    post_log_var = np.log(np.concatenate([[first], post_var[1:]]))
    large_log_var = np.log(np.concatenate([[first], betas[1:]]))
    levels = schedules.alpha_bar_levels(betas)
    return cls(
      betas=_f32(betas),
      log_betas=_f32(np.log(betas)),
      alphas_cumprod=_f32(ac),
      alphas_cumprod_prev=_f32(ac_prev),
      sqrt_alphas_cumprod=_f32(np.sqrt(ac)),
      sqrt_one_minus_alphas_cumprod=_f32(np.sqrt(1.0 - ac)),
      sqrt_recip_alphas_cumprod=_f32(np.sqrt(1.0 / ac)),
      sqrt_recipm1_alphas_cumprod=_f32(np.sqrt(1.0 / ac - 1.0)),
      posterior_variance=_f32(post_var),
      posterior_log_variance_clipped=_f32(post_log_var),
      posterior_mean_coef1=_f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
      posterior_mean_coef2=_f32((1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)),
      fixed_large_log_variance=_f32(large_log_var),
      snr_table=_f32(schedules.snr(ac)),
      log_snr_table=_f32(schedules.log_snr(ac)),
      alpha_bar_levels=_f32(levels),
      log_alpha_bar_levels=_f32(np.log(levels)),
      schedule=schedule,
      num_timesteps=int(num_timesteps),
      parameterization=parameterization,
      learn_sigma=bool(learn_sigma),
      loss=loss,
      vlb_weight=float(vlb_weight),
      min_snr_gamma=float(min_snr_gamma),
      fixed_variance=fixed_variance,
      skip=int(skip),
    )

  def rebased(self, level: int) -> GaussianDiffusion:
    """The chain whose data is this chain's level-``level`` latent: levels ``level..T`` as ``0..T-level``.

    Its alpha-bar at level j is ``abar(level + j) / abar(level)`` (same betas), so noising a
    level-``level`` latent with it gives exactly this chain's marginal at ``level + j``; its model
    timestep t' corresponds to this chain's ``t' + level``. Used where a latent, not data, is what
    a network has to reconstruct (CollaFuse's server, which only ever sees cut images).
    """
    if not 0 <= level < self.num_timesteps:
      raise ValueError(f"rebased: level must be in [0, {self.num_timesteps}), got {level}")
    return GaussianDiffusion.create(
      self.schedule,
      self.num_timesteps - level,
      parameterization=self.parameterization,
      learn_sigma=self.learn_sigma,
      loss=self.loss,
      vlb_weight=self.vlb_weight,
      min_snr_gamma=self.min_snr_gamma,
      fixed_variance=self.fixed_variance,
      skip=self.skip + level,
    )

  # ---------------------------------------------------------------------------------------------
  # Host-side (float64) views, recomputed from the static config so they work under jit too.

  def np_alpha_bar_levels(self) -> np.ndarray:
    """abar by level, [T + 1] float64 numpy (host side; for building per-step tables)."""
    betas = schedules.get_betas(self.schedule, self.num_timesteps + self.skip)[self.skip :]
    return schedules.alpha_bar_levels(betas)

  def output_channels(self, channels: int) -> int:
    """Channels the denoiser must output for data with ``channels`` channels (2C if learn_sigma)."""
    return 2 * channels if self.learn_sigma else channels

  # ---------------------------------------------------------------------------------------------
  # Forward process.

  @staticmethod
  def _take(table: jax.Array, idx: jax.Array, x: jax.Array) -> jax.Array:
    """table[idx] for idx [B], reshaped to [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return table[idx].reshape((idx.shape[0],) + (1,) * (x.ndim - 1))

  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x at level t + 1 given clean data: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    Args:
      x0: [B, H, W, C] float32.
      t: [B] int32 0-based timesteps.
      noise: [B, H, W, C] float32 standard normal.

    Returns:
      x_t: [B, H, W, C] float32.
    """
    _check_batch(x0, t)
    chex.assert_equal_shape([x0, noise])
    return (
      self._take(self.sqrt_alphas_cumprod, t, x0) * x0
      + self._take(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )

  def q_posterior_mean_variance(
    self, x0: jax.Array, x_t: jax.Array, t: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Moments of q(x_{level t} | x_{level t+1}, x0), the one-step posterior.

    Args:
      x0: [B, H, W, C] float32.
      x_t: [B, H, W, C] float32 latent at level t + 1.
      t: [B] int32 0-based timesteps.

    Returns:
      (mean, variance, log_variance_clipped), each [B, H, W, C] float32. The log variance at t = 0
      is IDDPM's clipped value log(posterior_variance[1]) since the true variance is 0.
    """
    _check_batch(x_t, t)
    chex.assert_equal_shape([x0, x_t])
    mean = (
      self._take(self.posterior_mean_coef1, t, x_t) * x0
      + self._take(self.posterior_mean_coef2, t, x_t) * x_t
    )
    var = jnp.broadcast_to(self._take(self.posterior_variance, t, x_t), x_t.shape)
    log_var = jnp.broadcast_to(self._take(self.posterior_log_variance_clipped, t, x_t), x_t.shape)
    return mean, var, log_var

  # ---------------------------------------------------------------------------------------------
  # Parameterization conversions (all at the noise level of timestep t, i.e. level t + 1).

  def eps_from_x0(self, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). Arrays [B, H, W, C] f32, t [B] int32."""
    _check_batch(x_t, t)
    return (x_t - self._take(self.sqrt_alphas_cumprod, t, x_t) * x0) / self._take(
      self.sqrt_one_minus_alphas_cumprod, t, x_t
    )

  def x0_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps. Arrays [B, H, W, C] f32, t [B] int32."""
    _check_batch(x_t, t)
    return (
      self._take(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
      - self._take(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )

  def v_from_eps_x0(self, eps: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0. Arrays [B, H, W, C] f32, t [B] int32."""
    _check_batch(x0, t)
    return (
      self._take(self.sqrt_alphas_cumprod, t, x0) * eps
      - self._take(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )

  def x0_from_v(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v. Arrays [B, H, W, C] f32, t [B] int32."""
    _check_batch(x_t, t)
    return (
      self._take(self.sqrt_alphas_cumprod, t, x_t) * x_t
      - self._take(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
    )

  def eps_from_v(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v. Arrays [B, H, W, C] f32, t [B] int32."""
    _check_batch(x_t, t)
    return (
      self._take(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
      + self._take(self.sqrt_alphas_cumprod, t, x_t) * v
    )

  def split_output(self, out: jax.Array, x_t: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Splits a denoiser output into (prediction, variance values or None).

    Args:
      out: [B, H, W, C] (or [B, H, W, 2C] when learn_sigma) float32.
      x_t: [B, H, W, C] float32, for the expected shape.

    Returns:
      prediction [B, H, W, C] float32, and the variance interpolation values [B, H, W, C] float32
      in [-1, 1] when learn_sigma, else None.
    """
    c = x_t.shape[-1]
    chex.assert_shape(out, x_t.shape[:-1] + (self.output_channels(c),))
    if not self.learn_sigma:
      return out, None
    return out[..., :c], out[..., c:]

  def model_output_to_x0_eps(
    self, out: jax.Array, x_t: jax.Array, t: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Reads a denoiser output under this parameterization.

    Args:
      out: [B, H, W, C or 2C] float32 denoiser output at timestep t.
      x_t: [B, H, W, C] float32 latent at level t + 1.
      t: [B] int32 0-based timesteps.

    Returns:
      (x0_pred, eps_pred, var_values): [B, H, W, C] float32 each; var_values is None unless
      learn_sigma. Nothing is clipped here.
    """
    _check_batch(x_t, t)
    pred, var_values = self.split_output(out, x_t)
    if self.parameterization == "eps":
      eps = pred
      x0 = self.x0_from_eps(x_t, t, eps)
    elif self.parameterization == "x0":
      x0 = pred
      eps = self.eps_from_x0(x_t, t, x0)
    else:
      x0 = self.x0_from_v(x_t, t, pred)
      eps = self.eps_from_v(x_t, t, pred)
    return x0, eps, var_values

  # ---------------------------------------------------------------------------------------------
  # Reverse process (full chain; respaced steps live in sampling.py).

  def p_mean_variance(
    self,
    model_out: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    clip_denoised: bool = True,
    x0_clipping: str = "static",
    dynamic_threshold_percentile: float = 0.95,
  ) -> dict[str, jax.Array]:
    """p(x_{level t} | x_{level t+1}) from a denoiser output.

    With learn_sigma the log variance is frac * log(beta_t) + (1 - frac) * log(beta-tilde_t,
    clipped), frac = (v + 1) / 2 (IDDPM's LEARNED_RANGE); otherwise the fixed variance chosen at
    creation.

    Args:
      model_out: [B, H, W, C or 2C] float32.
      x_t: [B, H, W, C] float32 latent at level t + 1.
      t: [B] int32 0-based timesteps.
      clip_denoised: bound the predicted x0 (``clip_x0``) before forming the mean.
      x0_clipping: how, one of ``X0_CLIPPINGS`` ("static": clip to [-1, 1]).
      dynamic_threshold_percentile: the quantile "dynamic" thresholds at.

    Returns:
      dict with "mean", "variance", "log_variance", "pred_x0" (clipped if asked), "pred_eps"
      (consistent with pred_x0), each [B, H, W, C] float32.
    """
    x0, eps, var_values = self.model_output_to_x0_eps(model_out, x_t, t)
    if clip_denoised:
      x0 = clip_x0(x0, x0_clipping, dynamic_threshold_percentile)
      eps = self.eps_from_x0(x_t, t, x0)
    mean, _, post_log_var = self.q_posterior_mean_variance(x0, x_t, t)
    if self.learn_sigma:
      frac = (var_values + 1.0) / 2.0
      log_var = frac * self._take(self.log_betas, t, x_t) + (1.0 - frac) * post_log_var
    elif self.fixed_variance == "small":
      log_var = post_log_var
    else:
      log_var = jnp.broadcast_to(self._take(self.fixed_large_log_variance, t, x_t), x_t.shape)
    return {
      "mean": mean,
      "variance": jnp.exp(log_var),
      "log_variance": log_var,
      "pred_x0": x0,
      "pred_eps": eps,
    }

  # ---------------------------------------------------------------------------------------------
  # SNR and losses.

  def snr(self, t: jax.Array) -> jax.Array:
    """abar_t / (1 - abar_t). t: [B] int32 -> [B] float32."""
    chex.assert_rank(t, 1)
    return self.snr_table[t]

  def log_snr(self, t: jax.Array) -> jax.Array:
    """log(abar_t / (1 - abar_t)). t: [B] int32 -> [B] float32."""
    chex.assert_rank(t, 1)
    return self.log_snr_table[t]

  def loss_weight(self, t: jax.Array) -> jax.Array:
    """Per-example MSE weight: min-SNR-gamma (Hang et al. 2023) or ones when gamma == 0.

    The weight makes every parameterization equivalent to an x0-MSE weighted by min(SNR, gamma):
    eps-pred min(SNR, gamma) / SNR, x0-pred min(SNR, gamma), v-pred min(SNR, gamma) / (SNR + 1).

    Args:
      t: [B] int32 0-based timesteps.

    Returns:
      [B] float32.
    """
    chex.assert_rank(t, 1)
    if self.min_snr_gamma <= 0:
      return jnp.ones(t.shape, jnp.float32)
    s = self.snr(t)
    clipped = jnp.minimum(s, self.min_snr_gamma)
    if self.parameterization == "eps":
      return clipped / s
    if self.parameterization == "x0":
      return clipped
    return clipped / (s + 1.0)

  def vlb_terms_bpd(
    self, model_out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array
  ) -> jax.Array:
    """One term L_t of the variational bound in bits per dimension.

    KL(q(x_{level t} | x_{level t+1}, x0) || p(...)) for t > 0, the discretized-Gaussian decoder
    NLL of x0 at t == 0. The predicted x0 is not clipped (as in IDDPM's loss).

    Args:
      model_out: [B, H, W, C or 2C] float32.
      x0: [B, H, W, C] float32 in [-1, 1].
      x_t: [B, H, W, C] float32 latent at level t + 1.
      t: [B] int32 0-based timesteps.

    Returns:
      [B] float32.
    """
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
    p = self.p_mean_variance(model_out, x_t, t, clip_denoised=False)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(
      2.0
    )
    nll = -_mean_flat(
      discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
    ) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)

  def training_losses(
    self,
    apply_fn: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
    x0: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    y: jax.Array | None = None,
  ) -> dict[str, jax.Array]:
    """Per-example training losses.

    loss = w(t) * mse + [hybrid] vlb_weight * T * vlb, where w is ``loss_weight``. L_vlb is the sum
    of T terms, estimated from one uniformly drawn term as T * L_t, so vlb_weight is the paper's
    lambda; with vlb_weight = 0.001 this is exactly improved-diffusion's default RESCALED_MSE
    (mse + vb * T / 1000). The vlb term sees the mean prediction through a stop_gradient, so it
    only trains the variance (IDDPM).

    Args:
      apply_fn: (x_t [B, H, W, C] float32, t [B] int32, y [B] int32 | None) -> [B, H, W, C or 2C].
      x0: [B, H, W, C] float32 in [-1, 1].
      t: [B] int32 0-based timesteps.
      noise: [B, H, W, C] float32 standard normal.
      y: [B] int32 labels or None.

    Returns:
      dict of [B] float32: "loss", "mse" (unweighted, on the parameterization's target), and for
      the hybrid loss "vlb" (the unscaled L_t in bits/dim).
    """
    _check_batch(x0, t)
    chex.assert_equal_shape([x0, noise])
    x_t = self.q_sample(x0, t, noise)
    out = apply_fn(x_t, t, y)
    pred, var_values = self.split_output(out, x_t)
    if self.parameterization == "eps":
      target = noise
    elif self.parameterization == "x0":
      target = x0
    else:
      target = self.v_from_eps_x0(noise, x0, t)
    mse = _mean_flat(jnp.square(target - pred))
    terms = {"mse": mse, "loss": self.loss_weight(t) * mse}
    if self.loss == "hybrid":
      frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
      vlb = self.vlb_terms_bpd(frozen, x0, x_t, t)
      terms["vlb"] = vlb
      terms["loss"] = terms["loss"] + self.vlb_weight * self.num_timesteps * vlb
    return terms

  def sample_timesteps(
    self, rng: jax.Array, batch: int, t_min: int = 0, t_max: int | None = None
  ) -> jax.Array:
    """Uniform 0-based timesteps in [t_min, t_max) (default the whole chain [0, T)).

    Args:
      rng: PRNG key.
      batch: B.
      t_min: inclusive lower bound.
      t_max: exclusive upper bound, <= T; None means T.

    Returns:
      [B] int32.
    """
    hi = self.num_timesteps if t_max is None else t_max
    if isinstance(hi, int) and isinstance(t_min, int) and not 0 <= t_min < hi <= self.num_timesteps:
      raise ValueError(f"need 0 <= t_min < t_max <= {self.num_timesteps}, got {t_min}, {hi}")
    return jax.random.randint(rng, (batch,), t_min, hi, dtype=jnp.int32)
