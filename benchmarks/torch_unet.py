"""The repo's U-Net (``common/models/unet.py``) in PyTorch, for ``benchmarks/vs_pytorch.py``.

Block for block the ADM / IDDPM network that ``config.model.name = "unet"`` builds, in NCHW:
same widths, res blocks, attention resolutions, GroupNorm groups and epsilon, scale-shift
conditioning, BigGAN up/down blocks or conv resampling, zero-initialised output layers, class
embedding with a null row. Modules carry the Flax model's names (``input_blocks.3.layers.0.conv1``),
so ``load_jax_params`` copies a JAX parameter tree in by name, and the parameter count is the
JAX model's exactly (checked in ``tests/common/test_vs_pytorch.py`` together with the outputs).

The DDPM method around it (loss, train step, sampler) is ``benchmarks/torch_ddpm.py``.

PyTorch is an optional extra (``pip install -e ".[bench]"``): nothing outside ``benchmarks/``
imports this module.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.models import registry, unet_args

_GN_EPS = 1e-5  # IDDPM's GroupNorm32, as common/models/unet.py


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """``common.models.unet.timestep_embedding``: t [B] -> [B, dim] float32 ``[cos, sin]``."""
  half = dim // 2
  freqs = torch.exp(
    -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
  )
  args = t.to(torch.float32)[:, None] * freqs[None, :]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = F.pad(emb, (0, 1))
  return emb


def _group_norm(width: int, group_size: int) -> nn.GroupNorm:
  groups = width // group_size if group_size > 0 else math.gcd(32, width)
  return nn.GroupNorm(groups, width, eps=_GN_EPS)


def _conv(i: int, o: int, k: int, *, stride: int = 1, zero: bool = False) -> nn.Conv2d:
  # PyTorch's default init is the JAX model's _torch_kernel_init; biases start at zero there.
  conv = nn.Conv2d(i, o, k, stride=stride, padding=k // 2)
  nn.init.zeros_(conv.bias)
  if zero:
    nn.init.zeros_(conv.weight)
  return conv


def _linear(i: int, o: int, *, zero: bool = False) -> nn.Linear:
  lin = nn.Linear(i, o)
  nn.init.zeros_(lin.bias)
  if zero:
    nn.init.zeros_(lin.weight)
  return lin


def _up(x: torch.Tensor) -> torch.Tensor:
  return F.interpolate(x, scale_factor=2, mode="nearest")


class Downsample(nn.Module):
  """Stride-2 3x3 conv: [B, C, H, W] -> [B, C, H/2, W/2]."""

  def __init__(self, width: int):
    super().__init__()
    self.conv = _conv(width, width, 3, stride=2)

  def forward(self, x):
    return self.conv(x)


class Upsample(nn.Module):
  """Nearest 2x then a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

  def __init__(self, width: int):
    super().__init__()
    self.conv = _conv(width, width, 3)

  def forward(self, x):
    return self.conv(_up(x))


class ResBlock(nn.Module):
  """GroupNorm -> SiLU -> [resample] -> conv3x3 -> scale-shift (or add) -> SiLU -> dropout ->
  zero conv3x3, plus the skip (identity or 1x1 conv). x [B, Cin, H, W], emb [B, E]."""

  def __init__(
    self, in_w, out_w, emb_dim, *, dropout, use_scale_shift_norm, resample, group_size, skip_conv
  ):
    super().__init__()
    self.use_scale_shift_norm = use_scale_shift_norm
    self.resample = resample
    self.norm1 = _group_norm(in_w, group_size)
    self.conv1 = _conv(in_w, out_w, 3)
    self.emb_proj = _linear(emb_dim, 2 * out_w if use_scale_shift_norm else out_w)
    self.norm2 = _group_norm(out_w, group_size)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = _conv(out_w, out_w, 3, zero=True)
    if skip_conv is None:
      skip_conv = in_w != out_w
    self.skip = _conv(in_w, out_w, 1) if skip_conv else None

  def forward(self, x, emb):
    h = F.silu(self.norm1(x))
    if self.resample == "up":
      h, x = _up(h), _up(x)
    elif self.resample == "down":
      h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = self.conv1(h)
    emb_out = self.emb_proj(F.silu(emb))[:, :, None, None]
    if self.use_scale_shift_norm:
      scale, shift = emb_out.chunk(2, dim=1)
      h = self.norm2(h) * (1.0 + scale) + shift
    else:
      h = self.norm2(h + emb_out)
    h = self.conv2(self.dropout(F.silu(h)))
    if self.skip is not None:
      x = self.skip(x)
    return x + h


class AttentionBlock(nn.Module):
  """GroupNorm -> qkv -> softmax(q k^T / sqrt(d)) v per head -> zero proj, residual.

  Tokens are the H*W positions in row-major order, as the JAX block's NHWC reshape.
  """

  def __init__(self, width: int, num_heads: int, group_size: int):
    super().__init__()
    self.num_heads = num_heads
    self.norm = _group_norm(width, group_size)
    self.qkv = _linear(width, 3 * width)
    self.proj = _linear(width, width, zero=True)

  def forward(self, x):
    b, c, hgt, wid = x.shape
    n, d = self.num_heads, c // self.num_heads
    h = self.norm(x).reshape(b, c, hgt * wid).transpose(1, 2)  # [B, L, C]
    q, k, v = self.qkv(h).chunk(3, dim=-1)
    q, k, v = (a.reshape(b, hgt * wid, n, d).transpose(1, 2) for a in (q, k, v))
    # The JAX block scales q and k by d**-0.25 each: the same logits as SDPA's 1/sqrt(d).
    out = F.scaled_dot_product_attention(q, k, v)  # [B, n, L, d]
    out = self.proj(out.transpose(1, 2).reshape(b, hgt * wid, c))
    return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


class EmbedSequential(nn.Module):
  """The JAX ``_EmbedSequential``: layers in order, the embedding to the ResBlocks only."""

  def __init__(self, layers):
    super().__init__()
    self.layers = nn.ModuleList(layers)

  def forward(self, h, emb):
    for layer in self.layers:
      h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h


class UNet(nn.Module):
  """``common.models.unet.UNet`` in PyTorch (same arguments, NCHW; float32).

  ``forward(x [B, C, H, W], t [B], y [B] | None) -> [B, out_channels, H, W]``.
  """

  def __init__(
    self,
    *,
    image_size,
    in_channels,
    out_channels,
    channels,
    num_res_blocks,
    attention_resolutions,
    num_heads=4,
    num_head_channels=-1,
    dropout=0.0,
    num_classes=0,
    use_scale_shift_norm=True,
    resblock_updown=True,
    norm_group_size=0,
    time_embed_channels=0,
    base_channels=None,
  ):
    super().__init__()
    # The JAX model's own argument checks, so both reject (and accept) the same configs.
    channels, nrb, attn = unet_args.checked_levels(
      image_size, channels, num_res_blocks, attention_resolutions
    )
    base = unet_args.checked_options(
      channels,
      dropout=dropout,
      num_classes=num_classes,
      norm_group_size=norm_group_size,
      time_embed_channels=time_embed_channels,
      base_channels=base_channels,
    )
    self.image_size = image_size
    self.num_classes = num_classes
    self.time_embed_channels = time_embed_channels or channels[0]
    emb_dim = 4 * self.time_embed_channels
    gs = norm_group_size

    def heads(width):
      return width // num_head_channels if num_head_channels > 0 else num_heads

    def res(i, o, resample=None, skip_conv=None):
      return ResBlock(
        i,
        o,
        emb_dim,
        dropout=dropout,
        use_scale_shift_norm=use_scale_shift_norm,
        resample=resample,
        group_size=gs,
        skip_conv=skip_conv,
      )

    def down(w):
      return res(w, w, "down") if resblock_updown else Downsample(w)

    def up(w):
      return res(w, w, "up") if resblock_updown else Upsample(w)

    self.time_mlp1 = _linear(self.time_embed_channels, emb_dim)
    self.time_mlp2 = _linear(emb_dim, emb_dim)
    self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    # Encoder (common.models.unet.UNet._build_down).
    blocks = [EmbedSequential([_conv(in_channels, channels[0], 3)])]
    skips, ch = [channels[0]], channels[0]
    for level, width in enumerate(channels):
      px = image_size // 2**level
      for b in range(nrb[level]):
        entry = level > 0 and b == 0 and base[level - 1] != base[level]
        block = [res(ch, width, skip_conv=True if entry else None)]
        ch = width
        if px in attn:
          block.append(AttentionBlock(ch, heads(ch), gs))
        blocks.append(EmbedSequential(block))
        skips.append(ch)
      if level != len(channels) - 1:
        blocks.append(EmbedSequential([down(ch)]))
        skips.append(ch)
    self.input_blocks = nn.ModuleList(blocks)
    self.middle_block = EmbedSequential(
      [res(ch, ch), AttentionBlock(ch, heads(ch), gs), res(ch, ch)]
    )
    # Decoder (_build_up).
    blocks = []
    for level in reversed(range(len(channels))):
      width, px = channels[level], image_size // 2**level
      for i in range(nrb[level] + 1):
        block = [res(ch + skips.pop(), width)]
        ch = width
        if px in attn:
          block.append(AttentionBlock(ch, heads(ch), gs))
        if level and i == nrb[level]:
          block.append(up(ch))
        blocks.append(EmbedSequential(block))
    self.output_blocks = nn.ModuleList(blocks)
    self.out_norm = _group_norm(channels[0], gs)
    self.out_conv = _conv(channels[0], out_channels, 3, zero=True)

  def forward(self, x, t, y=None):
    emb = self.time_mlp2(F.silu(self.time_mlp1(timestep_embedding(t, self.time_embed_channels))))
    if self.label_emb is not None:
      if y is None:
        y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
      emb = emb + self.label_emb(y.long())
    h, skips = x, []
    for block in self.input_blocks:
      h = block(h, emb)
      skips.append(h)
    h = self.middle_block(h, emb)
    for block in self.output_blocks:
      h = block(torch.cat([h, skips.pop()], dim=1), emb)
    return self.out_conv(F.silu(self.out_norm(h)))


def unet_from_config(config, *, in_channels: int, num_classes: int) -> UNet:
  """The network ``common.models.build_model`` makes for ``config`` (its "unet" builder)."""
  m = config.model
  if m.name != "unet":
    raise ValueError(f"torch_unet: config.model.name must be 'unet', got {m.name!r}")
  return UNet(**registry.unet_arguments(config, in_channels=in_channels, num_classes=num_classes))


def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


# --- JAX -> PyTorch weights -------------------------------------------------------------------


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (str(k),))
  else:
    yield prefix, tree


def load_jax_params(module: nn.Module, params) -> None:
  """Copies a JAX parameter tree (``nnx.to_pure_dict`` of the same architecture) into ``module``.

  Names map one to one (``kernel`` -> ``weight``, GroupNorm ``scale`` -> ``weight``, ``embedding``
  -> ``weight``); conv kernels go HWIO -> OIHW, linear kernels [in, out] -> [out, in]. Raises
  KeyError / ValueError on any name or shape that does not match, and when a torch parameter is
  left unset, so a successful copy proves the two trees hold the same tensors.
  """
  targets = dict(module.named_parameters())
  seen = set()
  for path, value in _flatten(params):
    *where, leaf = path
    a = np.asarray(value, np.float32)
    name = ".".join(where + ["bias" if leaf == "bias" else "weight"])
    if name not in targets:
      raise KeyError(f"load_jax_params: no torch parameter {name} for JAX {'/'.join(path)}")
    if leaf == "kernel" and a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)
    elif leaf == "kernel" and a.ndim == 2:
      a = a.T
    elif leaf not in ("kernel", "bias", "scale", "embedding"):
      raise KeyError(f"load_jax_params: unknown JAX leaf {'/'.join(path)}")
    p = targets[name]
    if tuple(p.shape) != a.shape:
      raise ValueError(f"load_jax_params: {name} is {tuple(p.shape)}, JAX gives {a.shape}")
    with torch.no_grad():
      p.copy_(torch.from_numpy(np.array(a, np.float32, copy=True)))
    seen.add(name)
  missing = sorted(set(targets) - seen)
  if missing:
    raise ValueError(f"load_jax_params: torch parameters without a JAX value: {missing}")
