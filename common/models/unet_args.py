"""The argument checks of ``common.models.unet.UNet``: each bad argument is a ``ValueError``
naming it, raised before any layer is built."""

from __future__ import annotations

from collections.abc import Sequence


def checked_levels(
  image_size: int,
  channels: Sequence[int],
  num_res_blocks: int | Sequence[int],
  attention_resolutions: Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """Checks ``UNet``'s per-level structure (ValueError naming the argument).

  Returns:
    ``(channels, num_res_blocks, attention_resolutions)`` as int tuples, ``num_res_blocks`` one
    per level.
  """
  channels = tuple(int(c) for c in channels)
  num_levels = len(channels)
  if num_levels == 0 or any(c < 1 for c in channels):
    raise ValueError(f"UNet: channels must be a non-empty list of positive widths, got {channels}")
  if isinstance(num_res_blocks, int):
    num_res_blocks = (num_res_blocks,) * num_levels
  num_res_blocks = tuple(int(n) for n in num_res_blocks)
  if len(num_res_blocks) != num_levels or any(n < 1 for n in num_res_blocks):
    raise ValueError(
      f"UNet: num_res_blocks must be an int >= 1 or one int >= 1 per level "
      f"({num_levels} levels), got {num_res_blocks}"
    )
  factor = 2 ** (num_levels - 1)
  if image_size < 1 or image_size % factor:
    raise ValueError(
      f"UNet: image_size {image_size} is not divisible by 2**(len(channels)-1) = {factor}"
    )
  resolutions = [image_size // 2**i for i in range(num_levels)]
  attention_resolutions = tuple(int(r) for r in attention_resolutions)
  bad = [r for r in attention_resolutions if r not in resolutions]
  if bad:
    raise ValueError(
      f"UNet: attention resolutions {bad} are not among the model's resolutions {resolutions} "
      f"(image_size {image_size}, {num_levels} levels)"
    )
  return channels, num_res_blocks, attention_resolutions


def checked_options(
  channels: tuple[int, ...],
  *,
  dropout: float,
  num_classes: int,
  norm_group_size: int,
  time_embed_channels: int,
  base_channels: Sequence[int] | None,
) -> tuple[int, ...]:
  """Checks ``UNet``'s other arguments against the checked ``channels`` (ValueError naming the
  argument); returns ``base_channels`` as an int tuple, ``channels`` when not given."""
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
  if num_classes < 0:
    raise ValueError(f"UNet: num_classes must be >= 0, got {num_classes}")
  if norm_group_size < 0:
    raise ValueError(f"UNet: norm_group_size must be >= 0, got {norm_group_size}")
  if norm_group_size > 0:
    bad = [c for c in channels if c % norm_group_size]
    if bad:
      raise ValueError(
        f"UNet: widths {bad} of channels {channels} are not divisible by "
        f"norm_group_size {norm_group_size}"
      )
  if time_embed_channels < 0:
    raise ValueError(f"UNet: time_embed_channels must be >= 0, got {time_embed_channels}")
  base_channels = channels if base_channels is None else tuple(int(c) for c in base_channels)
  if len(base_channels) != len(channels):
    raise ValueError(
      f"UNet: base_channels {base_channels} must have one width per level ({len(channels)})"
    )
  return base_channels
