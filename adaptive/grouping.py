"""Timestep groups for TDC Training (arXiv 2312.13307, spec ``adaptive.md`` sections 2, 3.2, 3.3).

A group is a contiguous interval of 0-based model timesteps t in {0..T-1} (the network's input for
the reverse step from level t + 1 to level t; see ``common.diffusion.gaussian``). SNR_dB falls
strictly with t, so every SNR interval is a t interval, and group 0 always holds the smallest t
(highest SNR, least noise).

**Cut points.** ``Groups.cuts`` holds N - 1 ints c_1 < ... < c_{N-1}: c_g is the first 0-based
model timestep of group g, so group g is t in [c_g, c_{g+1} - 1] with c_0 = 0, c_N = T, and its
size is c_{g+1} - c_g. In the spec's 1-based timestep (IDDPM's paper t = level k = t + 1, the
convention under which the spec quotes "SNR_dB = +50.1 at t=1") the same number c_g is the *last*
timestep of group g - 1. Both readings give the table of spec 3.2: T=4000, N=4 -> cuts 754, 1984,
3213, sizes 754/1230/1229/787 (group 0 = 0-based t 0..753 = 1-based t 1..754).

**snr_equal_db bins.** With edges e_0 = clip_hi > e_1 > ... > e_N = clip_lo equally spaced in dB,
timestep t belongs to the group g with e_{g+1} <= clip(SNR_dB(t)) < e_g (group 0 also takes
SNR_dB >= clip_hi, the last group everything below e_{N-1}). A timestep exactly on an edge goes to
the higher-SNR group. Hence c_g = #{t : SNR_dB(t) >= e_g}, the first t whose SNR_dB is below e_g.

FLOPs allocation (spec 3.3): FLOPs_g(i) = (i/N + (N - i)/N * k) * F for rank i of group g.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import chex
import numpy as np

from common.diffusion import schedules
from common.diffusion.gaussian import GaussianDiffusion

METHODS = ("snr_equal_db", "uniform_t", "task_affinity_dp", "random")
DP_COSTS = ("log_snr", "timestep", "cosine")
FULL_MODEL_ENDS = ("high_snr", "low_snr")

# Spec 3.2 [O]: equal dB bins over the full cosine range are degenerate (the clipped last beta
# sends SNR_dB to -98 at t = T - 1), so the default bins cover [-20, +20] dB only.
DEFAULT_CLIP_DB = (-20.0, 20.0)

_DB_PER_NEPER = 10.0 / math.log(10.0)


def snr_db(diffusion: GaussianDiffusion) -> np.ndarray:
  """SNR_dB(t) = 10 log10(abar_t / (1 - abar_t)) per 0-based model timestep.

  Computed from log-SNR (log1p) on the host in float64 so the high-SNR end keeps its digits.

  Args:
    diffusion: the schedule (T = diffusion.num_timesteps).

  Returns:
    [T] float64, strictly decreasing; entry t is the SNR of level t + 1.
  """
  abar = diffusion.np_alpha_bar_levels()[1:]
  return _DB_PER_NEPER * schedules.log_snr(abar)


def _check_num_groups(num_groups: int, num_timesteps: int) -> int:
  if (
    isinstance(num_groups, bool)
    or int(num_groups) != num_groups
    or not 1 <= num_groups <= num_timesteps
  ):
    raise ValueError(
      f"num_groups must be an integer in [1, T={num_timesteps}], got num_groups={num_groups!r}"
    )
  return int(num_groups)


@dataclasses.dataclass(frozen=True)
class Groups:
  """N contiguous, non-empty intervals of model timesteps covering {0..T-1}; group 0 = smallest t.

  Hashable and static (plain ints), so it can be closed over by jitted code.

  Attributes:
    cuts: N - 1 strictly increasing ints in (0, T): cuts[g - 1] is the first timestep of group g
      (see the module docstring for the 1-based reading).
    num_timesteps: T.
  """

  cuts: tuple[int, ...]
  num_timesteps: int

  def __post_init__(self):
    t_count = self.num_timesteps
    if isinstance(t_count, bool) or int(t_count) != t_count or t_count < 1:
      raise ValueError(f"num_timesteps must be an integer >= 1, got num_timesteps={t_count!r}")
    cuts = tuple(int(c) for c in self.cuts)
    if any(c != orig for c, orig in zip(cuts, self.cuts, strict=True)):
      raise ValueError(f"cuts must be integers, got cuts={self.cuts!r}")
    bounds = (0, *cuts, t_count)
    if any(b >= a for b, a in zip(bounds[:-1], bounds[1:], strict=True)) or len(cuts) >= t_count:
      raise ValueError(
        f"cuts must be strictly increasing within (0, T={t_count}) so every group is non-empty, "
        f"got cuts={self.cuts!r}"
      )
    object.__setattr__(self, "cuts", cuts)
    object.__setattr__(self, "num_timesteps", int(t_count))

  @property
  def num_groups(self) -> int:
    """N."""
    return len(self.cuts) + 1

  @property
  def boundaries(self) -> np.ndarray:
    """[N + 1] int64: 0, cuts..., T; group g is boundaries[g] <= t < boundaries[g + 1]."""
    return np.asarray((0, *self.cuts, self.num_timesteps), np.int64)

  @property
  def intervals(self) -> list[tuple[int, int]]:
    """Per group (t_lo, t_hi), both inclusive, 0-based model timesteps."""
    b = self.boundaries
    return [(int(b[g]), int(b[g + 1]) - 1) for g in range(self.num_groups)]

  @property
  def sizes(self) -> np.ndarray:
    """[N] int64 timesteps per group."""
    return np.diff(self.boundaries)

  def level_range(self, g: int) -> tuple[int, int]:
    """(k_start, k_end) of the levels group g's network leaves: t_hi + 1 down to t_lo.

    A ``Segment(fn, k_start, k_end)`` calls its denoiser exactly at t in [t_lo, t_hi].
    """
    lo, hi = self.intervals[g]
    return hi + 1, lo

  def group_of(self, t: np.ndarray | Sequence[int] | int) -> np.ndarray:
    """Group index of each timestep, on the host.

    Args:
      t: int or [...] ints in [0, T).

    Returns:
      [...] int64 in [0, N).

    Raises:
      ValueError: a timestep outside [0, T).
    """
    t = np.asarray(t)
    if t.size and (t.dtype.kind not in "iu" or t.min() < 0 or t.max() >= self.num_timesteps):
      raise ValueError(
        f"timesteps must be integers in [0, T={self.num_timesteps}), got {t.dtype} values in "
        f"[{t.min()}, {t.max()}]"
      )
    return np.searchsorted(np.asarray(self.cuts, np.int64), t, side="right").astype(np.int64)

  def snr_range(self, diffusion: GaussianDiffusion) -> np.ndarray:
    """Per group (SNR_dB at t_lo, SNR_dB at t_hi), i.e. (highest, lowest) dB of the group.

    Args:
      diffusion: the schedule the groups were made for (same T).

    Returns:
      [N, 2] float64.
    """
    _check_same_t(self, diffusion)
    db = snr_db(diffusion)
    return np.asarray([(db[lo], db[hi]) for lo, hi in self.intervals], np.float64)

  @classmethod
  def from_assignment(cls, group_ids: np.ndarray) -> Groups:
    """Groups from a per-timestep group id that must be 0, ..., N-1 in non-decreasing runs.

    Args:
      group_ids: [T] ints.

    Raises:
      ValueError: ids that are not contiguous runs 0, 1, ..., N-1 in order (an empty group).
    """
    ids = np.asarray(group_ids)
    chex.assert_rank(ids, 1)
    steps = np.diff(ids)
    if ids.size == 0 or ids[0] != 0 or np.any((steps != 0) & (steps != 1)):
      raise ValueError(
        f"group ids must run 0, 1, ..., N-1 in contiguous non-empty blocks, got {ids.tolist()}"
      )
    return cls(tuple(int(c) for c in np.flatnonzero(steps) + 1), ids.shape[0])


def _check_same_t(groups: Groups, diffusion: GaussianDiffusion) -> None:
  if groups.num_timesteps != diffusion.num_timesteps:
    raise ValueError(
      f"groups cover T={groups.num_timesteps} timesteps but the diffusion has "
      f"T={diffusion.num_timesteps}"
    )


# ------------------------------------------------------------------------------------------------
# Grouping methods.


def _snr_equal_db(
  diffusion: GaussianDiffusion,
  num_groups: int,
  clip_lo: float | None = DEFAULT_CLIP_DB[0],
  clip_hi: float | None = DEFAULT_CLIP_DB[1],
) -> Groups:
  db = snr_db(diffusion)
  lo = float(db[-1]) if clip_lo is None else float(clip_lo)
  hi = float(db[0]) if clip_hi is None else float(clip_hi)
  if not lo < hi:
    raise ValueError(f"snr_equal_db needs clip_lo < clip_hi, got clip_lo={lo!r}, clip_hi={hi!r}")
  edges = np.linspace(hi, lo, num_groups + 1)
  # Counting the interior edges above each value is the bin index after clipping to [lo, hi];
  # ">= edge stays in the upper group" is the tie rule the module docstring documents.
  ids = np.sum(db[:, None] < edges[None, 1:-1], axis=1)
  counts = np.bincount(ids, minlength=num_groups)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    g = int(empty[0])
    raise ValueError(
      f"snr_equal_db: bin {g} ({edges[g]:.3f} to {edges[g + 1]:.3f} dB) holds no timestep with "
      f"num_groups={num_groups}, T={diffusion.num_timesteps}, clip=[{lo}, {hi}] dB; use fewer "
      "groups, a larger T or a narrower clip range"
    )
  return Groups.from_assignment(ids)


def _uniform_t(num_timesteps: int, num_groups: int) -> Groups:
  # Near-equal sizes, the first T mod N groups one larger (space_timesteps' section rule).
  base, extra = divmod(num_timesteps, num_groups)
  sizes = [base + (1 if g < extra else 0) for g in range(num_groups)]
  return Groups(tuple(int(c) for c in np.cumsum(sizes)[:-1]), num_timesteps)


def _random(num_timesteps: int, num_groups: int, seed: int = 0) -> Groups:
  rng = np.random.default_rng(seed)
  # N - 1 distinct cuts among 1..T-1: every such set is equally likely and no group is empty.
  cuts = np.sort(rng.choice(num_timesteps - 1, size=num_groups - 1, replace=False) + 1)
  return Groups(tuple(int(c) for c in cuts), num_timesteps)


def _centre(lo: np.ndarray, hi_excl: np.ndarray) -> np.ndarray:
  """The interval's median element lo + len // 2 (LucasYFL/Multistage_Diffusion's ``arr[len//2]``)."""
  return lo + (hi_excl - lo) // 2


def _line_cost_fn(x: np.ndarray):
  """cost(lo, j) = sum_{t=lo}^{j-1} |x_t - x_centre| for monotone x, O(1) per interval."""
  prefix = np.concatenate([[0.0], np.cumsum(x)])
  decreasing = x.shape[0] > 1 and x[-1] < x[0]

  def cost(lo: np.ndarray, j: int) -> np.ndarray:
    c = _centre(lo, j)
    below = prefix[c] - prefix[lo] - (c - lo) * x[c]  # sum over lo <= t < c of x_t - x_c
    above = prefix[j] - prefix[c + 1] - (j - c - 1) * x[c]  # sum over c < t < j of x_t - x_c
    # Monotone x fixes the sign of each half, so |.| needs no per-element pass.
    return below - above if decreasing else above - below

  return cost


def _cosine_cost_fn(features: np.ndarray):
  """cost(lo, j) = sum_{t=lo}^{j-1} (1 - cos(f_t, f_centre)), via per-column prefix sums."""
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  unit = features / np.maximum(norms, 1e-30)
  dissim = 1.0 - unit @ unit.T  # [T, T]
  prefix = np.concatenate([np.zeros((1, dissim.shape[1])), np.cumsum(dissim, axis=0)])

  def cost(lo: np.ndarray, j: int) -> np.ndarray:
    c = _centre(lo, j)
    return prefix[j, c] - prefix[lo, c]

  return cost


def _interval_dp(num_timesteps: int, num_groups: int, cost) -> tuple[tuple[int, ...], float]:
  """Optimal contiguous partition of {0..T-1} into N non-empty intervals; O(N T^2)."""
  t_count, n = num_timesteps, num_groups
  best = np.full((n + 1, t_count + 1), np.inf)
  arg = np.zeros((n + 1, t_count + 1), np.int64)
  best[0, 0] = 0.0
  for g in range(1, n + 1):
    # best[g, j]: the first j timesteps in g groups; the last group is [i, j) with i >= g - 1.
    for j in range(g, t_count - (n - g) + 1):
      i = np.arange(g - 1, j)
      total = best[g - 1, i] + cost(i, j)
      m = int(np.argmin(total))
      best[g, j], arg[g, j] = total[m], i[m]
  cuts = []
  j = t_count
  for g in range(n, 1, -1):
    j = int(arg[g, j])
    cuts.append(j)
  return tuple(reversed(cuts)), float(best[n, t_count])


def _task_affinity_dp(
  diffusion: GaussianDiffusion,
  num_groups: int,
  cost: str | None = None,
  features: np.ndarray | None = None,
) -> Groups:
  t_count = diffusion.num_timesteps
  cost_name = ("cosine" if features is not None else "log_snr") if cost is None else cost
  if cost_name not in DP_COSTS:
    raise ValueError(f"unknown cost={cost_name!r} for task_affinity_dp; allowed: {DP_COSTS}")
  if (cost_name == "cosine") != (features is not None):
    raise ValueError(
      f"task_affinity_dp: features are used by cost='cosine' only and it needs them; got "
      f"cost={cost_name!r} with features={'given' if features is not None else None}"
    )
  return Groups(
    _interval_dp(t_count, num_groups, dp_cost_fn(diffusion, cost_name, features))[0], t_count
  )


def dp_cost_fn(
  diffusion: GaussianDiffusion, cost: str = "log_snr", features: np.ndarray | None = None
):
  """The interval cost that ``task_affinity_dp`` minimises (summed over groups).

  For an interval [lo, j) with centre c = lo + (j - lo) // 2 (its median element):
  "log_snr": sum_t |log SNR(t) - log SNR(c)| (natural log; LucasYFL/Multistage_Diffusion's
  ``snr_cost``); "timestep": sum_t |t - c|; "cosine": sum_t (1 - cos(f_t, f_c)) for a per-timestep
  feature matrix (e.g. flattened loss gradients, Go et al.'s gradient affinity).

  Args:
    diffusion: the schedule.
    cost: "log_snr" | "timestep" | "cosine".
    features: [T, D] float, only for "cosine".

  Returns:
    cost(lo [M] int, j int) -> [M] float64 costs of the intervals [lo_m, j).
  """
  t_count = diffusion.num_timesteps
  if cost == "log_snr":
    return _line_cost_fn(schedules.log_snr(diffusion.np_alpha_bar_levels()[1:]))
  if cost == "timestep":
    return _line_cost_fn(np.arange(t_count, dtype=np.float64))
  if cost == "cosine":
    if features is None:
      raise ValueError("cost='cosine' needs features [T, D]")
    feats = np.asarray(features, np.float64)
    if feats.ndim != 2 or feats.shape[0] != t_count:
      raise ValueError(f"features must be [T={t_count}, D], got shape {feats.shape}")
    if not np.all(np.isfinite(feats)):
      raise ValueError("features must be finite")
    return _cosine_cost_fn(feats)
  raise ValueError(f"unknown cost={cost!r}; allowed: {DP_COSTS}")


def make_groups(
  diffusion: GaussianDiffusion, num_groups: int, method: str = "snr_equal_db", **options
) -> Groups:
  """Cuts the model timesteps {0..T-1} into N contiguous groups, group 0 = highest SNR.

  Methods and their options:
    "snr_equal_db" (clip_lo=-20.0, clip_hi=20.0): equal-width SNR_dB bins over [clip_lo, clip_hi]
      (None = the schedule's own end), values outside clipped into the end bins (spec 3.2's
      default; the tie rule is in the module docstring).
    "uniform_t": near-equal sizes, the first T mod N groups one larger.
    "task_affinity_dp" (cost=None, features=None): the partition minimising the sum of
      ``dp_cost_fn`` interval costs, by dynamic programming (O(N T^2) host time). cost defaults to
      "cosine" when features [T, D] are given, else "log_snr".
    "random" (seed=0): N - 1 distinct cuts drawn uniformly from 1..T-1 (every group non-empty).

  Args:
    diffusion: the schedule (T = diffusion.num_timesteps).
    num_groups: N in [1, T].
    method: one of ``METHODS``.
    **options: the method's options above.

  Returns:
    Groups.

  Raises:
    ValueError: num_groups outside [1, T], an unknown method or option, clip_lo >= clip_hi, a bin
      with no timestep, or bad features.
  """
  t_count = diffusion.num_timesteps
  n = _check_num_groups(num_groups, t_count)
  allowed = {
    "snr_equal_db": ("clip_lo", "clip_hi"),
    "uniform_t": (),
    "task_affinity_dp": ("cost", "features"),
    "random": ("seed",),
  }
  if method not in allowed:
    raise ValueError(f"unknown method={method!r}; allowed: {', '.join(METHODS)}")
  unknown = sorted(set(options) - set(allowed[method]))
  if unknown:
    raise ValueError(
      f"unknown option(s) {unknown} for method={method!r}; allowed: {list(allowed[method])}"
    )
  if method == "snr_equal_db":
    return _snr_equal_db(diffusion, n, **options)
  if method == "uniform_t":
    return _uniform_t(t_count, n)
  if method == "task_affinity_dp":
    return _task_affinity_dp(diffusion, n, **options)
  return _random(t_count, n, **options)


# ------------------------------------------------------------------------------------------------
# FLOPs allocation (progressive scaling).


def flops_budgets(
  base_flops: float,
  num_groups: int,
  k: float,
  full_model_end: str = "high_snr",
  rank_from: int = 1,
) -> list[float]:
  """Per-group FLOPs targets FLOPs_g(i) = (i/N + (N - i)/N * k) * F (spec 3.3).

  Ranks run i = 1..N (rank_from=1) or 0..N-1 (rank_from=0). With full_model_end="high_snr" the
  highest-SNR group (group 0) gets the largest rank (i = N, the full model F, under rank_from=1)
  and group g gets i = N - g (+ rank_from - 1); "low_snr" reverses it (group g gets i = g +
  rank_from). Under rank_from=0 no group gets the full model: the largest is (N-1)/N + k/N of F.

  Args:
    base_flops: F > 0, FLOPs of one base-model evaluation.
    num_groups: N >= 1.
    k: the smallest model's fraction at i = 0, in (0, 1].
    full_model_end: "high_snr" | "low_snr".
    rank_from: 1 | 0.

  Returns:
    N floats indexed by group (group 0 = highest SNR).

  Raises:
    ValueError: any argument outside the ranges above.
  """
  if not (isinstance(base_flops, int | float | np.number) and base_flops > 0):
    raise ValueError(f"base_flops must be > 0, got base_flops={base_flops!r}")
  if isinstance(num_groups, bool) or int(num_groups) != num_groups or num_groups < 1:
    raise ValueError(f"num_groups must be an integer >= 1, got num_groups={num_groups!r}")
  if not 0.0 < k <= 1.0:
    raise ValueError(f"k must be in (0, 1], got k={k!r}")
  if full_model_end not in FULL_MODEL_ENDS:
    raise ValueError(
      f"unknown full_model_end={full_model_end!r}; allowed: {', '.join(FULL_MODEL_ENDS)}"
    )
  if rank_from not in (0, 1) or isinstance(rank_from, bool):
    raise ValueError(f"rank_from must be 0 or 1, got rank_from={rank_from!r}")
  n = int(num_groups)
  ranks = [g + rank_from for g in range(n)]
  if full_model_end == "high_snr":
    ranks = ranks[::-1]
  return [float((i / n + (n - i) / n * k) * base_flops) for i in ranks]
