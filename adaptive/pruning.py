"""Structured pruning of the ADM / IDDPM U-Net: search space, analytic FLOPs, weight inheritance.

The search space is spec section 4.3 item 1: a width multiplier per resolution level, a number of
ResBlocks per level and on/off per attention level of the base. A :class:`Structure` maps to
``config.model.*`` overrides for ``common.models.unet.UNet``; decoder widths follow the encoder's
at the same level by the U-Net's construction, so the skip concatenations stay consistent.

Weight inheritance keeps, for every channel space of the base network (a residual stream, a
ResBlock's inner activation, an attention block's q/k and v per head), the channels whose
producing filters have the largest L1 norm, in whole GroupNorm groups, and slices every consumer
of that space with the same indices. Spaces joined by identity residuals are one space, so a
kept channel means the same thing in every tensor that carries it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WIDTH_CHOICES = (1.0, 0.75, 0.5, 0.375, 0.25)
SELECTIONS = ("l1", "random")
# "prefix" keeps each space's first channels (first dims of every head): the selection of a
# network whose channels :func:`rank_channels` has already put in L1 order (the supernet, E6).
_ALL_SELECTIONS = (*SELECTIONS, "prefix")


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


def _merged(base_model_config, overrides: Mapping[str, Any]) -> dict[str, Any]:
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
  m = _merged(model_config, {})
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
        _merged(base_model_config, over), image_size, in_channels, out_channels, num_classes
      )
    return cache[structure]

  return flops_fn


# ----------------------------------------------------------------------------- weight inheritance

# A segment of a channel axis: (space label, width). An axis is a list of segments (a concat)
# or None (not pruned: image channels, embedding width).
_Seg = tuple[str, int]


@dataclasses.dataclass
class _Layer:
  path: tuple
  kind: str  # conv | linear | norm
  axes: tuple  # conv/linear: (in_segs, out_segs); norm: (segs,)
  producer: bool = False  # its output filters score the channels of its out space
  new_identity: bool = False  # a skip conv the base did not have: init as a selection matrix


def _walk(m: Mapping[str, Any], base_blocks: Sequence[int], image_size: int) -> dict[str, _Layer]:
  """Every prunable layer of the network ``m``, keyed by the name of its base counterpart.

  Space labels and layer names are those of the base network, so walking the base and a pruned
  network gives matching keys; decoder block ``j`` of a level with ``d`` dropped blocks is base
  block ``j + d`` (block 0 keeps its input from the level below).
  """
  chs = tuple(int(c) for c in m["channels"])
  blocks = m["num_res_blocks"]
  base_ch = tuple(m["base_channels"]) or chs
  attn_res = set(int(r) for r in m["attention_resolutions"])
  ss, updown = bool(m["use_scale_shift_norm"]), bool(m["resblock_updown"])
  layers: dict[str, _Layer] = {}

  def res(name, path, in_segs, out_w, base_skip_conv):
    in_w = sum(w for _, w in in_segs)
    h = f"h:{name}"
    layers[f"{name}.norm1"] = _Layer(path + ("norm1",), "norm", (in_segs,))
    layers[f"{name}.conv1"] = _Layer(path + ("conv1",), "conv", (in_segs, [(h, out_w)]), True)
    emb_out = [(h, out_w)] * (2 if ss else 1)
    layers[f"{name}.emb_proj"] = _Layer(path + ("emb_proj",), "linear", (None, emb_out))
    layers[f"{name}.norm2"] = _Layer(path + ("norm2",), "norm", ([(h, out_w)],))
    if base_skip_conv:
      out = f"s:{name}"
    else:
      ((out, _),) = in_segs  # identity residual: the output is the input's space
    layers[f"{name}.conv2"] = _Layer(
      path + ("conv2",), "conv", ([(h, out_w)], [(out, out_w)]), True
    )
    if base_skip_conv or in_w != out_w:
      layers[f"{name}.skip"] = _Layer(
        path + ("skip",), "conv", (in_segs, [(out, out_w)]), True, not base_skip_conv
      )
    return out

  def attn(name, path, space, w):
    qk, v = f"qk:{name}", f"v:{name}"
    layers[f"{name}.norm"] = _Layer(path + ("norm",), "norm", ([(space, w)],))
    layers[f"{name}.qkv"] = _Layer(
      path + ("qkv",), "linear", ([(space, w)], [(qk, w), (qk, w), (v, w)]), True
    )
    layers[f"{name}.proj"] = _Layer(path + ("proj",), "linear", ([(v, w)], [(space, w)]), True)

  layers["stem"] = _Layer(
    ("input_blocks", 0, "layers", 0), "conv", (None, [("s:stem", chs[0])]), True
  )
  cur, ch, hw, ib = "s:stem", chs[0], image_size, 0
  skips = [(cur, ch)]
  for lvl, w in enumerate(chs):
    for b in range(blocks[lvl]):
      ib += 1
      name = f"enc{lvl}.{b}"
      base_in = base_ch[lvl - 1] if lvl > 0 and b == 0 else base_ch[lvl]
      cur = res(name, ("input_blocks", ib, "layers", 0), [(cur, ch)], w, base_in != base_ch[lvl])
      ch = w
      if hw in attn_res:
        attn(f"{name}.attn", ("input_blocks", ib, "layers", 1), cur, ch)
      skips.append((cur, ch))
    if lvl != len(chs) - 1:
      ib += 1
      path = ("input_blocks", ib, "layers", 0)
      if updown:
        cur = res(f"down{lvl}", path, [(cur, ch)], ch, False)
      else:
        layers[f"down{lvl}"] = _Layer(
          path + ("conv",), "conv", ([(cur, ch)], [(f"s:down{lvl}", ch)]), True
        )
        cur = f"s:down{lvl}"
      hw //= 2
      skips.append((cur, ch))
  cur = res("mid.0", ("middle_block", "layers", 0), [(cur, ch)], ch, False)
  attn("mid.attn", ("middle_block", "layers", 1), cur, ch)
  cur = res("mid.1", ("middle_block", "layers", 2), [(cur, ch)], ch, False)
  ob = -1
  for lvl in reversed(range(len(chs))):
    w = chs[lvl]
    drop = base_blocks[lvl] - blocks[lvl]
    for j in range(blocks[lvl] + 1):
      ob += 1
      name = f"dec{lvl}.{j if j == 0 else j + drop}"
      path = ("output_blocks", ob, "layers")
      cur = res(name, path + (0,), [(cur, ch), skips.pop()], w, True)
      ch, k = w, 1
      if hw in attn_res:
        attn(f"{name}.attn", path + (1,), cur, ch)
        k = 2
      if lvl and j == blocks[lvl]:
        if updown:
          cur = res(f"up{lvl}", path + (k,), [(cur, ch)], ch, False)
        else:
          layers[f"up{lvl}"] = _Layer(
            path + (k, "conv"), "conv", ([(cur, ch)], [(f"s:up{lvl}", ch)]), True
          )
          cur = f"s:up{lvl}"
        hw *= 2
  layers["out_norm"] = _Layer(("out_norm",), "norm", ([(cur, ch)],))
  layers["out_conv"] = _Layer(("out_conv",), "conv", ([(cur, ch)], None))
  return layers


def _to_pure(params) -> dict:
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  return params


def _at(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _put(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


class _Selector:
  """Chooses the kept base indices of each space: whole groups (streams and ResBlock insides) or
  per-head dimensions / whole heads (attention q/k and v), by descending score."""

  def __init__(self, scores, widths, group, heads_for, head_channels, *, ranked=False):
    self.scores, self.widths, self.group = scores, widths, group
    self.heads_for, self.head_channels = heads_for, head_channels
    # ranked: kept units in descending score, not in base order (a permutation at full width).
    self._order = (lambda kept: kept) if ranked else np.sort
    self._cache: dict[tuple[str, int], np.ndarray] = {}

  def __call__(self, label: str, k: int) -> np.ndarray:
    key = (label, k)
    if key not in self._cache:
      self._cache[key] = self._select(label, k)
    return self._cache[key]

  def _select(self, label, k):
    n = self.widths[label]
    if k > n:
      raise ValueError(f"inherit_weights: space {label} has {n} channels, {k} requested")
    s = self.scores[label]
    if label.startswith(("qk:", "v:")):
      heads = self.heads_for(n)
      d = n // heads
      if self.head_channels > 0:  # whole heads of fixed size; q, k, v keep the same heads
        att = label.split(":", 1)[1]
        hs = (self.scores[f"qk:{att}"] + self.scores[f"v:{att}"]).reshape(heads, d).sum(1)
        kept = self._order(np.argsort(-hs, kind="stable")[: k // d])
        return (kept[:, None] * d + np.arange(d)[None, :]).reshape(-1)
      dk = k // heads
      per = [
        h * d + self._order(np.argsort(-s[h * d : (h + 1) * d], kind="stable")[:dk])
        for h in range(heads)
      ]
      return np.concatenate(per)
    g = self.group
    if k % g:
      raise ValueError(f"inherit_weights: width {k} of space {label} is not whole groups of {g}")
    gs = s.reshape(n // g, g).sum(1)
    kept = self._order(np.argsort(-gs, kind="stable")[: k // g])
    return (kept[:, None] * g + np.arange(g)[None, :]).reshape(-1)


def inherit_weights(
  base_params_or_model,
  base_model_config,
  structure: Structure,
  *,
  image_size: int,
  selection: str = "l1",
  seed: int = 0,
  _ranked: bool = False,
) -> dict:
  """Parameters of the pruned network, sliced from the base network's.

  Each channel space keeps its top channels by the L1 norm of the filters that produce them
  (summed over every producer of the space and over each GroupNorm group), or random ones
  (``selection="random"``, seeded); every consumer is sliced with the same indices. Removed
  blocks are the last encoder ResBlocks of a level and decoder blocks ``1..d`` of that level
  (block 0 takes the level below's output, the last one the level-entry skip), so every kept
  decoder block keeps the encoder skip it was trained with except block 0. Where the base had an
  identity residual but the pruned widths differ, the new 1x1 skip conv is the 0/1 selection
  matrix that carries the kept channels through.

  Args:
    base_params_or_model: the base ``UNet``, its ``nnx.State`` of ``nnx.Param`` or the pure dict
      (``nnx.to_pure_dict``).
    base_model_config: the base's ``config.model``.
    structure: the pruned structure (see ``structure_to_model_config``).
    image_size: input resolution in pixels (locates the attention levels).
    selection: ``"l1"``, ``"random"`` or ``"prefix"`` (each space's first channels, for a
      network already in :func:`rank_channels` order).
    seed: seeds ``"random"``.

  Returns:
    Pure dict of numpy arrays for the pruned network; load it with
    ``nnx.update(model, nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), params))`` or
    :func:`load_params`.
  """
  if selection not in _ALL_SELECTIONS:
    raise ValueError(
      f"inherit_weights: selection must be one of {_ALL_SELECTIONS}, got {selection!r}"
    )
  validate_structure(base_model_config, structure)
  base = _merged(base_model_config, {})
  group = int(base["norm_group_size"])
  if group <= 0 and any(w != 1.0 for w in structure.widths):
    raise ValueError(
      "inherit_weights: pruning widths needs model.norm_group_size > 0 (GroupNorm groups of a "
      "fixed size); with gcd(32, width) groups the kept channels would be normalised differently"
    )
  pure = _to_pure(base_params_or_model)
  pm = _merged(base_model_config, structure_to_model_config(base_model_config, structure))
  base_layers = _walk(base, base["num_res_blocks"], image_size)
  new_layers = _walk(pm, base["num_res_blocks"], image_size)

  widths: dict[str, int] = {}
  scores: dict[str, np.ndarray] = {}
  for layer in base_layers.values():
    for segs in layer.axes:
      for lab, w in segs or ():
        widths[lab] = w
        scores.setdefault(lab, np.zeros(w, np.float64))
    if layer.producer and layer.axes[1] is not None:
      kernel = np.asarray(_at(pure, layer.path)["kernel"], np.float64)
      chex.assert_axis_dimension(kernel, -1, sum(w for _, w in layer.axes[1]))
      l1 = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0)
      off = 0
      for lab, w in layer.axes[1]:
        # q and k share a space: both filters score it.
        scores[lab] = scores[lab] + l1[off : off + w]
        off += w
  if selection == "random":
    rng = np.random.default_rng(seed)
    scores = {lab: rng.random(widths[lab]) for lab in sorted(widths)}
  elif selection == "prefix":
    scores = {lab: -np.arange(widths[lab], dtype=np.float64) for lab in widths}

  hc = int(base["num_head_channels"])

  def heads_for(w):
    return w // hc if hc > 0 else int(base["num_heads"])

  select = _Selector(scores, widths, max(group, 1), heads_for, hc, ranked=_ranked)

  def axis_index(new_segs, base_segs):
    if new_segs is None:
      return None
    offs, off = {}, 0
    order = []
    for lab, w in base_segs:
      order.append((lab, off))
      off += w
    idx = []
    # Segments pair by position (a concat's h and skip); a repeated label (q, k) likewise.
    for (lab, k), (_, o) in zip(new_segs, order, strict=True):
      idx.append(o + select(lab, k))
    del offs
    return np.concatenate(idx)

  out: dict = {}
  for name, layer in new_layers.items():
    if layer.new_identity:
      ((lab_in, k_in),) = layer.axes[0]
      ((lab_out, k_out),) = layer.axes[1]
      src, dst = select(lab_in, k_in), select(lab_out, k_out)
      kernel = (src[:, None] == dst[None, :]).astype(np.float32)[None, None]
      _put(out, layer.path + ("kernel",), kernel)
      _put(out, layer.path + ("bias",), np.zeros(k_out, np.float32))
      continue
    if name not in base_layers:
      raise AssertionError(f"inherit_weights: no base layer for {name}")  # walker invariant
    bl = base_layers[name]
    p = _at(pure, bl.path)
    if layer.kind == "norm":
      idx = axis_index(layer.axes[0], bl.axes[0])
      for key in ("scale", "bias"):
        _put(out, layer.path + (key,), np.asarray(p[key])[idx])
      continue
    i_in = axis_index(layer.axes[0], bl.axes[0])
    i_out = axis_index(layer.axes[1], bl.axes[1])
    kernel = np.asarray(p["kernel"])
    if i_in is not None:
      kernel = np.take(kernel, i_in, axis=-2)
    if i_out is not None:
      kernel = np.take(kernel, i_out, axis=-1)
    _put(out, layer.path + ("kernel",), kernel)
    bias = np.asarray(p["bias"])
    _put(out, layer.path + ("bias",), bias if i_out is None else bias[i_out])
  for key in ("time_mlp1", "time_mlp2", "label_emb"):
    if key in pure:
      out[key] = jax.tree.map(np.asarray, pure[key])
  return out


def rank_channels(base_params_or_model, base_model_config, *, image_size: int) -> dict:
  """The base network with every channel space reordered by descending L1 score: the same
  function (whole GroupNorm groups move together, q and k share one order), but the channels
  ``inherit_weights(selection="l1")`` keeps at any width are now each space's first ones.

  A slimmable supernet (E6) starts from this, so each width's subnetwork is the same prefix
  (``gather_plan``) at every training step while the weights move.

  Returns:
    Pure dict of numpy arrays with the base network's tree and shapes.
  """
  return inherit_weights(
    base_params_or_model,
    base_model_config,
    base_structure(base_model_config),
    image_size=image_size,
    _ranked=True,
  )


def gather_plan(base_params_like, base_model_config, structure: Structure, *,
                image_size: int) -> dict:  # fmt: skip
  """Where each parameter of ``structure``'s prefix subnetwork comes from in the base network.

  Args:
    base_params_like: the base network's parameters (pure dict; only the tree and shapes are
      read).
    base_model_config: the base's ``config.model``.
    structure: the subnetwork.
    image_size: input resolution in pixels.

  Returns:
    The subnetwork's pure dict whose leaves are int64 arrays of indices into the concatenation
    of ``jax.tree.leaves(base params)`` (each raveled), or float32 constants where the subnetwork
    has a weight the base does not (a 0/1 skip conv where pruned widths break an identity
    residual). ``apply_plan`` gathers it.
  """
  leaves, treedef = jax.tree.flatten(_to_pure(base_params_like))
  offsets = np.cumsum([0] + [int(np.size(x)) for x in leaves])
  index = [
    np.arange(o, o + int(np.size(x)), dtype=np.int64).reshape(np.shape(x))
    for o, x in zip(offsets[:-1], leaves, strict=True)
  ]
  return inherit_weights(
    jax.tree.unflatten(treedef, index),
    base_model_config,
    structure,
    image_size=image_size,
    selection="prefix",
  )


def apply_plan(params, plan) -> dict:
  """A subnetwork's parameters gathered from the supernet's (differentiable in ``params``).

  Args:
    params: the supernet's pure dict (jax or numpy arrays), the tree ``plan`` was made for.
    plan: from ``gather_plan``.

  Returns:
    The subnetwork's pure dict of jax arrays.
  """
  leaves = jax.tree.leaves(params)
  flat = jnp.concatenate([jnp.ravel(x) for x in leaves])

  def take(p):
    p = np.asarray(p)
    return flat[p] if p.dtype.kind == "i" else jnp.asarray(p)

  return jax.tree.map(take, plan)


def uniform_structure(base: Structure, width: float) -> Structure:
  """Every level at ``width``; all blocks and attention kept (DDSM varies width only)."""
  return Structure((float(width),) * len(base.widths), base.blocks, base.attention)


def load_params(model: nnx.Module, params: Mapping) -> nnx.Module:
  """Writes a pure dict from :func:`inherit_weights` into ``model`` (in place) and returns it."""
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


# ----------------------------------------------------------------------------- baselines


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
