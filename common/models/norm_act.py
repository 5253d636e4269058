"""GroupNorm, an optional scale-shift (FiLM) and SiLU as one op, with a hand-written backward
for XLA:CPU.

``group_norm_act(norm, x, scale, shift)`` computes ``silu(norm(x) * (1 + scale) + shift)`` with
exactly ``nnx.GroupNorm``'s forward (its fast variance, clipped at zero, and its order of
operations). The forward is the same on every backend; the backward differs:

* Accelerators: JAX's own derivative of that forward (XLA fuses it well there).
* XLA:CPU: ``jax.custom_vjp`` with the textbook GroupNorm gradient. Autodiff of the forward gives
  XLA:CPU a graph it splits into one loop fusion per reduction, each recomputing the
  normalisation and the sigmoid from the input and re-reading [B, H, W, C] tensors; with the
  scale-shift that made five to seven passes. The hand-written backward needs two per-(sample,
  channel) sums over H x W (of ``dz`` and ``dz * x_hat``), from which every gradient follows, then
  one elementwise pass for ``dx``. Alone, on [64, 32, 32, 128] float32, forward + backward took
  46.8 ms against 63.9 ms, and the shapes train step 0.973x autodiff's on a quiet machine
  (``benchmarks/fused_norm.py``; ``benchmarks/RESULTS.md``, "GroupNorm's backward"); the
  gradients agree with autodiff's to float32 rounding (``tests/common/test_norm_act.py``).

``SEGDIFF_FUSED_NORM=0`` keeps autodiff's backward on the CPU too (for A/B timings).
"""

from __future__ import annotations

import functools
import os

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def hand_written_backward() -> bool:
  """Whether ``group_norm_act`` differentiates through the hand-written backward: on XLA:CPU,
  unless ``SEGDIFF_FUSED_NORM=0``. Read at trace time."""
  return jax.default_backend() == "cpu" and os.environ.get("SEGDIFF_FUSED_NORM", "1") != "0"


def _per_channel(v: jax.Array) -> jax.Array:
  """[B, C] -> [B, 1, 1, C]."""
  return v[:, None, None, :]


def _stats(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
  """Per-(sample, channel) mean and variance of their group: [B, H, W, C] -> two [B, C].
  ``nnx.GroupNorm``'s arithmetic: E[x^2] - E[x]^2, clipped at zero."""
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  mean = xg.mean((1, 2, 4))
  mean2 = (xg * xg).mean((1, 2, 4))
  var = jnp.maximum(0.0, mean2 - mean * mean)
  return jnp.repeat(mean, c // groups, axis=1), jnp.repeat(var, c // groups, axis=1)


def _forward(x, gamma, beta, scale, shift, groups, eps, act, film):
  """The op's value and what the backward needs. Shapes as ``_fused``. Without ``film`` the
  scale and shift are not applied at all: the same operations, and FLOPs, as the unfused norm."""
  mean, var = _stats(x, groups)
  rstd = lax.rsqrt(var + eps)
  z = (x - _per_channel(mean)) * _per_channel(rstd * gamma) + beta
  if film:
    z = z * (1.0 + _per_channel(scale)) + _per_channel(shift)
  return (jax.nn.silu(z) if act else z), (x, mean, rstd, gamma, beta, scale, shift)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused(x, gamma, beta, scale, shift, groups: int, eps: float, act: bool, film: bool):
  """x [B, H, W, C] float32, gamma / beta [C], scale / shift [B, C] -> [B, H, W, C] float32."""
  return _forward(x, gamma, beta, scale, shift, groups, eps, act, film)[0]


def _fused_bwd(groups, eps, act, film, res, g):
  del eps  # folded into the saved rstd
  x, mean, rstd, gamma, beta, scale, shift = res
  b, h, w, c = x.shape
  s1 = 1.0 + scale if film else jnp.ones_like(scale)
  x_hat = (x - _per_channel(mean)) * _per_channel(rstd)
  if act:
    y = x_hat * gamma + beta
    z = y * _per_channel(s1) + _per_channel(shift) if film else y
    sig = jax.nn.sigmoid(z)
    dz = g * sig * (1.0 + z * (1.0 - sig))
  else:
    dz = g
  # Every gradient is a function of these two [B, C] sums.
  sum_dz = dz.sum((1, 2))
  sum_dz_xhat = (dz * x_hat).sum((1, 2))
  k = s1 * gamma  # d z / d x_hat, per (sample, channel)
  n = h * w * (c // groups)

  def group_mean(v):  # [B, C] -> the mean over each channel's group, [B, C]
    return jnp.repeat(v.reshape(b, groups, -1).sum(-1), c // groups, axis=1) / n

  mean_dxhat = group_mean(k * sum_dz)
  mean_dxhat_xhat = group_mean(k * sum_dz_xhat)
  dx = _per_channel(rstd) * (
    dz * _per_channel(k) - _per_channel(mean_dxhat) - x_hat * _per_channel(mean_dxhat_xhat)
  )
  d_gamma = (s1 * sum_dz_xhat).sum(0)
  d_beta = (s1 * sum_dz).sum(0)
  d_scale = gamma * sum_dz_xhat + beta * sum_dz  # sum over H x W of dz * y
  return dx, d_gamma, d_beta, d_scale, sum_dz


_fused.defvjp(_forward, _fused_bwd)  # _forward already returns the residuals


def _varying_axes(a: jax.Array) -> frozenset:
  """The manual mesh axes ``a`` varies over inside ``shard_map`` (none outside)."""
  return getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", frozenset())


def _varying_like(x: jax.Array, args: tuple) -> tuple:
  """``args`` made to vary over every manual axis ``x`` varies over. Inside ``shard_map`` (collab's
  clients) a custom VJP's cotangents must have their primals' types; the weights and the zero
  FiLM terms are not split where ``x`` is, but their gradients, sums over ``x``'s shard, are.
  ``pcast`` here makes the primals match, and its own transpose sums the gradients over those axes
  outside the custom VJP, as autodiff does for the unfused norm."""
  want = _varying_axes(x)
  out = []
  for a in args:
    missing = tuple(sorted(want - _varying_axes(a)))
    out.append(lax.pcast(a, missing, to="varying") if missing else a)
  return tuple(out)


def group_norm_act(
  norm: nnx.GroupNorm,
  x: jax.Array,
  scale: jax.Array | None = None,
  shift: jax.Array | None = None,
  *,
  act: bool = True,
) -> jax.Array:
  """``silu(norm(x) * (1 + scale) + shift)`` (``act=False``: without the SiLU).

  Args:
    norm: the ``nnx.GroupNorm`` whose parameters, groups and epsilon are used (with scale and
      bias; its ``dtype`` must be float32, as the U-Net's are).
    x: [B, H, W, C], any float dtype; computed in float32.
    scale, shift: [B, 1, 1, C] or [B, C] per-sample FiLM terms, or None (zero).

  Returns:
    [B, H, W, C] float32, equal to the unfused composition's value on every backend.
  """
  chex.assert_rank(x, 4)
  b, c = x.shape[0], x.shape[-1]
  chex.assert_shape(norm.scale[...], (c,))
  x32 = x.astype(jnp.float32)
  film = scale is not None or shift is not None
  zero = jnp.zeros((b, c), jnp.float32)
  scale = zero if scale is None else scale.reshape(b, c).astype(jnp.float32)
  shift = zero if shift is None else shift.reshape(b, c).astype(jnp.float32)
  gamma = norm.scale[...].astype(jnp.float32)
  beta = norm.bias[...].astype(jnp.float32)
  operands = (gamma, beta, scale, shift)
  static = (norm.num_groups, float(norm.epsilon), act, film)
  if hand_written_backward():
    return _fused(x32, *_varying_like(x32, operands), *static)
  return _forward(x32, *operands, *static)[0]
