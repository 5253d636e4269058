"""Closed-form parameter counts and MACs of TFDiff (spec §2.3), for every knob of ``TFDiffSpec``.

With r = 4, D_c = D and biases counted, the spec's formulas are

  P_blk = 12 D^2 + 6 D D_c + 55 D
  P     = k^2 C D + D + P_cond + N P_blk + 2 D D_c + 2 D + k^2 D C_out s^2 + C_out s^2
  P_cond = 256 D_c + D_c^2 + 2 D_c (+ (n_cls + 1) D_c)
  M_blk = 12 D^2 L + 2 L^2 D + 36 D L,   L = H W / s^2
  M     = k^2 C D L + N M_blk + k^2 D C_out s^2 L

The functions below are the same expressions, term by term, generalised to the ablation knobs.
``tests/mobile`` asserts ``param_count`` equal to the real parameter tree and ``2 * macs`` within
10% of XLA's FLOP count. The per-sample conditioning matmuls (time MLP, adaLN projections), which
the spec calls negligible, are included so the count is complete.
"""

from __future__ import annotations

from mobile.spec import TFDiffSpec, tokens


def block_params(spec: TFDiffSpec) -> int:
  """Parameters of one core block."""
  d, dc, rd = spec.width, spec.d_cond, spec.mlp_ratio * spec.width
  mod = 6 * d * dc + 6 * d if spec.conditioning == "adaln" else d * dc + d
  attn = 3 * d * d + 3 * d + d * d + d  # qkv and output projections, with biases
  ffn = d * rd + rd + rd * d + d
  if spec.ffn_dwconv:
    ffn += 9 * rd + rd  # depthwise 3x3, one filter and bias per channel
  return mod + attn + ffn


def head_params(spec: TFDiffSpec) -> int:
  """Parameters of the output layer (the only term Config I and II differ in)."""
  d, c_out, s, kh = spec.width, spec.out_channels, spec.stride, spec.head_kernel
  if s == 1 or spec.upsample == "resize_conv":
    return kh * kh * d * c_out + c_out
  if spec.upsample == "pixel_shuffle":
    return kh * kh * d * c_out * s * s + c_out * s * s
  return (2 * s) ** 2 * d * c_out + c_out  # convT


def cond_params(spec: TFDiffSpec) -> int:
  """Parameters of the time MLP and the class table: P_cond."""
  dc = spec.d_cond
  p = spec.time_freq_dim * dc + dc + dc * dc + dc
  if spec.num_classes:
    p += (spec.num_classes + 1) * dc
  return p


def param_count(spec: TFDiffSpec) -> int:
  """Total parameters P (an int, exact)."""
  d, k = spec.width, spec.stem_kernel
  p = k * k * spec.in_channels * d + d  # stem
  if spec.stem_extra_conv:
    p += 9 * d * d + d
  if spec.pos_emb == "learned":
    p += tokens(spec) * d
  p += cond_params(spec)
  p += (1 if spec.share_core_weights else spec.depth) * block_params(spec)
  if spec.long_skips:
    p += (spec.depth // 2) * (2 * d * d + d)
  p += 2 * d * spec.d_cond + 2 * d  # final adaLN
  return p + head_params(spec)


def block_macs(spec: TFDiffSpec, resolution: int | None = None) -> dict[str, int]:
  """Multiply-accumulates of one core block for one sample: {'linear', 'attention'}.

  'attention' is the L x L part (Q K^T and A V: 2 L^2 D for full attention; 2 L D d_head + L D
  for linear attention); 'linear' is everything that grows linearly in L.
  """
  d, dc, rd = spec.width, spec.d_cond, spec.mlp_ratio * spec.width
  n_pos = tokens(spec, resolution)
  mod = 6 * d * dc if spec.conditioning == "adaln" else d * dc  # per sample, not per position
  linear = mod + 4 * d * d * n_pos + 2 * d * rd * n_pos
  if spec.ffn_dwconv:
    linear += 9 * rd * n_pos
  if spec.attention == "full":
    attention = 2 * n_pos * n_pos * d
  else:
    attention = 2 * n_pos * d * (d // spec.num_heads) + n_pos * d
  return {"linear": linear, "attention": attention}


def macs(spec: TFDiffSpec, resolution: int | None = None) -> dict[str, int]:
  """MACs of one forward pass for one sample at ``resolution`` (default: training size).

  Returns:
    {'linear', 'attention', 'total'}; 'attention' sums the N blocks' L x L terms.
  """
  r = spec.image_size if resolution is None else resolution
  d, dc, k, s = spec.width, spec.d_cond, spec.stem_kernel, spec.stride
  kh, c_out = spec.head_kernel, spec.out_channels
  n_pos = tokens(spec, r)
  linear = k * k * spec.in_channels * d * n_pos  # stem
  if spec.stem_extra_conv:
    linear += 9 * d * d * n_pos
  linear += spec.time_freq_dim * dc + dc * dc  # time MLP (per sample)
  blk = block_macs(spec, r)
  linear += spec.depth * blk["linear"]
  attention = spec.depth * blk["attention"]
  if spec.long_skips:
    linear += (spec.depth // 2) * 2 * d * d * n_pos
  linear += 2 * d * dc  # final adaLN
  if s == 1:
    linear += kh * kh * d * c_out * n_pos
  elif spec.upsample == "pixel_shuffle":
    linear += kh * kh * d * c_out * s * s * n_pos
  elif spec.upsample == "resize_conv":
    linear += kh * kh * d * c_out * r * r
  else:  # convT: each input position scatters a (2s)^2 kernel
    linear += (2 * s) ** 2 * d * c_out * n_pos
  return {"linear": linear, "attention": attention, "total": linear + attention}


def flops(spec: TFDiffSpec, resolution: int | None = None) -> int:
  """2 x MACs: the FLOPs XLA's cost analysis counts for the matmuls and convolutions."""
  return 2 * macs(spec, resolution)["total"]


# (label, spec fields) of the table ``python -m mobile.formulas`` prints (mobile/RESULTS.md, M1).
_TABLE = [
  ("digits Config I", dict(image_size=8, width=64, depth=6, num_heads=4, stride=2)),
  ("digits Config II", dict(image_size=8, width=64, depth=6, num_heads=4, stride=1)),
  ("16px s=2 D=64 N=3 H=4", dict(image_size=16, width=64, depth=3, num_heads=4, stride=2)),
  ("8px s=1 D=64 N=2 H=2", dict(image_size=8, width=64, depth=2, num_heads=2, stride=1)),
  ("16px RGB s=2 D=96 N=2 H=3, 10 classes",
   dict(image_size=16, width=96, depth=2, num_heads=3, stride=2, in_channels=3,
        out_channels=3, num_classes=10)),
  ("32px RGB s=2 D=128 N=8 H=4 (shapes I)",
   dict(image_size=32, width=128, depth=8, num_heads=4, stride=2, in_channels=3,
        out_channels=3)),
  ("16px s=4 D=48 N=3 H=6", dict(image_size=16, width=48, depth=3, num_heads=6, stride=4)),
]  # fmt: skip


def main() -> None:
  """Prints the formulas next to the real parameter tree and XLA's FLOP count (unrolled)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from common.metrics.flops import count_flops
  from common.models import count_params
  from mobile.model import TFDiff

  print("| setting | params (tree) | params (formula) | FLOPs (XLA) | 2 x MACs (formula) | ratio |")
  print("|---|---|---|---|---|---|")
  for label, fields in _TABLE:
    fields = {"in_channels": 1, "out_channels": 1, **fields}
    spec = TFDiffSpec(**fields)
    model = nnx.eval_shape(lambda spec=spec: TFDiff(spec, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    r, c = spec.image_size, spec.in_channels
    x = jax.ShapeDtypeStruct((1, r, r, c), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if spec.num_classes else None
    fn = lambda st, x, t, y, gd=graphdef: nnx.merge(gd, st)(x, t, y, layer_loop="unroll")
    xla = count_flops(fn, state, x, t, y)
    want = flops(spec)
    print(
      f"| {label} | {count_params(model):,} | {param_count(spec):,} | {xla:.4g} | {want:.4g} "
      f"| {xla / want:.3f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
