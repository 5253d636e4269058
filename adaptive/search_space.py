"""The pruning search space of the ADM / IDDPM U-Net: structures, their model configs and FLOPs.

The search space is spec section 4.3 item 1: a width multiplier per resolution level, a number of
ResBlocks per level and on/off per attention level of the base. A :class:`Structure` maps to
``config.model.*`` overrides for ``common.models.unet.UNet``; decoder widths follow the encoder's
at the same level by the U-Net's construction, so the skip concatenations stay consistent. Its
cost is counted in closed form (``analytic_flops``, XLA's convention), so a search can price a
structure without building it. The weights a structure gets from its base are
``adaptive.inheritance``'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

WIDTH_CHOICES = (1.0, 0.75, 0.5, 0.375, 0.25)


@dataclasses.dataclass(frozen=True, order=True)
class Structure:
  """One point of the pruning space; frozen, hashable and ordered (lexicographic tie-break).

  Attributes:
    widths: per resolution level (top first), the width multiplier w_l in (0, 1].
    blocks: per level, encoder ResBlocks r_l (the decoder has r_l + 1).
    attention: one flag per base attention resolution, in the order of
      ``sorted(base.attention_resolutions, reverse=True)`` (top level first).
  """

  widths: tuple[float, ...]
  blocks: tuple[int, ...]
  attention: tuple[bool, ...]

  def to_dict(self) -> dict[str, list]:
    """JSON-serialisable form."""
    return {
      "widths": list(self.widths),
      "blocks": list(self.blocks),
      "attention": list(self.attention),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Sequence]) -> Structure:
    return cls(
      tuple(float(w) for w in d["widths"]),
      tuple(int(b) for b in d["blocks"]),
      tuple(bool(a) for a in d["attention"]),
    )


# ----------------------------------------------------------------------------- config plumbing


def _get(mc, key, default):
  return mc.get(key, default) if hasattr(mc, "get") else getattr(mc, key, default)


def _blocks_tuple(mc) -> tuple[int, ...]:
  nrb = _get(mc, "num_res_blocks", 1)
  n = len(tuple(_get(mc, "channels", ())))
  return (int(nrb),) * n if isinstance(nrb, int) else tuple(int(b) for b in nrb)


def _base_attention(mc) -> tuple[int, ...]:
  return tuple(sorted((int(r) for r in _get(mc, "attention_resolutions", ())), reverse=True))


def _width_unit(mc) -> int:
  # Every width is a whole number of GroupNorm groups and of attention heads, so any level
  # can carry attention (the middle block always does) at any multiplier.
  group = int(_get(mc, "norm_group_size", 0)) or 1
  hc = int(_get(mc, "num_head_channels", -1))
  heads = hc if hc > 0 else int(_get(mc, "num_heads", 4))
  return math.lcm(group, max(heads, 1))


def base_structure(model_config) -> Structure:
  """The unpruned structure of ``model_config`` (a ``config.model`` ConfigDict or mapping)."""
  channels = tuple(_get(model_config, "channels", ()))
  return Structure(
    (1.0,) * len(channels),
    _blocks_tuple(model_config),
    (True,) * len(_base_attention(model_config)),
  )


def validate_structure(base_model_config, structure: Structure) -> None:
  """Raises ValueError (naming the field) if ``structure`` is not in the base's pruning space."""
  base = base_structure(base_model_config)
  if len(structure.widths) != len(base.widths):
    raise ValueError(
      f"Structure.widths has {len(structure.widths)} entries, the base has {len(base.widths)} levels"
    )
  bad = [w for w in structure.widths if not 0.0 < w <= 1.0]
  if bad:
    raise ValueError(f"Structure.widths must lie in (0, 1], got {structure.widths}")
  if len(structure.blocks) != len(base.blocks) or any(
    not 1 <= b <= m for b, m in zip(structure.blocks, base.blocks, strict=True)
  ):
    raise ValueError(
      f"Structure.blocks must have one value in 1..r_max per level (r_max = {base.blocks}), "
      f"got {structure.blocks}"
    )
  if len(structure.attention) != len(base.attention):
    raise ValueError(
      f"Structure.attention needs one flag per base attention resolution "
      f"{_base_attention(base_model_config)}, got {structure.attention}"
    )


def pruned_channels(base_model_config, structure: Structure) -> tuple[int, ...]:
  """Per-level widths: ``w_l * c_l`` rounded to a multiple of the group/head unit (>= 1 unit)."""
  unit = _width_unit(base_model_config)
  out = []
  for w, c in zip(structure.widths, _get(base_model_config, "channels", ()), strict=True):
    if int(c) % unit:
      raise ValueError(
        f"model.channels: base width {c} is not a multiple of the pruning unit {unit} "
        f"(lcm of norm_group_size and the head size)"
      )
    out.append(max(unit, int(round(w * int(c) / unit)) * unit))
  return tuple(out)


def structure_to_model_config(base_model_config, structure: Structure) -> dict[str, Any]:
  """The ``config.model.*`` overrides that build the pruned network.

  Returns:
    dict with ``channels``, ``num_res_blocks``, ``attention_resolutions`` and the fields that
    tie the pruned network to its base: ``time_embed_channels`` (the base's conditioning width)
    and ``base_channels`` (keeps the base's 1x1 skip convs). ``norm_group_size`` is unchanged.
  """
  validate_structure(base_model_config, structure)
  channels = tuple(int(c) for c in _get(base_model_config, "channels", ()))
  base_ch = tuple(_get(base_model_config, "base_channels", ()) or channels)
  tec = int(_get(base_model_config, "time_embed_channels", 0)) or channels[0]
  attn = tuple(
    r for r, on in zip(_base_attention(base_model_config), structure.attention, strict=True) if on
  )
  return {
    "channels": pruned_channels(base_model_config, structure),
    "num_res_blocks": tuple(structure.blocks),
    "attention_resolutions": attn,
    "time_embed_channels": tec,
    "base_channels": tuple(int(c) for c in base_ch),
  }


def model_fields(base_model_config, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The U-Net fields a structure touches, the base's defaults filled in, ``overrides`` on top.

  Returns:
    dict with ``channels``, ``num_res_blocks`` (a tuple, one per level), attention, heads,
    normalisation and the base-tying fields; what ``analytic_flops`` and the inheritance walk
    read.
  """
  keys = (
    "channels", "num_res_blocks", "attention_resolutions", "num_heads", "num_head_channels",
    "use_scale_shift_norm", "resblock_updown", "norm_group_size", "time_embed_channels",
    "base_channels",
  )  # fmt: skip
  defaults = dict(
    num_heads=4, num_head_channels=-1, use_scale_shift_norm=True, resblock_updown=True,
    norm_group_size=0, time_embed_channels=0, base_channels=(),
  )  # fmt: skip
  m = {k: _get(base_model_config, k, defaults.get(k)) for k in keys}
  m.update(overrides)
  m["num_res_blocks"] = (
    (int(m["num_res_blocks"]),) * len(m["channels"])
    if isinstance(m["num_res_blocks"], int)
    else tuple(m["num_res_blocks"])
  )
  return m


# ----------------------------------------------------------------------------- analytic FLOPs


def _taps(n: int, k: int, stride: int) -> int:
  # XLA's cost analysis counts only kernel taps that land inside the unpadded input.
  pad = k // 2
  out = (n + 2 * pad - k) // stride + 1
  return sum(1 for o in range(out) for d in range(k) if 0 <= o * stride - pad + d < n)


def _conv_flops(hw: int, ci: int, co: int, k: int = 3, stride: int = 1) -> int:
  return 2 * _taps(hw, k, stride) ** 2 * ci * co


# Elementwise costs per element as XLA counts them (measured on the CPU backend): GroupNorm 5,
# SiLU 4 (the logistic is a transcendental, not a flop), softmax 4, add / mul 1.
_GN, _SILU, _SOFTMAX = 5, 4, 4


def analytic_flops(
  model_config,
  image_size: int,
  in_channels: int,
  out_channels: int,
  num_classes: int = 0,
) -> float:
  """Closed-form FLOPs of one forward pass at batch 1, in XLA's convention (multiply-add = 2).

  Counts convolutions (only in-bounds kernel taps, as XLA does), matmuls (qkv, q k^T, attention
  x v, projections, time MLP, emb projections), GroupNorm, SiLU, softmax, scale-shift, pooling
  and residual adds. Bias adds fused into convs and matmuls are not counted, as XLA does not.

  Args:
    model_config: ``config.model`` (or a mapping with its fields, e.g. base config updated with
      ``structure_to_model_config`` overrides).
    image_size: input height = width in pixels.
    in_channels / out_channels: image channels in and out (out = 2 x in for learned sigma).
    num_classes: > 0 adds the label-embedding add (0 = unconditional).

  Returns:
    FLOPs as a float.
  """
  m = model_fields(model_config, {})
  ch_list = tuple(int(c) for c in m["channels"])
  blocks = m["num_res_blocks"]
  attn_res = set(int(r) for r in m["attention_resolutions"])
  hc = int(m["num_head_channels"])
  tec = int(m["time_embed_channels"]) or ch_list[0]
  emb = 4 * tec
  ss = bool(m["use_scale_shift_norm"])
  updown = bool(m["resblock_updown"])
  base_ch = tuple(m["base_channels"]) or ch_list
  levels = len(ch_list)

  total = 2 * tec * emb + _SILU * emb + 2 * emb * emb  # time MLP
  total += _SILU * emb  # silu(emb), shared by all blocks after XLA's CSE
  if num_classes > 0:
    total += emb

  def res(hw, ci, co, resample=None, skip_conv=None):
    f = (_GN + _SILU) * hw * hw * ci
    if resample == "down":
      f += 2 * hw * hw * ci  # average-pool of h and x
      hw //= 2
    elif resample == "up":
      hw *= 2
    n = hw * hw
    f += _conv_flops(hw, ci, co)
    f += 2 * emb * (2 * co if ss else co)
    f += (_GN + 2) * n * co if ss else (_GN + 1) * n * co
    f += _SILU * n * co + _conv_flops(hw, co, co)
    if skip_conv if skip_conv is not None else ci != co:
      f += _conv_flops(hw, ci, co, k=1)
    return f + n * co

  def attn(hw, c):
    n = hw * hw
    heads = c // hc if hc > 0 else int(m["num_heads"])
    f = _GN * n * c + 2 * n * c * 3 * c + 2 * n * c  # norm, qkv, q and k scaling
    f += 2 * 2 * n * n * c + _SOFTMAX * heads * n * n  # q k^T, weights x v, softmax
    return f + 2 * n * c * c + n * c  # projection, residual

  hw = image_size
  total += _conv_flops(hw, in_channels, ch_list[0])
  ch = ch_list[0]
  skips = [ch]
  for lvl, w in enumerate(ch_list):
    for b in range(blocks[lvl]):
      entry = lvl > 0 and b == 0 and base_ch[lvl - 1] != base_ch[lvl]
      total += res(hw, ch, w, skip_conv=True if entry or ch != w else None)
      ch = w
      if hw in attn_res:
        total += attn(hw, ch)
      skips.append(ch)
    if lvl != levels - 1:
      total += res(hw, ch, ch, "down") if updown else _conv_flops(hw, ch, ch, stride=2)
      hw //= 2
      skips.append(ch)
  total += 2 * res(hw, ch, ch) + attn(hw, ch)
  for lvl in reversed(range(levels)):
    w = ch_list[lvl]
    for i in range(blocks[lvl] + 1):
      total += res(hw, ch + skips.pop(), w)
      ch = w
      if hw in attn_res:
        total += attn(hw, ch)
      if lvl and i == blocks[lvl]:
        total += res(hw, ch, ch, "up") if updown else _conv_flops(2 * hw, ch, ch)
        hw *= 2
  total += (_GN + _SILU) * hw * hw * ch + _conv_flops(hw, ch, out_channels)
  return float(total)


def make_flops_fn(
  base_model_config, image_size: int, in_channels: int, out_channels: int, num_classes: int = 0
) -> Callable[[Structure], float]:
  """``structure -> analytic FLOPs`` of the pruned network (batch 1), memoised."""
  cache: dict[Structure, float] = {}

  def flops_fn(structure: Structure) -> float:
    if structure not in cache:
      over = structure_to_model_config(base_model_config, structure)
      cache[structure] = analytic_flops(
        model_fields(base_model_config, over), image_size, in_channels, out_channels, num_classes
      )
    return cache[structure]

  return flops_fn


# ----------------------------------------------------------------------------- moves and baselines


def search_space_edits(base: Structure, s: Structure) -> list[tuple[tuple[str, int], Structure]]:
  """All single-edit neighbours of ``s``: ``[((kind, index), neighbour)]`` with kind ``width``
  (one notch down in ``WIDTH_CHOICES``), ``block`` (drop the last) or ``attn`` (turn off)."""
  del base
  out = []
  for lvl, w in enumerate(s.widths):
    lower = [c for c in WIDTH_CHOICES if c < w]
    if lower:
      ws = list(s.widths)
      ws[lvl] = max(lower)
      out.append((("width", lvl), dataclasses.replace(s, widths=tuple(ws))))
  for lvl, b in enumerate(s.blocks):
    if b > 1:
      bs = list(s.blocks)
      bs[lvl] = b - 1
      out.append((("block", lvl), dataclasses.replace(s, blocks=tuple(bs))))
  for i, a in enumerate(s.attention):
    if a:
      at = list(s.attention)
      at[i] = False
      out.append((("attn", i), dataclasses.replace(s, attention=tuple(at))))
  return out


def smallest_structure(base: Structure) -> Structure:
  """The cheapest point of the search space (every width 0.25, one block, no attention)."""
  return Structure(
    (min(WIDTH_CHOICES),) * len(base.widths),
    (1,) * len(base.blocks),
    (False,) * len(base.attention),
  )


def uniform_structure(base: Structure, width: float) -> Structure:
  """Every level at ``width``; all blocks and attention kept (DDSM varies width only)."""
  return Structure((float(width),) * len(base.widths), base.blocks, base.attention)


def uniform_width_structure(
  base: Structure,
  target_flops: float,
  flops_fn: Callable[[Structure], float],
  *,
  grid: int = 64,
) -> Structure:
  """Uniform-width baseline: every ``w_l`` equal, all blocks and attention kept.

  The common multiplier is searched on a grid of ``grid`` steps over [0.25, 1] plus
  ``WIDTH_CHOICES``; the one whose FLOPs are closest to ``target_flops`` wins (ties: lower FLOPs).
  """
  ws = sorted(set(WIDTH_CHOICES) | {0.25 + 0.75 * i / grid for i in range(grid + 1)})
  cands = [dataclasses.replace(base, widths=(w,) * len(base.widths)) for w in ws]
  return min(cands, key=lambda s: (abs(flops_fn(s) - target_flops), flops_fn(s), s))


def random_structures(
  base: Structure,
  target_flops: float,
  flops_fn: Callable[[Structure], float],
  num: int,
  *,
  tol: float = 0.02,
  seed: int = 0,
  max_tries: int = 20000,
) -> list[Structure]:
  """Up to ``num`` distinct random structures of the search space inside the FLOPs window
  ``|flops / target - 1| <= tol`` (the best-of-M baseline), in the order drawn."""
  rng = np.random.default_rng(seed)
  found: list[Structure] = []
  seen = set()
  for _ in range(max_tries):
    s = Structure(
      tuple(float(rng.choice(WIDTH_CHOICES)) for _ in base.widths),
      tuple(int(rng.integers(1, b + 1)) for b in base.blocks),
      tuple(bool(rng.integers(0, 2)) for _ in base.attention),
    )
    if s in seen:
      continue
    seen.add(s)
    if abs(flops_fn(s) / target_flops - 1.0) <= tol:
      found.append(s)
      if len(found) == num:
        break
  return found
