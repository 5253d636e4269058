"""The mobile method: DDPM training and DDIM sampling with the TFDiff network plugged in.

The paper changes the *network*, not the diffusion process, so the method is the DDPM baseline
with two hooks changed:

* start-up validation of the network's fields, one line naming the field (``validate``);
* (the spec's cosine learning-rate decay is common's ``optimizer.schedule = "cosine"``);
* FLOPs per sample are counted on the unrolled stack, because XLA's cost analysis counts the body
  of the scan over the N blocks once.

The tokenized baseline, U-ViT (``config.model.name = "uvit"``, ``mobile.uvit``), trains through the
same method: only its start-up validation is added here, every other hook is DDPM's.
"""

from __future__ import annotations

import copy

import ml_collections

from common.train.method import DDPM
from common.train.validate import ConfigError
from mobile import model as model_lib  # registers the tfdiff network
from mobile import spec as spec_lib
from mobile import uvit as uvit_lib  # registers the uvit baseline network


def validate(config: ml_collections.ConfigDict, data_info) -> None:
  """The mobile config's own fields; raises ``ConfigError`` naming the field."""
  m = config.model
  if m.name == "uvit":
    _validate_uvit(config, data_info)
  if m.name != "tfdiff":
    return  # another registered network (e.g. the U-Net baseline): the common checks suffice
  if m.layer_loop not in model_lib.LAYER_LOOPS:
    raise ConfigError("model.layer_loop", m.layer_loop, "allowed: scan, unroll")
  if m.dropout != 0.0:
    raise ConfigError("model.dropout", m.dropout, "TFDiff has no dropout: must be 0.0")
  try:
    spec = spec_lib.spec_from_config(
      config, in_channels=data_info.channels, num_classes=data_info.num_classes
    )
    spec.validate()
  except spec_lib.SpecError as e:
    raise ConfigError(e.field, e.value, e.why) from None


def _validate_uvit(config: ml_collections.ConfigDict, data_info) -> None:
  if config.model.dropout != 0.0:
    raise ConfigError("model.dropout", config.model.dropout, "U-ViT has no dropout: must be 0.0")
  try:
    uvit_lib.spec_from_config(
      config, in_channels=data_info.channels, num_classes=data_info.num_classes
    ).validate()
  except spec_lib.SpecError as e:
    raise ConfigError(e.field, e.value, e.why) from None


class Mobile(DDPM):
  """DDPM over the tokenization-free network (``config.model.name = "tfdiff"``), or over the
  U-ViT baseline (``"uvit"``, ``mobile.uvit``) with the DDPM hooks unchanged."""

  name = "mobile"

  def __init__(self, config: ml_collections.ConfigDict, data_info):
    validate(config, data_info)
    super().__init__(config, data_info)
    self.layer_loop = None  # scan | unroll for every call; None: the network's own

  def apply(self, params, x, t, y=None, dropout_rng=None, layer_loop=None):
    """``x`` [B, H, W, C], ``t`` [B] int32 -> [B, H, W, C_out]; any H, W divisible by the stride."""
    layer_loop = layer_loop or self.layer_loop
    if self.config.model.name != "tfdiff" or layer_loop is None:
      return super().apply(params, x, t, y, dropout_rng)
    from flax import nnx

    return nnx.merge(self.graphdef, params)(x, t, y, layer_loop=layer_loop)

  def make_flops_counting_step(self, tx, lr_schedule, ema_decay):
    """The train step over the N blocks unrolled, when the network scans over them."""
    if self.config.model.name != "tfdiff" or self.config.model.layer_loop == "unroll":
      return None
    unrolled = copy.copy(self)
    unrolled.layer_loop = "unroll"
    return unrolled.make_train_step(tx, lr_schedule, ema_decay)

  def denoiser_call_flops(self, params, num_steps: int) -> float:
    if self.config.model.name != "tfdiff":
      return super().denoiser_call_flops(params, num_steps)
    import jax
    import jax.numpy as jnp

    from common.metrics import flops as flops_lib

    res, ch = self.data_info.resolution, self.data_info.channels
    x = jax.ShapeDtypeStruct((1, res, res, ch), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if self.class_conditional else None
    # Unrolled: XLA's cost analysis counts a scan body once, which would hide N - 1 blocks.
    per_call = flops_lib.count_flops(
      lambda p, x, t, y: self.apply(p, x, t, y, layer_loop="unroll"), params, x, t, y
    )
    guided = self.class_conditional and self.config.diffusion.guidance_scale != 1.0
    return per_call * num_steps * (2 if guided else 1)

  def spec(self) -> spec_lib.TFDiffSpec:
    """The network's architecture (for ``mobile.formulas``)."""
    return spec_lib.spec_from_config(
      self.config, in_channels=self.data_info.channels, num_classes=self.data_info.num_classes
    )


METHOD = Mobile
