"""P2 weighting (Choi et al. 2022, "Perception Prioritized Training of Diffusion Models") over the
DDPM baseline: the example of a method plugged in through the core's hooks.

The whole difference from ``DDPM`` is the weight of each timestep's MSE: lambda_t =
1 / (k + SNR(t))^gamma on the eps-MSE. gamma = 0 is the baseline's L_simple; gamma = 1 moves the
weight from the nearly clean steps (imperceptible detail) to the coarse and content steps. It goes
in through ``GaussianDiffusion.loss_weight`` (the hook min-SNR-gamma uses), so the baseline's loss,
sampling, FLOPs and evaluation hooks all run unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import struct

from common.diffusion import GaussianDiffusion
from common.train.method import DDPM
from common.train.validate import ConfigError


@struct.dataclass
class P2Diffusion(GaussianDiffusion):
  """The core's diffusion with P2 loss weights; every other table and formula is inherited."""

  p2_gamma: float = struct.field(pytree_node=False, default=1.0)
  p2_k: float = struct.field(pytree_node=False, default=1.0)

  def loss_weight(self, t: jax.Array) -> jax.Array:
    """lambda_t, written for the parameterization's own MSE. t: [B] int32 -> [B] float32.

    eps-MSE = SNR x0-MSE = SNR / (SNR + 1) v-MSE, so the same lambda_t on the eps-MSE is
    lambda_t SNR on the x0-MSE and lambda_t SNR / (SNR + 1) on the v-MSE.
    """
    snr = self.snr(t)
    lam = (self.p2_k + snr) ** -self.p2_gamma
    if self.parameterization == "eps":
      return lam
    if self.parameterization == "x0":
      return lam * snr
    return lam * snr / (snr + 1.0)


class P2DDPM(DDPM):
  """DDPM whose diffusion weights the MSE by P2 (``config.p2.{gamma,k}``)."""

  name = "p2_ddpm"

  def __init__(self, config, data_info):
    super().__init__(config, data_info)
    p2 = config.p2
    if not p2.gamma >= 0:
      raise ConfigError("p2.gamma", p2.gamma, "must be >= 0 (0: the DDPM baseline's weights)")
    if not p2.k > 0:
      raise ConfigError("p2.k", p2.k, "must be > 0")
    if config.diffusion.min_snr_gamma:
      raise ConfigError(
        "diffusion.min_snr_gamma", config.diffusion.min_snr_gamma, "must be 0: P2 replaces it"
      )
    fields = {f.name: getattr(self.diffusion, f.name) for f in dataclasses.fields(self.diffusion)}
    self.diffusion = P2Diffusion(**fields, p2_gamma=float(p2.gamma), p2_k=float(p2.k))


METHOD = P2DDPM
