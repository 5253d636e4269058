"""Weight inheritance: a pruned structure's parameters sliced from its base network's.

For every channel space of the base network (a residual stream, a ResBlock's inner activation, an
attention block's q/k and v per head), the kept channels are those whose producing filters have
the largest L1 norm, in whole GroupNorm groups, and every consumer of that space is sliced with
the same indices. Spaces joined by identity residuals are one space, so a kept channel means the
same thing in every tensor that carries it. The same slicing, with the channels put in L1 order
first (``rank_channels``), gives a slimmable supernet's prefix subnetworks (``gather_plan``).
Structures themselves are ``adaptive.search_space``'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptive.search_space import (
  Structure,
  base_structure,
  model_fields,
  structure_to_model_config,
  validate_structure,
)

SELECTIONS = ("l1", "random")
# "prefix" keeps each space's first channels (first dims of every head): the selection of a
# network whose channels :func:`rank_channels` has already put in L1 order (the supernet, E6).
_ALL_SELECTIONS = (*SELECTIONS, "prefix")


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


def _channel_scores(base_layers: dict[str, _Layer], pure: dict, selection: str,
                    seed: int) -> tuple[dict[str, int], dict[str, np.ndarray]]:  # fmt: skip
  """Every channel space's width and a score per channel (kept: the highest)."""
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
  return widths, scores


def _axis_index(select: _Selector, new_segs, base_segs) -> np.ndarray | None:
  """The base indices a pruned layer keeps along one axis; None where the axis is not pruned."""
  if new_segs is None:
    return None
  off = 0
  order = []
  for lab, w in base_segs:
    order.append((lab, off))
    off += w
  idx = []
  # Segments pair by position (a concat's h and skip); a repeated label (q, k) likewise.
  for (lab, k), (_, o) in zip(new_segs, order, strict=True):
    idx.append(o + select(lab, k))
  return np.concatenate(idx)


def _sliced_layers(new_layers: dict[str, _Layer], base_layers: dict[str, _Layer], pure: dict,
                   select: _Selector) -> dict:  # fmt: skip
  """The pruned network's prunable layers, each sliced from its base counterpart."""
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
      idx = _axis_index(select, layer.axes[0], bl.axes[0])
      for key in ("scale", "bias"):
        _put(out, layer.path + (key,), np.asarray(p[key])[idx])
      continue
    i_in = _axis_index(select, layer.axes[0], bl.axes[0])
    i_out = _axis_index(select, layer.axes[1], bl.axes[1])
    kernel = np.asarray(p["kernel"])
    if i_in is not None:
      kernel = np.take(kernel, i_in, axis=-2)
    if i_out is not None:
      kernel = np.take(kernel, i_out, axis=-1)
    _put(out, layer.path + ("kernel",), kernel)
    bias = np.asarray(p["bias"])
    _put(out, layer.path + ("bias",), bias if i_out is None else bias[i_out])
  return out


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
  base = model_fields(base_model_config, {})
  group = int(base["norm_group_size"])
  if group <= 0 and any(w != 1.0 for w in structure.widths):
    raise ValueError(
      "inherit_weights: pruning widths needs model.norm_group_size > 0 (GroupNorm groups of a "
      "fixed size); with gcd(32, width) groups the kept channels would be normalised differently"
    )
  pure = _to_pure(base_params_or_model)
  pm = model_fields(base_model_config, structure_to_model_config(base_model_config, structure))
  base_layers = _walk(base, base["num_res_blocks"], image_size)
  new_layers = _walk(pm, base["num_res_blocks"], image_size)

  widths, scores = _channel_scores(base_layers, pure, selection, seed)
  hc = int(base["num_head_channels"])

  def heads_for(w):
    return w // hc if hc > 0 else int(base["num_heads"])

  select = _Selector(scores, widths, max(group, 1), heads_for, hc, ranked=_ranked)

  out = _sliced_layers(new_layers, base_layers, pure, select)
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
  plan_leaves, treedef = jax.tree.flatten(plan)
  gathered = _gather_plan_leaves(jax.tree.leaves(params), [np.asarray(p) for p in plan_leaves])
  return jax.tree.unflatten(treedef, gathered)


@jax.jit
def _gather_plan_leaves(leaves: list, plan_leaves: list) -> list:
  """``apply_plan``'s gathers as one program: called eagerly (evaluation, sampling), each leaf's
  gather was its own small compile, ~190 of them for a campaign's supernet. Inside a jitted step
  this is inlined as before."""
  flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
  return [flat[p] if jnp.issubdtype(p.dtype, jnp.integer) else p for p in plan_leaves]


def load_params(model: nnx.Module, params: Mapping) -> nnx.Module:
  """Writes a pure dict from :func:`inherit_weights` into ``model`` (in place) and returns it."""
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model
