"""TFDiff's core block (``mobile.model.CoreBlock``) in PyTorch, for ``benchmarks/vs_pytorch.py``.

adaLN-Zero (DiT): ``(shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))``, then
``h = x + gate1 * MHSA(LN(x) (1 + scale1) + shift1)`` and
``y = h + gate2 * FFN(LN(h) (1 + scale2) + shift2)`` with ``FFN = Linear(D, rD) -> depthwise
3x3 -> GELU (tanh, jax.nn.gelu's default) -> Linear(rD, D)``; the LayerNorm has no parameters
(eps 1e-6). ``conditioning="add"`` and linear attention are ported too. Names follow the Flax
block, so ``torch_unet.load_jax_params`` copies one block's JAX parameters in.

The block works on [B, h, w, D] as the JAX one (channels last); only the depthwise conv goes
through NCHW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LN_EPS = 1e-6  # mobile.layers._LN_EPS


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
  return F.layer_norm(x, x.shape[-1:], eps=_LN_EPS)


def _modulate(x, shift, scale):
  return x * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]


class DepthwiseConv3x3(nn.Module):
  """Depthwise 3x3, stride 1, zero padding 1, with bias: [B, h, w, C] -> [B, h, w, C].

  ``weight`` [C, 1, 3, 3] is the JAX module's ``kernel`` [3, 3, 1, C] in PyTorch's layout.
  """

  def __init__(self, channels: int):
    super().__init__()
    self.channels = channels
    # The JAX init: fan-in (9) truncated normal of variance 1 / 9.
    self.weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(channels, 1, 3, 3), std=1 / 3))
    self.bias = nn.Parameter(torch.zeros(channels))

  def forward(self, x):
    y = F.conv2d(x.permute(0, 3, 1, 2), self.weight, self.bias, padding=1, groups=self.channels)
    return y.permute(0, 2, 3, 1)


class CoreBlock(nn.Module):
  """``mobile.model.CoreBlock`` for a ``mobile.spec.TFDiffSpec``.

  ``forward(x [B, h, w, D] float32, c [B, D_c] float32) -> [B, h, w, D]``.
  """

  def __init__(self, spec):
    super().__init__()
    d, dc, rd = spec.width, spec.d_cond, spec.mlp_ratio * spec.width
    self.num_heads = spec.num_heads
    self.attention = spec.attention
    self.conditioning = spec.conditioning
    self.modulation = nn.Linear(dc, 6 * d if spec.conditioning == "adaln" else d)
    self.qkv = nn.Linear(d, 3 * d)
    self.proj = nn.Linear(d, d)
    self.fc1 = nn.Linear(d, rd)
    self.dwconv = DepthwiseConv3x3(rd) if spec.ffn_dwconv else None
    self.fc2 = nn.Linear(rd, d)
    if spec.conditioning == "adaln":
      nn.init.zeros_(self.modulation.weight)  # adaLN-Zero: the block starts as the identity
    else:
      nn.init.zeros_(self.proj.weight)
      nn.init.zeros_(self.fc2.weight)
    for lin in (self.modulation, self.qkv, self.proj, self.fc1, self.fc2):
      nn.init.zeros_(lin.bias)

  def _attend(self, x):
    b, hh, ww, d = x.shape
    n, dh, length = self.num_heads, d // self.num_heads, hh * ww
    q, k, v = self.qkv(x.reshape(b, length, d)).chunk(3, dim=-1)
    q, k, v = (a.reshape(b, length, n, dh).transpose(1, 2) for a in (q, k, v))  # [B, n, L, dh]
    if self.attention == "full":
      out = F.scaled_dot_product_attention(q, k, v)
    else:
      q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
      kv = torch.einsum("bhkd,bhke->bhde", k, v)
      norm = torch.einsum("bhqd,bhd->bhq", q, k.sum(dim=2))
      out = torch.einsum("bhqd,bhde->bhqe", q, kv) / norm[..., None]
    return self.proj(out.transpose(1, 2).reshape(b, length, d)).reshape(b, hh, ww, d)

  def _ffn(self, x):
    h = self.fc1(x)
    if self.dwconv is not None:
      h = self.dwconv(h)
    return self.fc2(F.gelu(h, approximate="tanh"))

  def forward(self, x, c):
    mod = self.modulation(F.silu(c))
    if self.conditioning == "adaln":
      shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
      x = x + gate1[:, None, None, :] * self._attend(_modulate(_layer_norm(x), shift1, scale1))
      h = _modulate(_layer_norm(x), shift2, scale2)
      return x + gate2[:, None, None, :] * self._ffn(h)
    x = x + mod[:, None, None, :]
    x = x + self._attend(_layer_norm(x))
    return x + self._ffn(_layer_norm(x))
