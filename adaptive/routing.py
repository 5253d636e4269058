"""Sampling with one network per timestep group (TDC inference, spec 3.5).

Every sampler step t runs model_{group(t)}. TDC's chain is one segment per group over the
sampler's one (respaced) grid (``group_segments``, run by the core's ``sampling.sample_chain``;
uniform or DDIM, ``diffusion.timestep_spacing``: the segments split that grid where a step's group
changes, so their boundaries are always on it);
``routed_denoise_fn`` is the same routing as one denoiser, for callers that evaluate a network at
given timesteps (held-out losses). Respacing needs nothing special: the chain passes the
*original* 0-based timestep t = k - 1 of each level k it leaves, and that is what is routed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from adaptive.grouping import Groups
from common.diffusion import sampling
from common.diffusion.sampling import DenoiseFn, Segment
from common.train.method import timestep_spacing


def _one_per_group(groups: Groups, denoise_fns: Sequence[DenoiseFn]) -> tuple[DenoiseFn, ...]:
  fns = tuple(denoise_fns)
  if len(fns) != groups.num_groups:
    raise ValueError(
      f"need one denoise_fn per group: {groups.num_groups} groups, got {len(fns)} functions"
    )
  return fns


def routed_denoise_fn(groups: Groups, denoise_fns: Sequence[DenoiseFn]) -> DenoiseFn:
  """One denoiser that calls ``denoise_fns[group(t)]``: the core's routing by level
  (``sampling.routed_denoise_fn``, one ``lax.switch``) over the group table.

  For a batch of one timestep (the chain's steps, the held-out losses); the whole batch goes to
  the group of ``t[0]``.

  Raises:
    ValueError: the number of functions is not N.
  """
  fns = _one_per_group(groups, denoise_fns)
  return sampling.routed_denoise_fn(groups.group_of(np.arange(groups.num_timesteps)), fns)


def sampler_timesteps(config) -> np.ndarray:
  """[S] 0-based model timesteps the configured sampler calls, in calling order (on the grid of
  ``diffusion.timestep_spacing``: the groups route whichever grid the chain runs)."""
  levels = sampling.make_levels(
    int(config.diffusion.num_timesteps),
    config.diffusion.sample_steps,
    spacing=timestep_spacing(config),
  )
  return np.asarray(levels[:-1]) - 1


def group_segments(
  groups: Groups, denoise_fns: Sequence[DenoiseFn], levels: Sequence[int] | np.ndarray
) -> list[Segment]:
  """TDC's chain (spec 3.5) over one level grid: one ``Segment`` per group the grid visits, in
  sampling order (group N-1 from level T first, group 0 last).

  The segment of group g takes the grid's steps whose model timestep ``t = k - 1`` lies in the
  group, so a respaced grid is the single respaced chain (a boundary between two groups falls on
  the grid level where the step's group changes), and ``sampling.sample_chain`` over these
  segments runs exactly the network of each step's group.

  Args:
    groups: the grouping.
    denoise_fns: N denoisers indexed by group.
    levels: the chain's grid, strictly decreasing, ending at 0 (``make_levels``).

  Returns:
    Contiguous segments from levels[0] down to levels[-1], one per group visited.
  """
  denoise_fns = _one_per_group(groups, denoise_fns)
  grid = np.asarray(levels)
  step_group = groups.group_of(grid[:-1].astype(np.int64) - 1)
  segments, start = [], 0
  for i in range(1, len(step_group) + 1):
    if i == len(step_group) or step_group[i] != step_group[start]:
      g = int(step_group[start])
      segments.append(Segment(denoise_fns[g], int(grid[start]), int(grid[i]), side=f"group{g}"))
      start = i
  return segments


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
