"""U-ViT (Bao et al. 2023, "All are Worth Words"): the patch-tokenized baseline TFDiff is compared to.

The mobile paper's claim is that a network with no tokenizer and no positional embedding (TFDiff,
``mobile.model``) does as well as patch-token transformers at a lower on-device cost. This module
is the other arm, written after the official ``libs/uvit.py``::

  x [B, H, W, C] --conv, kernel = stride = p--> L = HW/p^2 patch tokens of width D
  [label token], time token, patch tokens  + learned positional embedding  [B, E + L, D]
    --N/2 "in" blocks--> mid block --N/2 "out" blocks, each fed the matching "in" output through
      concat + Linear(2D -> D)--> LN --> Linear(D -> p^2 C_out) on the patch tokens
    --> un-patchify [B, H, W, C_out] --> 3x3 conv (C_out -> C_out)

Blocks are pre-LN transformers (multi-head self-attention, GELU MLP); the time (and, when
class-conditional, the label) enters only as extra tokens, E = 1 or 2 of them. N counts every block
and is odd (U-ViT's ``depth=12`` builds 6 + 1 + 6 = 13 blocks: ``model.depth=13`` here).

Differences from the official code, each because our shared loop needs it: the label table has a
null row (``num_classes``, for classifier-free guidance, as our U-Net and TFDiff), and with the
hybrid loss the output has 2C channels (learned variances) through both the linear and the conv.
The blocks run as an unrolled Python loop, so XLA's cost analysis sees every block and the DDPM
method's FLOPs count needs no special case (TFDiff scans, which is its point, M5).

Registered as ``config.model.name = "uvit"`` (``build_uvit``); the fields it reads (``model.*``)
are set by the ``digits_uvit_*`` presets of ``configs/mobile.py``.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from common.models import register
from common.models.registry import compute_dtype
from common.models.unet import timestep_embedding
from mobile.layers import depth_to_space
from mobile.spec import SpecError

POS_EMBS = ("learned", "none")
_LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default, which U-ViT uses
# U-ViT's init: truncated normal (std 0.02) linears with zero biases, the same for the positional
# table; the convs keep PyTorch's default, kaiming-uniform(a=sqrt(5)) = variance scaling 1/3.
_linear_init = nnx.initializers.truncated_normal(0.02)
_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class UViTSpec:
  """Every architectural choice of the U-ViT baseline.

  Attributes:
    image_size: training resolution (the positional table has (image_size / p)^2 patch rows).
    in_channels: C of the input.
    out_channels: C_out (C for eps, 2C for learned variances).
    patch_size: p, kernel and stride of the patch embedding.
    width: D, the token width.
    depth: N, all transformer blocks (odd: (N-1)/2 in, 1 mid, (N-1)/2 out).
    num_heads: attention heads (D divisible by it).
    mlp_ratio: the MLP's expansion.
    num_classes: 0 unconditional, else a label table of num_classes + 1 rows (the last: null).
    qkv_bias: biases on the q, k, v projection (U-ViT: off).
    time_mlp: an MLP (D -> 4D -> D, SiLU) on the sinusoidal time features (U-ViT: on for
      ImageNet, off for CIFAR-10 and CelebA).
    final_conv: the 3x3 conv after un-patchifying.
    long_skips: the concat + Linear(2D -> D) long skips from "in" to "out" blocks.
    pos_emb: learned (U-ViT) | none (ablation: patch tokens then carry no position).
  """

  image_size: int
  in_channels: int
  out_channels: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  num_classes: int = 0
  qkv_bias: bool = False
  time_mlp: bool = False
  final_conv: bool = True
  long_skips: bool = True
  pos_emb: str = "learned"

  @property
  def extras(self) -> int:
    """E, the conditioning tokens before the patches: time (+ label when conditional)."""
    return 2 if self.num_classes > 0 else 1

  def tokens(self, resolution: int | None = None) -> int:
    """L, the patch tokens at ``resolution`` (default: image_size)."""
    return ((resolution or self.image_size) // self.patch_size) ** 2

  def validate(self) -> None:
    """Raises ``SpecError`` naming the ``model.*`` field at fault."""
    for field in ("patch_size", "width", "depth", "num_heads", "mlp_ratio"):
      v = getattr(self, field)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise SpecError(f"model.{field}", v, "must be an integer >= 1")
    if self.image_size % self.patch_size:
      raise SpecError(
        "model.patch_size", self.patch_size, f"must divide data.resolution={self.image_size}"
      )
    if self.width % self.num_heads:
      raise SpecError(
        "model.num_heads", self.num_heads, f"model.width={self.width} must be divisible by it"
      )
    if self.depth % 2 == 0:
      raise SpecError(
        "model.depth", self.depth, "U-ViT's blocks are (N-1)/2 in, 1 mid, (N-1)/2 out: N odd"
      )
    if self.pos_emb not in POS_EMBS:
      raise SpecError("model.pos_emb", self.pos_emb, "allowed: " + ", ".join(POS_EMBS))


# The config fields the network reads besides the shared width/depth/num_heads/mlp_ratio: only the
# U-ViT presets define them, so configs saved by TFDiff runs stay unchanged (a resume compares
# every field).
CONFIG_FIELDS = ("patch_size", "qkv_bias", "time_mlp", "final_conv", "long_skips", "pos_emb")


def spec_from_config(config, *, in_channels: int, num_classes: int) -> UViTSpec:
  """The ``UViTSpec`` of a run config (``model.*``, ``data.resolution``, ``diffusion.loss``).

  Raises:
    SpecError: a U-ViT field is missing (the config is not a U-ViT preset).
  """
  m = config.model
  for field in CONFIG_FIELDS:
    if field not in m:
      raise SpecError(
        f"model.{field}", None, "missing: start from a configs/mobile.py:digits_uvit_* preset"
      )
  return UViTSpec(
    image_size=int(config.data.resolution),
    in_channels=in_channels,
    out_channels=in_channels * (2 if config.diffusion.loss == "hybrid" else 1),
    patch_size=m.patch_size,
    width=m.width,
    depth=m.depth,
    num_heads=m.num_heads,
    mlp_ratio=m.mlp_ratio,
    # A data set without labels gives an unconditional model even when class_conditional is set.
    num_classes=num_classes if m.class_conditional else 0,
    qkv_bias=bool(m.qkv_bias),
    time_mlp=bool(m.time_mlp),
    final_conv=bool(m.final_conv),
    long_skips=bool(m.long_skips),
    pos_emb=m.pos_emb,
  )


def param_count(spec: UViTSpec) -> int:
  """Closed-form parameter count (U-ViT-S/4 on CelebA-64: 44.3 M, the paper's "44 M")."""
  d, c, co, p, r = spec.width, spec.in_channels, spec.out_channels, spec.patch_size, spec.mlp_ratio
  block = (3 * d * d + (3 * d if spec.qkv_bias else 0)) + (d * d + d) + 4 * d  # attention + 2 LN
  block += (d * r * d + r * d) + (r * d * d + d)  # MLP
  total = spec.depth * block + (spec.depth // 2) * (2 * d * d + d) * spec.long_skips
  total += p * p * c * d + d  # patch embedding
  total += (spec.extras + spec.tokens()) * d if spec.pos_emb == "learned" else 0
  total += (d * 4 * d + 4 * d + 4 * d * d + d) if spec.time_mlp else 0
  total += (spec.num_classes + 1) * d if spec.num_classes else 0
  total += 2 * d + d * p * p * co + p * p * co  # final LN, decoder
  total += (9 * co * co + co) if spec.final_conv else 0
  return total


def _linear(i, o, *, bias=True, dtype, param_dtype, rngs) -> nnx.Linear:
  return nnx.Linear(
    i, o, use_bias=bias, kernel_init=_linear_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
  )


def _layer_norm(d, *, param_dtype, rngs) -> nnx.LayerNorm:
  # float32 statistics whatever the compute dtype: the residual stream stays float32.
  return nnx.LayerNorm(d, epsilon=_LN_EPS, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class Block(nnx.Module):
  """U-ViT's block: [x = Linear(concat(x, skip))], x += MHSA(LN(x)), x += MLP(LN(x)).

  ``x: [B, T, D]`` float32 (T = E + L tokens), ``skip`` the same shape -> ``[B, T, D]`` float32.
  """

  def __init__(self, spec: UViTSpec, *, skip: bool, dtype, param_dtype, rngs: nnx.Rngs):
    d, rd = spec.width, spec.mlp_ratio * spec.width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.width, self.num_heads, self.dtype = d, spec.num_heads, dtype
    self.skip_linear = _linear(2 * d, d, **kw) if skip else None
    self.norm1 = _layer_norm(d, param_dtype=param_dtype, rngs=rngs)
    self.qkv = _linear(d, 3 * d, bias=spec.qkv_bias, **kw)
    self.proj = _linear(d, d, **kw)
    self.norm2 = _layer_norm(d, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = _linear(d, rd, **kw)
    self.fc2 = _linear(rd, d, **kw)

  def _attend(self, x: jax.Array) -> jax.Array:
    b, n_tok, d = x.shape
    n, dh = self.num_heads, d // self.num_heads
    q, k, v = (a.reshape(b, n_tok, n, dh) for a in jnp.split(self.qkv(x), 3, axis=-1))
    # q and k scaled by dh**-0.25 each (not the logits by dh**-0.5) keeps bf16 products in range.
    s = dh**-0.25
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * s, k * s)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n_tok, d))

  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    chex.assert_shape(x, (None, None, self.width))
    if self.skip_linear is not None:
      h = jnp.concatenate([x, skip], axis=-1).astype(self.dtype)
      x = self.skip_linear(h).astype(jnp.float32)
    x = x + self._attend(self.norm1(x).astype(self.dtype))
    # Exact (erf) GELU: PyTorch's nn.GELU default, which U-ViT's Mlp uses.
    h = jax.nn.gelu(self.fc1(self.norm2(x).astype(self.dtype)), approximate=False)
    return x + self.fc2(h.astype(self.dtype))


class UViT(nnx.Module):
  """The U-ViT denoiser (see the module docstring).

  Args:
    spec: the architecture (``UViTSpec``; validated here).
    dtype: compute dtype of the convs and matmuls (LayerNorms, softmax and the residual stream
      stay float32).
    param_dtype: parameter dtype.
    rngs: initialisation keys (``params`` stream).
  """

  def __init__(self, spec: UViTSpec, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    spec.validate()
    self.spec, self.dtype = spec, dtype
    d, p, co = spec.width, spec.patch_size, spec.out_channels
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    f32 = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

    # --- Tokens: non-overlapping patches (kernel = stride = p), the tokenizer TFDiff drops. ------
    self.patch_embed = nnx.Conv(
      spec.in_channels, d, (p, p), strides=(p, p), padding="VALID", kernel_init=_conv_init, **kw
    )
    if spec.time_mlp:
      self.time_mlp1, self.time_mlp2 = _linear(d, 4 * d, **f32), _linear(4 * d, d, **f32)
    else:
      self.time_mlp1 = self.time_mlp2 = None
    if spec.num_classes > 0:
      # nn.Embedding's N(0, 1) init, as U-ViT leaves it; the last row is the null label.
      self.label_emb = nnx.Embed(
        spec.num_classes + 1, d, embedding_init=nnx.initializers.normal(1.0), **f32
      )
    else:
      self.label_emb = None
    if spec.pos_emb == "learned":
      shape = (spec.extras + spec.tokens(), d)
      self.pos_embed = nnx.Param(_linear_init(rngs.params(), shape, param_dtype))
    else:
      self.pos_embed = None

    # --- (N-1)/2 in, 1 mid, (N-1)/2 out blocks; the out blocks own the long-skip linears. ------
    half = spec.depth // 2
    make = lambda skip: Block(spec, skip=skip, **kw)
    self.in_blocks = nnx.List([make(False) for _ in range(half)])
    self.mid_block = make(False)
    self.out_blocks = nnx.List([make(spec.long_skips) for _ in range(half)])

    # --- Back to pixels: LN, Linear to p^2 C_out per patch, un-patchify, 3x3 conv. --------------
    self.norm = _layer_norm(d, param_dtype=param_dtype, rngs=rngs)
    self.decoder_pred = _linear(d, p * p * co, **kw)
    if spec.final_conv:
      self.final_layer = nnx.Conv(co, co, (3, 3), padding=1, kernel_init=_conv_init, **kw)
    else:
      self.final_layer = None

  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """Predicts eps (plus variance channels).

    Args:
      x: [B, H, W, in_channels] noisy images; H = W = image_size with the learned positional
        table, any multiple of the patch size without it.
      t: [B] int32 or float32 model timesteps (0-based, t = k - 1).
      y: [B] int32 labels in [0, num_classes]; ``num_classes`` (or None) is the null label.
        Ignored by an unconditional model.
      dropout_rng: accepted for the ``build_model`` interface; U-ViT has no dropout.

    Returns:
      [B, H, W, out_channels] float32.
    """
    del dropout_rng
    spec, p = self.spec, self.spec.patch_size
    chex.assert_rank(x, 4)
    b, hgt, wid, ch = x.shape
    chex.assert_equal(ch, spec.in_channels)
    chex.assert_shape(t, (b,))
    if hgt % p or wid % p:
      raise ValueError(f"input {hgt}x{wid} is not divisible by the patch size {p}")

    h = self.patch_embed(x.astype(self.dtype)).astype(jnp.float32)
    hp, wp = hgt // p, wid // p
    h = h.reshape(b, hp * wp, spec.width)

    time = timestep_embedding(t, spec.width)
    if self.time_mlp1 is not None:
      time = self.time_mlp2(nnx.silu(self.time_mlp1(time)))
    extras = [time[:, None, :]]
    if self.label_emb is not None:
      if y is None:
        y = jnp.full((b,), spec.num_classes, jnp.int32)
      chex.assert_shape(y, (b,))
      extras.insert(0, self.label_emb(y.astype(jnp.int32))[:, None, :])  # U-ViT: label first
    h = jnp.concatenate([*extras, h], axis=1)
    if self.pos_embed is not None:
      if h.shape[1] != self.pos_embed.shape[0]:
        raise ValueError(
          f"the learned positional table is fixed to {spec.image_size}x{spec.image_size} "
          f"inputs, got {hgt}x{wid}"
        )
      h = h + self.pos_embed[...][None].astype(jnp.float32)
    chex.assert_shape(h, (b, spec.extras + hp * wp, spec.width))

    skips = []
    for block in self.in_blocks:
      h = block(h)
      skips.append(h)
    h = self.mid_block(h)
    for block in self.out_blocks:
      h = block(h, skips.pop())

    h = self.decoder_pred(self.norm(h).astype(self.dtype))[:, spec.extras :]
    out = depth_to_space(h.reshape(b, hp, wp, p * p * spec.out_channels), p)
    if self.final_layer is not None:
      out = self.final_layer(out)
    out = out.astype(jnp.float32)
    chex.assert_shape(out, (b, hgt, wid, spec.out_channels))
    return out


@register("uvit")
def build_uvit(config, *, in_channels: int, num_classes: int, rngs: nnx.Rngs) -> UViT:
  """Registry constructor: ``config.model.name = "uvit"``."""
  spec = spec_from_config(config, in_channels=in_channels, num_classes=num_classes)
  return UViT(spec, dtype=compute_dtype(config), rngs=rngs)
