"""Shared diffusion core. Imports no method package, ever."""

from common.diffusion.gaussian import X0_CLIPPINGS, GaussianDiffusion, clip_x0
from common.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from common.diffusion.sampling import (
  TIMESTEP_SPACINGS,
  Segment,
  initial_noise,
  make_levels,
  make_segment_sampler,
  sample,
  sample_segment,
  sample_segmented,
  space_timesteps,
  step_coefficients,
)
from common.diffusion.schedules import alpha_bar_levels, alphas_cumprod, get_betas, log_snr, snr

__all__ = [
  "TIMESTEP_SPACINGS",
  "X0_CLIPPINGS",
  "GaussianDiffusion",
  "Segment",
  "alpha_bar_levels",
  "alphas_cumprod",
  "clip_x0",
  "discretized_gaussian_log_likelihood",
  "get_betas",
  "initial_noise",
  "log_snr",
  "make_levels",
  "make_segment_sampler",
  "normal_kl",
  "sample",
  "sample_segment",
  "sample_segmented",
  "snr",
  "space_timesteps",
  "step_coefficients",
]
