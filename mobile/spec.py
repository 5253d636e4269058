"""The TFDiff architecture as one value: ``TFDiffSpec``, every unknown of the paper a field.

``mobile.model`` builds the network from it, ``mobile.formulas`` computes its parameter and MAC
counts in closed form, and ``mobile.export`` records it in ``manifest.json``. ``spec_from_config``
reads it from a run config (``model.*``, ``data.resolution``); ``TFDiffSpec.validate`` refuses a bad
value with a ``SpecError`` naming the config field.
"""

from __future__ import annotations

import dataclasses

ATTENTIONS = ("full", "linear")
CONDITIONINGS = ("adaln", "add")
POS_EMBS = ("none", "learned")
UPSAMPLES = ("pixel_shuffle", "convT", "resize_conv")
TEXT_CONDS = ("none",)


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


def tokens(spec: TFDiffSpec, resolution: int | None = None) -> int:
  """L, the positions the blocks attend over: (H/s)(W/s)."""
  r = spec.image_size if resolution is None else resolution
  return (r // spec.stride) ** 2
