"""Denoiser networks and the name -> constructor registry used by ``config.model.name``."""

from common.models.registry import (
  InitRngs,
  build_model,
  count_params,
  register,
  registered_models,
)
from common.models.unet import UNet

__all__ = ["InitRngs", "UNet", "build_model", "count_params", "register", "registered_models"]
