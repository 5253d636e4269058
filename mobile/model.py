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

The architecture is a ``mobile.spec.TFDiffSpec``; the layers below the core block are in
``mobile.layers``. Registered as ``config.model.name = "tfdiff"`` (``build_tfdiff``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from common.models import InitRngs, register
from common.models import stacked as stacked_lib
from common.models.registry import compute_dtype
from common.models.unet import timestep_embedding
from mobile.layers import (
  ZEROS,
  DepthwiseConv3x3,
  conv,
  depth_to_space,
  layer_norm,
  linear,
  modulate,
)
from mobile.spec import SpecError, TFDiffSpec, spec_from_config

LAYER_LOOPS = ("scan", "unroll")


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
      self.modulation = linear(dc, 6 * d, zero=True, **f32)
    else:
      self.modulation = linear(dc, d, **f32)
    self.qkv = linear(d, 3 * d, **kw)
    # With additive conditioning there is no zero gate, so the residual branches' last layers
    # start at zero instead to keep every block the identity at initialisation.
    zero_out = spec.conditioning == "add"
    self.proj = linear(d, d, zero=zero_out, **kw)
    self.fc1 = linear(d, rd, **kw)
    self.dwconv = DepthwiseConv3x3(rd, **kw) if spec.ffn_dwconv else None
    self.fc2 = linear(rd, d, zero=zero_out, **kw)

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
      h = modulate(layer_norm(x), shift1, scale1).astype(self.dtype)
      x = x + gate1[:, None, None, :] * self._attend(h)
      h = modulate(layer_norm(x), shift2, scale2).astype(self.dtype)
      return x + gate2[:, None, None, :] * self._ffn(h)
    x = x + mod[:, None, None, :]
    x = x + self._attend(layer_norm(x).astype(self.dtype))
    return x + self._ffn(layer_norm(x).astype(self.dtype))


def _stacked(make, n: int, rngs: nnx.Rngs) -> nnx.Module:
  """n independently initialised copies of ``make(rngs)`` as one module with a leading n axis.

  Created with ``jax.vmap`` over n keys, so initialisation too is one traced block, not n.
  """
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(InitRngs(0))))
  keys = jax.random.split(rngs.params(), n)
  states = jax.vmap(lambda k: nnx.split(make(InitRngs(k)))[1])(keys)
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
    self.stem = conv(spec.in_channels, d, spec.stem_kernel, stride=s, **kw)
    self.stem_extra = conv(d, d, 3, **kw) if spec.stem_extra_conv else None
    if spec.pos_emb == "learned":
      side = spec.image_size // s
      self.pos_table = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (side, side, d)))
    else:
      self.pos_table = None

    # --- Conditioning vector c [B, D_c]: t -> sinusoid -> MLP, + class embedding. --------------
    self.time_mlp1 = linear(spec.time_freq_dim, dc, **f32)
    self.time_mlp2 = linear(dc, dc, **f32)
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
      make_skip = lambda r: linear(2 * d, d, dtype=dtype, param_dtype=param_dtype, rngs=r)
      self.skip_linears = _stacked(make_skip, spec.depth // 2, rngs)
    else:
      self.skip_linears = None

    # --- Final layer: adaLN-modulated LN, then back to H x W x C_out. -------------------------
    self.final_modulation = linear(dc, 2 * d, zero=True, **f32)
    c_out, kh = spec.out_channels, spec.head_kernel
    if s == 1 or spec.upsample == "resize_conv":
      self.head = conv(d, c_out, kh, zero=True, **kw)
    elif spec.upsample == "pixel_shuffle":
      self.head = conv(d, c_out * s * s, kh, zero=True, **kw)
    else:  # convT: a kernel of 2s taps per axis covers each output pixel from two inputs
      self.head = nnx.ConvTranspose(
        d, c_out, (2 * s, 2 * s), strides=(s, s), padding="SAME", kernel_init=ZEROS, **kw
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
      elif stacked_lib.select_by_product():
        picks = jnp.eye(n, dtype=jnp.float32)
        h, _ = jax.lax.scan(
          lambda x, oh: (apply_block(x, stacked_lib.pick(state, oh)), None), h, picks
        )
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
    h = modulate(layer_norm(h), shift, scale).astype(self.dtype)
    if s > 1 and spec.upsample == "resize_conv":
      h = jnp.repeat(jnp.repeat(h, s, axis=1), s, axis=2)
    out = self.head(h)
    if s > 1 and spec.upsample == "pixel_shuffle":
      out = depth_to_space(out, s)
    out = out.astype(jnp.float32)
    chex.assert_shape(out, (b, hgt, wid, spec.out_channels))
    return out


@register("tfdiff")
def build_tfdiff(config, *, in_channels: int, num_classes: int, rngs: nnx.Rngs) -> TFDiff:
  """Registry constructor: ``config.model.name = "tfdiff"``."""
  spec = spec_from_config(config, in_channels=in_channels, num_classes=num_classes)
  return TFDiff(spec, layer_loop=config.model.layer_loop, dtype=compute_dtype(config), rngs=rngs)
