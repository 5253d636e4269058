"""Sampling with one network per timestep group (TDC inference, spec 3.5).

Every sampler step t runs model_{group(t)}. ``routed_denoise_fn`` turns N group networks into one
``DenoiseFn`` for the existing samplers (``common.diffusion.sampling.sample`` /
``make_segment_sampler``), so respacing needs nothing special: the samplers pass the *original*
0-based timestep t = k - 1 of each level k they leave, and that is what is routed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from adaptive.grouping import Groups
from common.diffusion import sampling
from common.diffusion.sampling import DenoiseFn, Segment


def routed_denoise_fn(groups: Groups, denoise_fns: Sequence[DenoiseFn]) -> DenoiseFn:
  """One denoiser that calls ``denoise_fns[group(t)]`` through ``jax.lax.switch``.

  The whole batch goes to the group of ``t[0]``: the samplers in ``common.diffusion.sampling``
  fill t with one value per step (also for classifier-free guidance's [cond; uncond] batch of
  2B), so a scalar switch runs exactly one network per step instead of all N with a select.
  A batch mixing timesteps of different groups would be routed wrongly, which is why this is
  for sampling only; training draws t within one group per network. Under ``vmap`` over the
  batch the switch would become a select that evaluates every branch, so do not vmap it.

  Args:
    groups: the grouping (N groups).
    denoise_fns: N functions ``fn(x [B, H, W, C] float32, t [B] int32, y [B] int32 | None) ->
      [B, H, W, C'] float32``, all with the same output shape and dtype (see ``Segment``).

  Returns:
    A ``DenoiseFn`` with the same signature.

  Raises:
    ValueError: the number of functions is not N.
  """
  fns = tuple(denoise_fns)
  if len(fns) != groups.num_groups:
    raise ValueError(
      f"need one denoise_fn per group: {groups.num_groups} groups, got {len(fns)} functions"
    )
  return table_routed_denoise_fn(groups.group_of(np.arange(groups.num_timesteps)), fns)


def table_routed_denoise_fn(table, denoise_fns: Sequence[DenoiseFn]) -> DenoiseFn:
  """One denoiser that calls ``denoise_fns[table[t]]``: any map from timestep to network,
  contiguous (TDC's groups) or not (E6's per-step widths). Same batch rule as
  ``routed_denoise_fn``: the whole batch goes to the network of ``t[0]``.

  Args:
    table: [T] ints in [0, len(denoise_fns)), the network of every 0-based timestep.
    denoise_fns: the networks, all with the same output shape and dtype.

  Raises:
    ValueError: a table entry without a network.
  """
  fns = tuple(denoise_fns)
  table = np.asarray(table, np.int32)
  if table.ndim != 1 or table.size == 0 or table.min() < 0 or table.max() >= len(fns):
    raise ValueError(f"table must be [T] indices into {len(fns)} networks, got {table}")
  table_jnp = jnp.asarray(table)

  def routed(x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
    chex.assert_rank(t, 1)
    chex.assert_axis_dimension(x, 0, t.shape[0])
    if len(fns) == 1:
      return fns[0](x, t, y)
    return jax.lax.switch(table_jnp[t[0]], fns, x, t, y)

  return routed


def sampler_timesteps(config) -> np.ndarray:
  """[S] 0-based model timesteps the configured sampler calls, in calling order."""
  levels = sampling.make_levels(int(config.diffusion.num_timesteps), config.diffusion.sample_steps)
  return np.asarray(levels[:-1]) - 1


def group_segments(groups: Groups, denoise_fns: Sequence[DenoiseFn]) -> list[Segment]:
  """One ``Segment`` per group in sampling order (group N-1 from level T first, group 0 last).

  Segment of group g runs levels t_hi + 1 -> t_lo, i.e. calls its network exactly at the group's
  timesteps. With ``steps_per_segment = [s.k_start - s.k_end for s in segments]`` (every level)
  ``sample_segmented`` reproduces ``sample(routed_denoise_fn(...), num_steps=T)`` exactly. With
  fewer steps, ``make_levels`` spaces each segment's grid on its own, which is not the single
  respaced chain of ``sample``; use ``routed_denoise_fn`` for respaced sampling.

  Args:
    groups: the grouping.
    denoise_fns: N denoisers indexed by group.

  Returns:
    N segments, contiguous from level T down to level 0.
  """
  if len(denoise_fns) != groups.num_groups:
    raise ValueError(
      f"need one denoise_fn per group: {groups.num_groups} groups, got {len(denoise_fns)} functions"
    )
  return [
    Segment(denoise_fns[g], *groups.level_range(g)) for g in reversed(range(groups.num_groups))
  ]


@dataclasses.dataclass(frozen=True)
class SamplingFlops:
  """FLOPs of one sample's reverse chain (per model evaluation of one example, no CFG doubling).

  Attributes:
    total: sum over the sampler's steps of FLOPs(group(t)).
    base: the same number of steps with the base model, num_steps * base_flops.
    ratio: total / base.
    steps_per_group: [N] model calls per group.
  """

  total: float
  base: float
  ratio: float
  steps_per_group: tuple[int, ...]


def sampling_flops(
  groups: Groups,
  flops_per_group: Sequence[float],
  *,
  base_flops: float,
  levels: Sequence[int] | np.ndarray | None = None,
  timesteps: Sequence[int] | np.ndarray | None = None,
) -> SamplingFlops:
  """Sampling FLOPs over the sampler's actual model timesteps (spec 3.3 (a)).

  Give exactly one of ``levels`` (a level grid, e.g. ``make_levels(T, num_steps)``: the model
  runs at t = k - 1 for every level k it leaves, i.e. all but the last) or ``timesteps`` (the
  0-based model timesteps, e.g. ``space_timesteps(T, num_steps)``). Both name the same calls:
  ``levels=make_levels(T, n)`` equals ``timesteps=space_timesteps(T, [n])``.

  Args:
    groups: the grouping.
    flops_per_group: N FLOPs per model evaluation, indexed by group (``flops_budgets``).
    base_flops: F, the base model's FLOPs per evaluation (> 0).
    levels: [S + 1] ints, strictly decreasing in [0, T].
    timesteps: [S] ints in [0, T).

  Returns:
    SamplingFlops.

  Raises:
    ValueError: both or neither of levels / timesteps, a bad grid, or len(flops_per_group) != N.
  """
  f = np.asarray(flops_per_group, np.float64)
  if f.shape != (groups.num_groups,):
    raise ValueError(
      f"need {groups.num_groups} flops_per_group (one per group), got shape {f.shape}"
    )
  if not base_flops > 0:
    raise ValueError(f"base_flops must be > 0, got base_flops={base_flops!r}")
  if (levels is None) == (timesteps is None):
    raise ValueError("give exactly one of levels or timesteps")
  if levels is not None:
    lv = np.asarray(levels)
    if lv.ndim != 1 or lv.shape[0] < 2 or np.any(np.diff(lv) >= 0):
      raise ValueError(f"levels must be 1-D, strictly decreasing, >= 2 entries; got {lv}")
    if lv[0] > groups.num_timesteps or lv[-1] < 0:
      raise ValueError(f"levels must lie in [0, T={groups.num_timesteps}], got {lv}")
    t = lv[:-1].astype(np.int64) - 1
  else:
    t = np.asarray(timesteps)
    if t.ndim != 1 or t.size == 0:
      raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {t.shape}")
  g = groups.group_of(t)
  total = float(np.sum(f[g]))
  base = float(t.shape[0] * base_flops)
  counts = np.bincount(g, minlength=groups.num_groups)
  return SamplingFlops(total, base, total / base, tuple(int(c) for c in counts))
