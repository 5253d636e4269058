"""ADM / IDDPM U-Net (Nichol & Dhariwal 2021) in Flax NNX, channels-last.

The architecture follows OpenAI's improved-diffusion ``UNetModel`` block for block so that
parameter counts match the paper, with two generalisations used by other packages:

* ``channels[i]`` is the explicit width of resolution level ``i`` (IDDPM derives it as
  ``model_channels * channel_mult[i]``), so a pruning method can shrink levels independently;
* ``num_res_blocks`` may differ per level.

``resblock_updown=True`` switches the resampling layers to the BigGAN-style residual blocks of
ADM (Dhariwal & Nichol 2021, guided-diffusion); IDDPM itself used ``resblock_updown=False``.

The module holds nothing but ``nnx.Param`` variables: dropout gets its key at call time, so a
trainer can ``nnx.split(model, nnx.Param)`` and run a pure jitted step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from common.models import conv as conv_lib
from common.models import unet_args
from common.models.norm_act import group_norm_act

# PyTorch's default Conv/Linear weight init (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); matching it keeps the activation scales IDDPM's
# hyper-parameters (lr 1e-4, no warm-up) were tuned for.
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_zeros = nnx.initializers.zeros_init()

# IDDPM's GroupNorm32 uses PyTorch's default epsilon.
_GN_EPS = 1e-5


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep features, IDDPM's ``timestep_embedding``.

  Args:
    t: [B] int or float timesteps (fractional values are allowed).
    dim: feature width.
    max_period: the longest wavelength.

  Returns:
    [B, dim] float32: ``[cos(t * f_0..f_{h-1}), sin(t * f_0..f_{h-1})]`` with
    ``f_i = max_period ** (-i / h)``, ``h = dim // 2``, zero-padded when ``dim`` is odd.
  """
  chex.assert_rank(t, 1)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_norm(width: int, param_dtype, rngs: nnx.Rngs, group_size: int = 0) -> nnx.GroupNorm:
  # gcd keeps IDDPM's 32 groups whenever possible but still works for pruned widths
  # that 32 does not divide. A fixed group size instead keeps the partition of the surviving
  # channels unchanged when whole groups are pruned away, so normalisation is inherited exactly.
  if group_size > 0:
    if width % group_size:
      raise ValueError(f"UNet: width {width} is not divisible by norm_group_size {group_size}")
    num_groups = width // group_size
  else:
    num_groups = math.gcd(32, width)
  return nnx.GroupNorm(
    width,
    num_groups=num_groups,
    epsilon=_GN_EPS,
    dtype=jnp.float32,  # statistics in float32 even under bf16 compute, as IDDPM's GroupNorm32
    param_dtype=param_dtype,
    rngs=rngs,
  )


def _conv(in_ch, out_ch, k, *, dtype, param_dtype, rngs, stride=1, zero=False) -> nnx.Conv:
  # Explicit symmetric padding (not 'SAME'): for a stride-2 conv 'SAME' pads only on the
  # high side, which would shift the sampling grid relative to IDDPM's padding=1.
  # On XLA:CPU through conv_lib: lax's convolution, with gradients that stay on XLA:CPU's fast
  # kernels when traced inside a loop body (its docstring).
  canonical = conv_lib.use_canonical_gradients()
  return nnx.Conv(
    in_ch,
    out_ch,
    kernel_size=(k, k),
    strides=(stride, stride),
    padding=k // 2,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_zeros if zero else _torch_kernel_init,
    rngs=rngs,
    conv_general_dilated=conv_lib.conv_general_dilated
    if canonical
    else jax.lax.conv_general_dilated,
  )


def _linear(in_f, out_f, *, dtype, param_dtype, rngs, zero=False) -> nnx.Linear:
  return nnx.Linear(
    in_f,
    out_f,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_zeros if zero else _torch_kernel_init,
    rngs=rngs,
  )


def _avg_pool2(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample_nearest2(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv (IDDPM ``Downsample`` with ``conv_resample=True``).

  ``x: [B, H, W, C]`` -> ``[B, H/2, W/2, C]`` in the compute dtype.
  """

  def __init__(self, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = _conv(width, width, 3, stride=2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest 2x upsampling then a 3x3 conv (IDDPM ``Upsample`` with ``conv_resample=True``).

  ``x: [B, H, W, C]`` -> ``[B, 2H, 2W, C]`` in the compute dtype.
  """

  def __init__(self, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = _conv(width, width, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(_upsample_nearest2(x))


class ResBlock(nnx.Module):
  """Residual block conditioned on the timestep (and class) embedding.

  GroupNorm -> SiLU -> [resample] -> conv3x3 -> (+ emb, or scale-shift norm) -> SiLU -> dropout
  -> zero-init conv3x3, plus a skip path (identity, or 1x1 conv when the width changes).
  """

  def __init__(
    self,
    in_width: int,
    out_width: int,
    emb_dim: int,
    *,
    dropout: float,
    use_scale_shift_norm: bool,
    resample: str | None,
    dropout_index: int,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    norm_group_size: int = 0,
    skip_conv: bool | None = None,
  ):
    if resample not in (None, "up", "down"):
      raise ValueError(f"ResBlock: resample must be None, 'up' or 'down', got {resample!r}")
    self.in_width = in_width
    self.out_width = out_width
    self.use_scale_shift_norm = use_scale_shift_norm
    self.resample = resample
    # Each block folds its own index into the call-time dropout key, so masks are independent
    # across blocks without the module having to carry RNG state.
    self.dropout_index = dropout_index
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _group_norm(in_width, param_dtype, rngs, norm_group_size)
    self.conv1 = _conv(in_width, out_width, 3, **kw)
    # The embedding projection runs in float32 (IDDPM keeps its Linear layers in fp32 under
    # fp16 training); it is a [B, D] matmul, so the cost is negligible.
    self.emb_proj = _linear(
      emb_dim,
      2 * out_width if use_scale_shift_norm else out_width,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.norm2 = _group_norm(out_width, param_dtype, rngs, norm_group_size)
    self.dropout = nnx.Dropout(dropout)
    self.conv2 = _conv(out_width, out_width, 3, zero=True, **kw)
    # ``skip_conv=True`` keeps a 1x1 conv even at equal widths: a network pruned from one whose
    # widths differed here must keep that learned projection to inherit its weights.
    if in_width != out_width and skip_conv is False:
      raise ValueError(f"ResBlock: widths {in_width} -> {out_width} need a skip conv")
    if skip_conv is None:
      skip_conv = in_width != out_width
    self.skip = _conv(in_width, out_width, 1, **kw) if skip_conv else None

  def __call__(
    self, x: jax.Array, emb: jax.Array, dropout_rng: jax.Array | None = None
  ) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, in_width] compute dtype.
      emb: [B, emb_dim] float32 conditioning embedding.
      dropout_rng: PRNG key; dropout is applied only when given.

    Returns:
      [B, H', W', out_width] compute dtype; H' = 2H for 'up', H/2 for 'down', else H.
    """
    chex.assert_shape(x, (None, None, None, self.in_width))
    h = group_norm_act(self.norm1, x).astype(self.dtype)
    if self.resample == "up":
      h, x = _upsample_nearest2(h), _upsample_nearest2(x)
    elif self.resample == "down":
      h, x = _avg_pool2(h), _avg_pool2(x)
    h = self.conv1(h)

    emb_out = self.emb_proj(nnx.silu(emb))[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = group_norm_act(self.norm2, h, scale, shift)
    else:
      h = group_norm_act(self.norm2, h + emb_out)
    h = h.astype(self.dtype)
    if dropout_rng is not None and self.dropout.rate > 0:
      key = jax.random.fold_in(dropout_rng, self.dropout_index)
      h = self.dropout(h, deterministic=False, rngs=key)
    h = self.conv2(h)

    if self.skip is not None:
      x = self.skip(x)
    return x + h


class AttentionBlock(nnx.Module):
  """Multi-head self-attention over the H*W positions, with a residual connection.

  GroupNorm -> qkv (1x1) -> softmax(q k^T / sqrt(d)) v per head -> zero-init 1x1 projection.
  ``x: [B, H, W, C]`` -> ``[B, H, W, C]`` in the compute dtype.
  """

  def __init__(
    self,
    width: int,
    num_heads: int,
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    norm_group_size: int = 0,
  ):
    if num_heads < 1 or width % num_heads:
      raise ValueError(f"AttentionBlock: width {width} is not divisible into {num_heads} heads")
    self.width = width
    self.num_heads = num_heads
    self.dtype = dtype
    self.norm = _group_norm(width, param_dtype, rngs, norm_group_size)
    # A 1x1 conv over positions is a Dense layer on the token axis; same parameters.
    self.qkv = _linear(width, 3 * width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = _linear(width, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs, zero=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_shape(x, (None, None, None, self.width))
    b, hgt, wid, c = x.shape
    n, d = self.num_heads, c // self.num_heads
    h = group_norm_act(self.norm, x, act=False).astype(self.dtype).reshape(b, hgt * wid, c)
    q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
    q, k, v = (a.reshape(b, hgt * wid, n, d) for a in (q, k, v))
    # Scaling q and k by d**-0.25 each (rather than the logits by d**-0.5) keeps the bf16
    # products in range, as IDDPM does for fp16.
    scale = d**-0.25
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k * scale)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hgt * wid, c)
    return x + self.proj(out).reshape(b, hgt, wid, c)


class _Layers:
  """Makes the U-Net's layers with its shared settings (a plain object, not part of the tree).

  ResBlocks are numbered in the order they are made (their ``dropout_index``), and every layer
  draws its initial weights from ``rngs`` when it is made: the order of the calls fixes both, so
  ``UNet`` makes its layers encoder first, then the middle, then the decoder, as IDDPM does.
  """

  def __init__(
    self,
    emb_dim: int,
    *,
    dropout: float,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    norm_group_size: int,
    heads: tuple[int, int],
    kw: dict[str, Any],
  ):
    """``heads``: ``(num_heads, num_head_channels)`` as ``UNet`` takes them; ``kw``: the
    ``dtype``, ``param_dtype`` and ``rngs`` every layer is made with."""
    self.emb_dim = emb_dim
    self.dropout = dropout
    self.use_scale_shift_norm = use_scale_shift_norm
    self.resblock_updown = resblock_updown
    self.norm_group_size = norm_group_size
    self.num_heads, self.num_head_channels = heads
    self.kw = kw
    self._counter = itertools.count()

  def heads_for(self, width: int) -> int:
    if self.num_head_channels > 0:
      if width % self.num_head_channels:
        raise ValueError(
          f"UNet: width {width} is not divisible by num_head_channels {self.num_head_channels}"
        )
      return width // self.num_head_channels
    if self.num_heads < 1 or width % self.num_heads:
      raise ValueError(f"UNet: width {width} is not divisible into num_heads {self.num_heads}")
    return self.num_heads

  def conv(self, in_ch: int, out_ch: int, *, zero: bool = False) -> nnx.Conv:
    return _conv(in_ch, out_ch, 3, zero=zero, **self.kw)

  def norm(self, width: int) -> nnx.GroupNorm:
    return _group_norm(width, self.kw["param_dtype"], self.kw["rngs"], self.norm_group_size)

  def res(self, in_w: int, out_w: int, resample=None, skip_conv=None) -> ResBlock:
    return ResBlock(
      in_w,
      out_w,
      self.emb_dim,
      dropout=self.dropout,
      use_scale_shift_norm=self.use_scale_shift_norm,
      resample=resample,
      dropout_index=next(self._counter),
      norm_group_size=self.norm_group_size,
      skip_conv=skip_conv,
      **self.kw,
    )

  def attn(self, width: int) -> AttentionBlock:
    return AttentionBlock(
      width, self.heads_for(width), norm_group_size=self.norm_group_size, **self.kw
    )

  def down(self, width: int) -> nnx.Module:
    return self.res(width, width, "down") if self.resblock_updown else Downsample(width, **self.kw)

  def up(self, width: int) -> nnx.Module:
    return self.res(width, width, "up") if self.resblock_updown else Upsample(width, **self.kw)


class _EmbedSequential(nnx.Module):
  """Runs layers in order, passing the embedding and dropout key to the ResBlocks only."""

  def __init__(self, layers: Sequence[nnx.Module]):
    self.layers = nnx.List(list(layers))

  def __call__(self, h: jax.Array, emb: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
    for layer in self.layers:
      if isinstance(layer, ResBlock):
        h = layer(h, emb, dropout_rng)
      else:
        h = layer(h)
    return h


class UNet(nnx.Module):
  """ADM / IDDPM U-Net noise-prediction network, NHWC.

  Encoder: conv3x3 stem, then per level ``num_res_blocks[i]`` ResBlocks at width
  ``channels[i]`` (each followed by attention at the listed resolutions) and a downsample
  between levels. Middle: ResBlock, attention, ResBlock at the last width. Decoder: per level
  ``num_res_blocks[i] + 1`` ResBlocks, each taking the concatenated encoder skip, with an
  upsample after the last block of every level but the top one. Output: GroupNorm, SiLU,
  zero-init conv3x3.

  Args:
    image_size: input height and width in pixels.
    in_channels: channels of the input image.
    out_channels: channels of the output (2 * in_channels for learned variances).
    channels: width of each resolution level, top (full resolution) first.
    num_res_blocks: encoder ResBlocks per level, an int or one per level (>= 1).
    attention_resolutions: resolutions in pixels (e.g. (16, 8)) that get attention; each
      must be one of ``image_size // 2**i`` for ``i < len(channels)``.
    num_heads: attention heads, used when ``num_head_channels <= 0``.
    num_head_channels: if > 0, heads = width // num_head_channels.
    dropout: dropout rate inside the ResBlocks (active only when a key is passed).
    num_classes: 0 for unconditional; otherwise a table of ``num_classes + 1`` label
      embeddings whose last row (index ``num_classes``) is the null label for CFG.
    use_scale_shift_norm: condition via ``norm(h) * (1 + scale) + shift`` (IDDPM default).
    resblock_updown: resample with up/down ResBlocks (ADM) instead of conv resampling (IDDPM).
    norm_group_size: 0 for ``gcd(32, width)`` GroupNorm groups (IDDPM's 32 where possible);
      > 0 for groups of exactly this many channels (every width must be divisible), so a
      network pruned by whole groups normalises its surviving channels as the original did.
    time_embed_channels: width of the sinusoidal timestep features, IDDPM's
      ``model_channels``; the embedding width is 4x this. 0 means ``channels[0]``. A pruned
      network pins it to the unpruned ``channels[0]`` to keep the conditioning path intact.
    base_channels: widths of the network this one was pruned from (``None``: itself). A
      level-entry ResBlock whose base widths differ keeps its 1x1 skip conv even where the
      pruned widths coincide, so every pruned layer has a counterpart in the base.
    dtype: compute dtype (float32 or bfloat16); norms and softmax stay float32.
    param_dtype: parameter dtype.
    rngs: initialisation keys (``params`` stream).
  """

  def __init__(
    self,
    *,
    image_size: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int],
    num_res_blocks: int | Sequence[int],
    attention_resolutions: Sequence[int],
    num_heads: int = 4,
    num_head_channels: int = -1,
    dropout: float = 0.0,
    num_classes: int = 0,
    use_scale_shift_norm: bool = True,
    resblock_updown: bool = True,
    norm_group_size: int = 0,
    time_embed_channels: int = 0,
    base_channels: Sequence[int] | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    channels, num_res_blocks, attention_resolutions = unet_args.checked_levels(
      image_size, channels, num_res_blocks, attention_resolutions
    )
    base_channels = unet_args.checked_options(
      channels,
      dropout=dropout,
      num_classes=num_classes,
      norm_group_size=norm_group_size,
      time_embed_channels=time_embed_channels,
      base_channels=base_channels,
    )
    self.image_size = image_size
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.channels = channels
    self.num_res_blocks = num_res_blocks
    self.attention_resolutions = attention_resolutions
    self.num_classes = num_classes
    self.norm_group_size = norm_group_size
    self.time_embed_channels = time_embed_channels or channels[0]
    self.dtype = dtype

    # Every layer takes its initial weights from ``rngs`` as it is made, so the order below
    # (conditioning, encoder, middle, decoder, output) is part of the checkpoint format.
    emb_dim = 4 * self.time_embed_channels
    self.time_mlp1, self.time_mlp2, self.label_emb = self._build_conditioning(
      emb_dim, param_dtype, rngs
    )
    layers = _Layers(
      emb_dim,
      dropout=dropout,
      use_scale_shift_norm=use_scale_shift_norm,
      resblock_updown=resblock_updown,
      norm_group_size=norm_group_size,
      heads=(num_heads, num_head_channels),
      kw=dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs),
    )
    self.input_blocks, skip_widths = self._build_down(layers, base_channels)
    ch = channels[-1]
    self.middle_block = _EmbedSequential([layers.res(ch, ch), layers.attn(ch), layers.res(ch, ch)])
    self.output_blocks = self._build_up(layers, skip_widths)
    self.out_norm = layers.norm(channels[0])
    self.out_conv = layers.conv(channels[0], out_channels, zero=True)

  def _build_conditioning(self, emb_dim: int, param_dtype, rngs: nnx.Rngs):
    """The timestep MLP's two layers and the label table (``None`` when unconditional)."""
    # The conditioning path stays float32: it is tiny and feeds every scale-shift.
    f32 = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    time_mlp1 = _linear(self.time_embed_channels, emb_dim, **f32)
    time_mlp2 = _linear(emb_dim, emb_dim, **f32)
    if self.num_classes == 0:
      return time_mlp1, time_mlp2, None
    label_emb = nnx.Embed(
      self.num_classes + 1,
      emb_dim,
      embedding_init=nnx.initializers.normal(1.0),  # PyTorch nn.Embedding init
      **f32,
    )
    return time_mlp1, time_mlp2, label_emb

  def _build_down(self, layers: _Layers, base_channels: tuple[int, ...]):
    """The encoder: the stem conv, then per level its ResBlocks (each with attention at the
    listed resolutions) and a downsample between levels.

    Returns:
      (the blocks as an ``nnx.List``, the width of every block's output: the decoder's skips).
    """
    channels = self.channels
    blocks = [_EmbedSequential([layers.conv(self.in_channels, channels[0])])]
    skip_widths = [channels[0]]
    ch = channels[0]
    for level, width in enumerate(channels):
      res_px = self.image_size // 2**level
      for b in range(self.num_res_blocks[level]):
        # A level-entry block whose base widths differ keeps its 1x1 skip conv (``base_channels``).
        entry = level > 0 and b == 0 and base_channels[level - 1] != base_channels[level]
        block = [layers.res(ch, width, skip_conv=True if entry else None)]
        ch = width
        if res_px in self.attention_resolutions:
          block.append(layers.attn(ch))
        blocks.append(_EmbedSequential(block))
        skip_widths.append(ch)
      if level != len(channels) - 1:
        blocks.append(_EmbedSequential([layers.down(ch)]))
        skip_widths.append(ch)
    return nnx.List(blocks), skip_widths

  def _build_up(self, layers: _Layers, skip_widths: list[int]) -> nnx.List:
    """The decoder: per level, bottom first, ``num_res_blocks + 1`` ResBlocks each taking one
    encoder skip (popped from ``skip_widths``, which ends empty), attention at the listed
    resolutions, and an upsample after the level's last block except at the top level."""
    blocks = []
    ch = self.channels[-1]
    for level in reversed(range(len(self.channels))):
      width = self.channels[level]
      res_px = self.image_size // 2**level
      for i in range(self.num_res_blocks[level] + 1):
        block = [layers.res(ch + skip_widths.pop(), width)]
        ch = width
        if res_px in self.attention_resolutions:
          block.append(layers.attn(ch))
        if level and i == self.num_res_blocks[level]:
          block.append(layers.up(ch))
        blocks.append(_EmbedSequential(block))
    assert not skip_widths  # construction invariant: every encoder output is used once
    return nnx.List(blocks)

  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """Predicts the network output (eps / x0 / v, plus variance channels) for a noisy batch.

    Args:
      x: [B, image_size, image_size, in_channels] noisy images (any float dtype).
      t: [B] int32 or float32 timesteps, fed as is to the sinusoidal embedding.
      y: [B] int32 labels in [0, num_classes]; ``num_classes`` is the null label. ``None``
        means the null label on a class-conditional model; ignored when ``num_classes == 0``.
      dropout_rng: PRNG key; dropout is applied only when given (deterministic otherwise).

    Returns:
      [B, image_size, image_size, out_channels] float32.
    """
    chex.assert_shape(x, (None, self.image_size, self.image_size, self.in_channels))
    batch = x.shape[0]
    chex.assert_shape(t, (batch,))

    emb = timestep_embedding(t, self.time_embed_channels)
    emb = self.time_mlp2(nnx.silu(self.time_mlp1(emb)))
    if self.label_emb is not None:
      if y is None:
        y = jnp.full((batch,), self.num_classes, dtype=jnp.int32)
      chex.assert_shape(y, (batch,))
      emb = emb + self.label_emb(y.astype(jnp.int32))

    h = x.astype(self.dtype)
    skips = []
    for block in self.input_blocks:
      h = block(h, emb, dropout_rng)
      skips.append(h)
    h = self.middle_block(h, emb, dropout_rng)
    for block in self.output_blocks:
      h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb, dropout_rng)
    h = group_norm_act(self.out_norm, h).astype(self.dtype)
    out = self.out_conv(h).astype(jnp.float32)
    chex.assert_shape(out, (batch, self.image_size, self.image_size, self.out_channels))
    return out
