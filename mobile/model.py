"""TFDiff: the tokenization-free, fixed-size-block diffusion backbone (arXiv 2411.06119), in NNX.

The reconstruction of ``shared/specs/mobile.md`` §2.2, every unknown a field of ``TFDiffSpec``::

  x [B, H, W, C] --stem conv, stride s--> [B, H/s, W/s, D] --N core blocks--> [B, H/s, W/s, D]
    --adaLN + head (pixel shuffle / convT / resize+conv for s > 1)--> [B, H, W, C_out]

No patch tokenizer and, by default, no positional embedding: the blocks work on the feature map's
positions directly and only the convolutions (stem, head, the in-block depthwise conv) carry
spatial structure. Timestep (and class) conditioning enters every block through adaLN-Zero.

The N blocks have identical shapes, so their parameters are stored *stacked* (leading axis N) and
the forward pass is a ``jax.lax.scan`` over them: one compiled block reused N times, so compile
time and program size do not grow with N (the software analogue of the paper's "fixed-size
reusable structure"). ``layer_loop="unroll"`` runs the same stacked parameters in a Python loop
(for the equality test and for XLA's cost analysis, which counts a loop body once).

As the U-Net, the module holds nothing but ``nnx.Param`` variables, so a trainer can
``nnx.split(model, nnx.Param)`` and run a pure jitted step.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from common.models import register
from common.models.unet import timestep_embedding

ATTENTIONS = ("full", "linear")
CONDITIONINGS = ("adaln", "add")
POS_EMBS = ("none", "learned")
UPSAMPLES = ("pixel_shuffle", "convT", "resize_conv")
LAYER_LOOPS = ("scan", "unroll")
TEXT_CONDS = ("none",)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_LN_EPS = 1e-6
_zeros = nnx.initializers.zeros_init()
# DiT's init: xavier-uniform linears, zero adaLN modulation and zero head (adaLN-Zero), so every
# block starts as the identity and the network's initial output is exactly 0.
_xavier = nnx.initializers.xavier_uniform()
_conv_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class SpecError(ValueError):
  """A bad architecture value; ``field`` names the config field (``model.width``, ...)."""

  def __init__(self, field: str, value, why: str):
    self.field, self.value, self.why = field, value, why
    super().__init__(f"{field}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class TFDiffSpec:
  """Every architectural choice of the network; ``mobile.formulas`` reads the same object.

  Attributes:
    image_size: training resolution (only the learned positional table depends on it).
    in_channels: C of the input image or latent.
    out_channels: C_out (C for eps, 2C for learned variances).
    width: D, the core blocks' width.
    depth: N, the number of core blocks.
    num_heads: attention heads (D must be divisible by it).
    stride: s of the initial conv (Configuration I: 2, II: 1).
    mlp_ratio: r, the FFN expansion.
    stem_kernel: k of the initial conv (odd).
    stem_extra_conv: an extra 3x3 conv (stride 1) + GELU after the stem.
    head_kernel: kernel of the output conv (odd).
    upsample: how s > 1 returns to full resolution: pixel_shuffle | convT | resize_conv.
    cond_dim: D_c, width of the conditioning vector (0: D).
    num_classes: 0 unconditional, else a table of num_classes + 1 rows (the last is the null
      label of classifier-free guidance).
    attention: full (softmax over all L positions) | linear (elu+1 kernel attention).
    ffn_dwconv: the depthwise 3x3 conv on the 2-D layout inside the FFN.
    conditioning: adaln (adaLN-Zero shift/scale/gate) | add (c projected and added per block).
    pos_emb: none | learned (a [H/s, W/s, D] table at ``image_size``, ablation only).
    share_core_weights: one block's parameters reused N times (weight tying).
    long_skips: U-ViT-style long skips: block i's output is concatenated into block N-1-i's
      input through a Linear(2D -> D) (N must be even).
    time_freq_dim: sinusoidal timestep features fed to the time MLP.
    text_cond: none (cross-attention to text tokens is not implemented: no text data here).
  """

  image_size: int
  in_channels: int
  out_channels: int
  width: int
  depth: int
  num_heads: int
  stride: int = 2
  mlp_ratio: int = 4
  stem_kernel: int = 3
  stem_extra_conv: bool = False
  head_kernel: int = 3
  upsample: str = "pixel_shuffle"
  cond_dim: int = 0
  num_classes: int = 0
  attention: str = "full"
  ffn_dwconv: bool = True
  conditioning: str = "adaln"
  pos_emb: str = "none"
  share_core_weights: bool = False
  long_skips: bool = False
  time_freq_dim: int = 256
  text_cond: str = "none"

  @property
  def d_cond(self) -> int:
    return self.cond_dim or self.width

  def validate(self) -> None:
    """Raises ``SpecError`` naming the ``model.*`` / ``data.*`` field at fault."""

    def bad(field, value, why):
      raise SpecError(field, value, why)

    for field in ("width", "depth", "num_heads", "stride", "mlp_ratio", "time_freq_dim"):
      v = getattr(self, field)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        bad(f"model.{field}", v, "must be an integer >= 1")
    if self.width % self.num_heads:
      bad(
        "model.num_heads",
        self.num_heads,
        f"model.width={self.width} must be divisible by the number of heads",
      )
    if self.image_size % self.stride:
      bad(
        "data.resolution",
        self.image_size,
        f"must be divisible by the initial conv's stride model.stride={self.stride}",
      )
    for field in ("stem_kernel", "head_kernel"):
      v = getattr(self, field)
      if not isinstance(v, int) or v < 1 or v % 2 == 0:
        bad(f"model.{field}", v, "must be an odd integer >= 1 (symmetric padding)")
    if self.cond_dim < 0:
      bad("model.cond_dim", self.cond_dim, "must be >= 0 (0: model.width)")
    for field, allowed in (
      ("upsample", UPSAMPLES),
      ("attention", ATTENTIONS),
      ("conditioning", CONDITIONINGS),
      ("pos_emb", POS_EMBS),
      ("text_cond", TEXT_CONDS),
    ):
      if getattr(self, field) not in allowed:
        bad(f"model.{field}", getattr(self, field), "allowed: " + ", ".join(allowed))
    if self.long_skips and self.depth % 2:
      bad("model.depth", self.depth, "long skips pair block i with block N-1-i: N must be even")


def _linear(i, o, *, dtype, param_dtype, rngs, zero=False) -> nnx.Linear:
  return nnx.Linear(
    i,
    o,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_zeros if zero else _xavier,
    rngs=rngs,
  )


def _conv(i, o, k, *, stride=1, dtype, param_dtype, rngs, zero=False) -> nnx.Conv:
  # Symmetric k//2 padding (not 'SAME'): for stride 2 'SAME' pads only the high side, which would
  # shift the stem's sampling grid off-centre.
  return nnx.Conv(
    i,
    o,
    kernel_size=(k, k),
    strides=(stride, stride),
    padding=k // 2,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_zeros if zero else _conv_init,
    rngs=rngs,
  )


def _layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm over the last axis without affine parameters (adaLN supplies them); float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _LN_EPS)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  # shift/scale: [B, D] per sample, broadcast over the spatial positions of x [B, h, w, D].
  return x * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]


def depth_to_space(x: jax.Array, s: int) -> jax.Array:
  """Pixel shuffle. ``x: [B, h, w, C*s*s]`` -> ``[B, h*s, w*s, C]``."""
  b, h, w, cs = x.shape
  c = cs // (s * s)
  x = x.reshape(b, h, w, s, s, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c)


def _shifted_3x3(x: jax.Array) -> list[jax.Array]:
  """The nine zero-padded 3x3 neighbours of every position, tap (i, j) at index 3 i + j."""
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]


@jax.custom_vjp
def depthwise3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise 3x3 cross-correlation, stride 1, zero padding 1, as nine shifted multiply-adds.

  Args:
    x: [B, h, w, C].
    kernel: [9, C], tap (i, j) at row 3 i + j (``nnx.Conv``'s [3, 3, 1, C] kernel reshaped).

  Returns:
    [B, h, w, C], x's dtype.

  Why not ``lax.conv_general_dilated(feature_group_count=C)``: XLA:CPU runs a grouped conv's
  weight gradient inside the scan over blocks ~70x slower than the rest of the training step
  (measured 11.7 s vs 0.16 s for a digits step). The hand-written VJP below (input gradient: the
  same shifts with the kernel flipped; kernel gradient: one reduction per tap) measured
  0.49 s vs 0.74 s for autodiff of the shifts on a Config II digits step.
  """
  shifted = _shifted_3x3(x)
  out = shifted[0] * kernel[0]
  for n in range(1, 9):
    out = out + shifted[n] * kernel[n]
  return out


def _depthwise3x3_fwd(x, kernel):
  return depthwise3x3(x, kernel), (x, kernel)


def _depthwise3x3_bwd(residuals, g):
  x, kernel = residuals
  c = x.shape[-1]
  # out[p] = sum_n x[p + d_n] k_n  =>  dx[q] = sum_n g[q - d_n] k_n, and shift -d_n is tap 8 - n.
  grad_x = sum(shifted * kernel[8 - n] for n, shifted in enumerate(_shifted_3x3(g)))
  grad_k = jnp.stack([jnp.sum((shifted * g).reshape(-1, c), axis=0) for shifted in _shifted_3x3(x)])
  return grad_x.astype(x.dtype), grad_k.astype(kernel.dtype)


depthwise3x3.defvjp(_depthwise3x3_fwd, _depthwise3x3_bwd)


class DepthwiseConv3x3(nnx.Module):
  """Depthwise 3x3 conv with bias, parameters as ``nnx.Conv(C, C, (3, 3), feature_group_count=C)``
  (kernel [3, 3, 1, C], bias [C]); computed by ``depthwise3x3``. ``[B, h, w, C] -> [B, h, w, C]``.
  """

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.channels = channels
    self.dtype = dtype
    self.kernel = nnx.Param(_conv_init(rngs.params(), (3, 3, 1, channels), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_shape(x, (None, None, None, self.channels))
    kernel = self.kernel[...].reshape(9, self.channels).astype(self.dtype)
    return depthwise3x3(x.astype(self.dtype), kernel) + self.bias[...].astype(self.dtype)


class CoreBlock(nnx.Module):
  """The fixed-size core block; every one of the N blocks has exactly these shapes.

  adaLN-Zero (DiT):  (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))
    h = x + gate1 * MHSA(LN(x) (1 + scale1) + shift1)      (no positional bias)
    y = h + gate2 * FFN(LN(h) (1 + scale2) + shift2),      FFN = Linear(D, rD) -> DW3x3 -> GELU
                                                                 -> Linear(rD, D)
  ``conditioning="add"`` instead adds Linear(SiLU(c)) to the block input, with gates 1.
  """

  def __init__(self, spec: TFDiffSpec, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, dc, rd = spec.width, spec.d_cond, spec.mlp_ratio * spec.width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.width = d
    self.num_heads = spec.num_heads
    self.attention = spec.attention
    self.conditioning = spec.conditioning
    self.dtype = dtype
    # The modulation is a per-sample [B, D_c] matmul: keep it float32, the cost is nil.
    f32 = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    if spec.conditioning == "adaln":
      self.modulation = _linear(dc, 6 * d, zero=True, **f32)
    else:
      self.modulation = _linear(dc, d, **f32)
    self.qkv = _linear(d, 3 * d, **kw)
    # With additive conditioning there is no zero gate, so the residual branches' last layers
    # start at zero instead to keep every block the identity at initialisation.
    zero_out = spec.conditioning == "add"
    self.proj = _linear(d, d, zero=zero_out, **kw)
    self.fc1 = _linear(d, rd, **kw)
    self.dwconv = DepthwiseConv3x3(rd, **kw) if spec.ffn_dwconv else None
    self.fc2 = _linear(rd, d, zero=zero_out, **kw)

  def _attend(self, x: jax.Array) -> jax.Array:
    b, hh, ww, d = x.shape
    n, dh = self.num_heads, d // self.num_heads
    q, k, v = jnp.split(self.qkv(x.reshape(b, hh * ww, d)), 3, axis=-1)
    q, k, v = (a.reshape(b, hh * ww, n, dh) for a in (q, k, v))
    if self.attention == "full":
      # q and k scaled by dh**-0.25 each (not the logits by dh**-0.5) keeps bf16 products in range.
      s = dh**-0.25
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * s, k * s)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      # Linear attention (Katharopoulos et al. 2020), feature map elu + 1: cost linear in L.
      q, k = (jax.nn.elu(a.astype(jnp.float32)) + 1.0 for a in (q, k))
      kv = jnp.einsum("bkhd,bkhe->bhde", k, v.astype(jnp.float32))
      norm = jnp.einsum("bqhd,bhd->bqh", q, jnp.sum(k, axis=1))
      out = (jnp.einsum("bqhd,bhde->bqhe", q, kv) / norm[..., None]).astype(v.dtype)
    return self.proj(out.reshape(b, hh * ww, d)).reshape(b, hh, ww, d)

  def _ffn(self, x: jax.Array) -> jax.Array:
    h = self.fc1(x)
    if self.dwconv is not None:
      h = self.dwconv(h)
    return self.fc2(jax.nn.gelu(h).astype(self.dtype))

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """x: [B, h, w, D] float32 (the residual stream); c: [B, D_c] float32 -> [B, h, w, D] float32."""
    chex.assert_shape(x, (None, None, None, self.width))
    mod = self.modulation(nnx.silu(c))
    if self.conditioning == "adaln":
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
      h = _modulate(_layer_norm(x), shift1, scale1).astype(self.dtype)
      x = x + gate1[:, None, None, :] * self._attend(h)
      h = _modulate(_layer_norm(x), shift2, scale2).astype(self.dtype)
      return x + gate2[:, None, None, :] * self._ffn(h)
    x = x + mod[:, None, None, :]
    x = x + self._attend(_layer_norm(x).astype(self.dtype))
    return x + self._ffn(_layer_norm(x).astype(self.dtype))


def _stacked(make, n: int, rngs: nnx.Rngs) -> nnx.Module:
  """n independently initialised copies of ``make(rngs)`` as one module with a leading n axis.

  Created with ``jax.vmap`` over n keys, so initialisation too is one traced block, not n.
  """
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  keys = jax.random.split(rngs.params(), n)
  states = jax.vmap(lambda k: nnx.split(make(nnx.Rngs(params=k)))[1])(keys)
  return nnx.merge(graphdef, states)


class TFDiff(nnx.Module):
  """Tokenization-free diffusion network (see the module docstring).

  Args:
    spec: the architecture (``TFDiffSpec``; validated here).
    layer_loop: scan (default) | unroll, how the N blocks are run; same parameters either way.
    dtype: compute dtype of the convs and the blocks' matmuls (norms, softmax, the residual
      stream and the conditioning path stay float32).
    param_dtype: parameter dtype.
    rngs: initialisation keys (``params`` stream).
  """

  def __init__(
    self,
    spec: TFDiffSpec,
    *,
    layer_loop: str = "scan",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    spec.validate()
    if layer_loop not in LAYER_LOOPS:
      raise SpecError("model.layer_loop", layer_loop, "allowed: " + ", ".join(LAYER_LOOPS))
    self.spec = spec
    self.layer_loop = layer_loop
    self.dtype = dtype
    d, dc, s = spec.width, spec.d_cond, spec.stride
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    f32 = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

    # --- Stem: an overlapping conv, not a patchify tokenizer (k >= s). ------------------------
    self.stem = _conv(spec.in_channels, d, spec.stem_kernel, stride=s, **kw)
    self.stem_extra = _conv(d, d, 3, **kw) if spec.stem_extra_conv else None
    if spec.pos_emb == "learned":
      side = spec.image_size // s
      self.pos_table = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (side, side, d)))
    else:
      self.pos_table = None

    # --- Conditioning vector c [B, D_c]: t -> sinusoid -> MLP, + class embedding. --------------
    self.time_mlp1 = _linear(spec.time_freq_dim, dc, **f32)
    self.time_mlp2 = _linear(dc, dc, **f32)
    if spec.num_classes > 0:
      self.label_emb = nnx.Embed(
        spec.num_classes + 1, dc, embedding_init=nnx.initializers.normal(0.02), **f32
      )
    else:
      self.label_emb = None

    # --- The N identical core blocks, stacked. ------------------------------------------------
    make_block = lambda r: CoreBlock(spec, dtype=dtype, param_dtype=param_dtype, rngs=r)
    if spec.share_core_weights:
      self.blocks = make_block(rngs)
    else:
      self.blocks = _stacked(make_block, spec.depth, rngs)
    if spec.long_skips:
      make_skip = lambda r: _linear(2 * d, d, dtype=dtype, param_dtype=param_dtype, rngs=r)
      self.skip_linears = _stacked(make_skip, spec.depth // 2, rngs)
    else:
      self.skip_linears = None

    # --- Final layer: adaLN-modulated LN, then back to H x W x C_out. -------------------------
    self.final_modulation = _linear(dc, 2 * d, zero=True, **f32)
    c_out, kh = spec.out_channels, spec.head_kernel
    if s == 1 or spec.upsample == "resize_conv":
      self.head = _conv(d, c_out, kh, zero=True, **kw)
    elif spec.upsample == "pixel_shuffle":
      self.head = _conv(d, c_out * s * s, kh, zero=True, **kw)
    else:  # convT: a kernel of 2s taps per axis covers each output pixel from two inputs
      self.head = nnx.ConvTranspose(
        d, c_out, (2 * s, 2 * s), strides=(s, s), padding="SAME", kernel_init=_zeros, **kw
      )

  # --- the core stack ---------------------------------------------------------------------------
  def _run_blocks(self, h: jax.Array, c: jax.Array, mode: str) -> jax.Array:
    spec = self.spec
    graphdef, state = nnx.split(self.blocks)
    n = spec.depth
    shared = spec.share_core_weights

    def block_params(i):
      return state if shared else jax.tree.map(lambda a: a[i], state)

    def apply_block(x, st):
      return nnx.merge(graphdef, st)(x, c)

    if not spec.long_skips:
      if mode == "unroll":
        for i in range(n):
          h = apply_block(h, block_params(i))
        return h
      if shared:
        h, _ = jax.lax.scan(lambda x, _: (apply_block(x, state), None), h, None, length=n)
      else:
        h, _ = jax.lax.scan(lambda x, st: (apply_block(x, st), None), h, state)
      return h

    # Long skips (U-ViT): the first N/2 blocks emit their outputs; block N/2 + j concatenates the
    # output of block N/2 - 1 - j and projects 2D -> D before running.
    half = n // 2
    skip_gd, skip_state = nnx.split(self.skip_linears)
    first = state if shared else jax.tree.map(lambda a: a[:half], state)
    second = state if shared else jax.tree.map(lambda a: a[half:], state)

    def with_skip(x, sk, skip_st):
      return nnx.merge(skip_gd, skip_st)(jnp.concatenate([x, sk], axis=-1).astype(self.dtype))

    if mode == "unroll":
      skips = []
      for i in range(half):
        h = apply_block(h, block_params(i))
        skips.append(h)
      for j in range(half):
        sk_st = jax.tree.map(lambda a, j=j: a[j], skip_state)
        h = with_skip(h, skips[half - 1 - j], sk_st).astype(jnp.float32)
        h = apply_block(h, block_params(half + j))
      return h

    def down(x, st):
      x = apply_block(x, state if shared else st)
      return x, x

    h, skips = jax.lax.scan(down, h, None if shared else first, length=half)

    def up(x, inputs):
      st, sk_st, sk = inputs
      x = with_skip(x, sk, sk_st).astype(jnp.float32)
      return apply_block(x, state if shared else st), None

    h, _ = jax.lax.scan(up, h, (None if shared else second, skip_state, skips[::-1]))
    return h

  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
    layer_loop: str | None = None,
  ) -> jax.Array:
    """Predicts eps (plus variance channels) for a noisy batch at any resolution divisible by s.

    Args:
      x: [B, H, W, in_channels] noisy images, any H, W divisible by the stride (the learned
        positional table, an ablation, fixes H = W = image_size).
      t: [B] int32 or float32 model timesteps (0-based, t = k - 1).
      y: [B] int32 labels in [0, num_classes]; ``num_classes`` (or None) is the null label.
        Ignored by an unconditional model.
      dropout_rng: accepted for the ``build_model`` interface; the network has no dropout.
      layer_loop: override the module's scan | unroll for this call.

    Returns:
      [B, H, W, out_channels] float32.
    """
    del dropout_rng
    spec = self.spec
    mode = layer_loop or self.layer_loop
    if mode not in LAYER_LOOPS:
      raise ValueError(f"layer_loop={mode!r}: allowed: {', '.join(LAYER_LOOPS)}")
    chex.assert_rank(x, 4)
    b, hgt, wid, ch = x.shape
    chex.assert_equal(ch, spec.in_channels)
    chex.assert_shape(t, (b,))
    s = spec.stride
    if hgt % s or wid % s:
      raise ValueError(f"input {hgt}x{wid} is not divisible by the stride {s}")

    c = self.time_mlp2(nnx.silu(self.time_mlp1(timestep_embedding(t, spec.time_freq_dim))))
    if self.label_emb is not None:
      if y is None:
        y = jnp.full((b,), spec.num_classes, jnp.int32)
      chex.assert_shape(y, (b,))
      c = c + self.label_emb(y.astype(jnp.int32))

    h = self.stem(x.astype(self.dtype))
    if self.stem_extra is not None:
      h = self.stem_extra(jax.nn.gelu(h))
    h = h.astype(jnp.float32)  # the residual stream stays float32
    if self.pos_table is not None:
      if h.shape[1:3] != self.pos_table.shape[:2]:
        raise ValueError(
          f"a learned positional table is fixed to {spec.image_size}x{spec.image_size} inputs, "
          f"got {hgt}x{wid}"
        )
      h = h + self.pos_table[...][None]
    chex.assert_shape(h, (b, hgt // s, wid // s, spec.width))

    h = self._run_blocks(h, c, mode)

    shift, scale = jnp.split(self.final_modulation(nnx.silu(c)), 2, axis=-1)
    h = _modulate(_layer_norm(h), shift, scale).astype(self.dtype)
    if s > 1 and spec.upsample == "resize_conv":
      h = jnp.repeat(jnp.repeat(h, s, axis=1), s, axis=2)
    out = self.head(h)
    if s > 1 and spec.upsample == "pixel_shuffle":
      out = depth_to_space(out, s)
    out = out.astype(jnp.float32)
    chex.assert_shape(out, (b, hgt, wid, spec.out_channels))
    return out


def spec_from_config(config, *, in_channels: int, num_classes: int) -> TFDiffSpec:
  """The ``TFDiffSpec`` described by a run config (``model.*``, ``data.resolution``)."""
  m = config.model
  out_channels = in_channels * (2 if config.diffusion.loss == "hybrid" else 1)
  return TFDiffSpec(
    image_size=int(config.data.resolution),
    in_channels=in_channels,
    out_channels=out_channels,
    width=m.width,
    depth=m.depth,
    num_heads=m.num_heads,
    stride=m.stride,
    mlp_ratio=m.mlp_ratio,
    stem_kernel=m.stem_kernel,
    stem_extra_conv=bool(m.stem_extra_conv),
    head_kernel=m.head_kernel,
    upsample=m.upsample,
    cond_dim=m.cond_dim,
    # A data set without labels gives an unconditional model even when class_conditional is set.
    num_classes=num_classes if m.class_conditional else 0,
    attention=m.attention,
    ffn_dwconv=bool(m.ffn_dwconv),
    conditioning=m.conditioning,
    pos_emb=m.pos_emb,
    share_core_weights=bool(m.share_core_weights),
    long_skips=bool(m.long_skips),
    time_freq_dim=m.time_freq_dim,
    text_cond=m.text_cond,
  )


@register("tfdiff")
def build_tfdiff(config, *, in_channels: int, num_classes: int, rngs: nnx.Rngs) -> TFDiff:
  """Registry constructor: ``config.model.name = "tfdiff"``."""
  if config.model.dtype not in _DTYPES:
    raise ValueError(f"model.dtype={config.model.dtype!r}: allowed: {', '.join(_DTYPES)}")
  spec = spec_from_config(config, in_channels=in_channels, num_classes=num_classes)
  return TFDiff(
    spec, layer_loop=config.model.layer_loop, dtype=_DTYPES[config.model.dtype], rngs=rngs
  )


def tokens(spec: TFDiffSpec, resolution: int | None = None) -> int:
  """L, the positions the blocks attend over: (H/s)(W/s)."""
  r = spec.image_size if resolution is None else resolution
  return (r // spec.stride) ** 2
