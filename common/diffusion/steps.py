"""The reverse step: level grids (respacing), per-step coefficients and the DDPM / DDIM update.

Levels follow ``gaussian.py``: level k in {0..T}, level 0 is data, and the denoiser's timestep for
a step leaving level k is t = k - 1. Every step's coefficients depend only on its pair of levels
(k, k'), never on the rest of the grid, which is what lets ``sampling`` cut a chain into segments
without changing it. Coefficients are built on the host in float64 from a concrete grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from common.diffusion.gaussian import GaussianDiffusion, clip_x0

SAMPLERS = ("ddpm", "ddim")
# The sampling grids (``make_levels``): "uniform" is IDDPM's "N" respacing (N evenly spaced
# timesteps, t = T - 1 included), "ddim" the DDIM paper's, IDDPM's "ddimN" (range(0, T, stride)).
TIMESTEP_SPACINGS = ("uniform", "ddim")

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
  """The 0-based timesteps kept when respacing a T-step chain (IDDPM's ``space_timesteps``).

  The chain is cut into len(section_counts) near-equal sections and section i keeps
  section_counts[i] evenly spaced timesteps, both ends included. "ddimN" instead keeps
  range(0, T, stride) for the stride giving exactly N steps.

  Args:
    num_timesteps: T.
    section_counts: an int, a list of ints, a comma-separated string of ints, or "ddimN".

  Returns:
    Sorted list of distinct ints in [0, T).

  Raises:
    ValueError: a section asks for more steps than it has, or no stride gives N for "ddimN"
      (``ddim_stride``).
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      stride = ddim_stride(num_timesteps, int(section_counts[len("ddim") :]))
      return list(range(0, num_timesteps, stride))
    section_counts = [int(c) for c in section_counts.split(",")]
  elif isinstance(section_counts, int):
    section_counts = [section_counts]
  n_sections = len(section_counts)
  base, extra = divmod(num_timesteps, n_sections)
  kept: set[int] = set()
  start = 0
  for i, count in enumerate(section_counts):
    size = base + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    # Accumulate the float position rather than multiplying, so rounding ties land exactly where
    # IDDPM's do and respaced checkpoints see the same timesteps.
    pos = 0.0
    for _ in range(count):
      kept.add(start + round(pos))
      pos += stride
    start += size
  return sorted(kept)


def ddim_stride(num_timesteps: int, num_steps: int) -> int:
  """The stride s of IDDPM's "ddimN": the smallest with exactly num_steps timesteps in
  range(0, T, s).

  Raises:
    ValueError: no stride gives num_steps; the message names the nearest step counts that have one.
  """
  # len(range(0, T, s)) = ceil(T / s). Strides stop below T as IDDPM's do, so no count is 1.
  strides: dict[int, int] = {}
  for s in range(1, num_timesteps):
    strides.setdefault(-(-num_timesteps // s), s)
  if num_steps in strides:
    return strides[num_steps]
  counts = sorted(strides)
  near = [c for c in counts if c < num_steps][-1:] + [c for c in counts if c > num_steps][:1]
  raise ValueError(
    f"no stride s gives exactly {num_steps} steps in range(0, {num_timesteps}, s) (IDDPM's "
    f'"ddim{num_steps}"); nearest that have one: {", ".join(map(str, near)) or "none"}'
  )


def make_levels(
  num_timesteps: int,
  num_steps: int,
  k_start: int | None = None,
  k_end: int = 0,
  *,
  spacing: str = "uniform",
) -> np.ndarray:
  """The descending level grid of a segment from k_start down to k_end, on one of two spacings.

  ``spacing="uniform"`` (IDDPM's "N" respacing, the default): the segment spaces its own
  num_steps steps, k_start first and k_end last. For k_end == 0 the levels above 0 are
  1 + ``space_timesteps(k_start, [num_steps])``, so a full chain is exactly IDDPM's respacing
  (t = T - 1 included; the last model call is at t = 0, then a step to level 0). For k_end > 0
  the num_steps + 1 levels are evenly spaced from k_start to k_end, both included. Both rules
  give every level when num_steps == k_start - k_end, and evenly spaced grids split at one of
  their levels compose: make_levels(100, 10) (100, 89, ..., 12, 1, 0) equals
  make_levels(100, 4, 100, 56) followed by make_levels(100, 6, 56)[1:].

  ``spacing="ddim"`` (the DDIM paper's grid, IDDPM's "ddimN"): the grid is the whole chain's,
  whatever the segment: 1 + range(0, T, stride) for the stride giving exactly num_steps steps,
  descending, then 0. The last model call is at t = 0 and the first at t = (num_steps - 1) *
  stride on pure noise, as in IDDPM's and DDIM's samplers, so the grid starts at level T only
  when the stride is 1 (make_levels(1000, 50, spacing="ddim") is 981, 961, ..., 21, 1, 0). A
  segment takes its part of that grid, the levels in [k_end, k_start]: k_start = T means from
  the grid's top, and every other bound must be a level of the grid, so segments split at grid
  levels concatenate to the whole chain's grid. ``num_steps`` is then the whole chain's step
  count, not the segment's.

  Args:
    num_timesteps: T.
    num_steps: reverse steps: the segment's, 1 <= num_steps <= k_start - k_end ("uniform"), or
      the whole chain's, 1 <= num_steps <= T ("ddim").
    k_start: first level (default T).
    k_end: last level, 0 <= k_end < k_start.
    spacing: "uniform" | "ddim" (``TIMESTEP_SPACINGS``).

  Returns:
    [S + 1] int32, strictly decreasing: S = num_steps ("uniform"), or the steps of the whole
    chain's grid between the segment's bounds ("ddim").

  Raises:
    ValueError: bounds or step count out of range, an unknown spacing, no stride giving exactly
      num_steps DDIM steps, or a DDIM segment bound that is not a level of the grid.
  """
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(TIMESTEP_SPACINGS)}")
  k_start = num_timesteps if k_start is None else int(k_start)
  k_end = int(k_end)
  if not 0 <= k_end < k_start <= num_timesteps:
    raise ValueError(f"need 0 <= k_end < k_start <= {num_timesteps}, got {k_start}, {k_end}")
  if spacing == "ddim":
    return _ddim_part(num_timesteps, num_steps, k_start, k_end)
  if not 1 <= num_steps <= k_start - k_end:
    raise ValueError(f"num_steps must be in [1, {k_start - k_end}], got {num_steps}")
  if k_end == 0 and num_steps == 1:
    # IDDPM's one-step respacing keeps only t = 0, a grid that would not start at k_start.
    levels = [k_start, 0]
  elif k_end == 0:
    above = [k + 1 for k in space_timesteps(k_start, [num_steps])]
    levels = sorted(above, reverse=True) + [0]
  else:
    stride = (k_start - k_end) / num_steps
    levels = [k_start - round(i * stride) for i in range(num_steps)] + [k_end]
  return np.asarray(levels, np.int32)


def _ddim_part(num_timesteps: int, num_steps: int, k_start: int, k_end: int) -> np.ndarray:
  """``make_levels``'s "ddim" rule: the part of the whole chain's DDIM grid in [k_end, k_start]."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
  kept = space_timesteps(num_timesteps, f"ddim{num_steps}")
  grid = np.asarray([t + 1 for t in reversed(kept)] + [0], np.int32)
  check_grid_boundary(grid, num_timesteps, "k_start", k_start)
  check_grid_boundary(grid, num_timesteps, "k_end", k_end)
  part = grid[(grid <= k_start) & (grid >= k_end)]
  if part.size < 2:
    raise ValueError(
      f"no step of the {num_steps}-step DDIM grid over T={num_timesteps} lies between levels "
      f"{k_start} and {k_end} ({_grid_summary(grid)})"
    )
  return part


def check_grid_boundary(
  grid: np.ndarray, num_timesteps: int, name: str, level: int, *, below_top: bool = False
) -> None:
  """Checks that a segment bound ``name=level`` splits the whole chain's ``grid`` (a DDIM grid,
  ``make_levels(..., spacing="ddim")``): it must be one of its levels or T (pure noise, above
  every grid), so that segments split there concatenate to the grid.

  Args:
    grid: [S + 1] int, strictly decreasing, ending at level 0.
    num_timesteps: T.
    name: what the bound is, for the message ("k_end", "collab.cut_point").
    level: the bound, in [0, T].
    below_top: the grid's top level is not allowed either (a segment ending there would have
      no step above it).

  Raises:
    ValueError: naming the grid and the nearest allowed levels on either side of ``level``.
  """
  allowed = grid[1:] if below_top else grid
  if level == num_timesteps or level in allowed:
    return
  below = max(int(k) for k in allowed if k < level)
  above = min([int(k) for k in allowed if k > level] + [num_timesteps])
  raise ValueError(
    f"{name}={level} is not a level of the {len(grid) - 1}-step DDIM grid over T={num_timesteps} "
    f"({_grid_summary(grid)}; nearest: {below}, {above})"
  )


def _grid_summary(grid: np.ndarray) -> str:
  """``"levels 981, 961, ..., 1, 0"``: a grid named in one short phrase for error messages."""
  shown = grid.tolist() if grid.size <= 6 else [*grid[:2].tolist(), "...", *grid[-2:].tolist()]
  return "levels " + ", ".join(map(str, shown))


def step_coefficients(
  diffusion: GaussianDiffusion, levels: Sequence[int] | np.ndarray, eta: float = 0.0
) -> dict[str, np.ndarray]:
  """Host-side float64 coefficients of each reverse step levels[i] -> levels[i + 1].

  With abar = abar(k), abar' = abar(k') and beta_eff = 1 - abar / abar' (IDDPM respacing), the
  posterior q(x_k' | x_k, x0) has mean coef1 * x0 + coef2 * x_k and variance
  beta_eff (1 - abar') / (1 - abar). Adjacent pairs reproduce the full-chain tables.

  Args:
    diffusion: the schedule.
    levels: [N + 1] int, strictly decreasing, in [0, T].
    eta: DDIM eta.

  Returns:
    dict of [N] arrays: "k", "k_next" (int32), "coef1", "coef2", "post_var", "post_log_var"
    (clipped: at k' == 0 the full chain's log(posterior_variance[1]), unused by sampling since
    that step adds no noise), "log_beta", "sqrt_abar_next", "ddim_sigma", "ddim_eps_coef"
    (float64).
  """
  lv = np.asarray(levels)
  t_count = diffusion.num_timesteps
  if lv.ndim != 1 or lv.shape[0] < 2:
    raise ValueError(f"levels must be 1-D with at least 2 entries, got shape {lv.shape}")
  if np.any(np.diff(lv) >= 0) or lv[0] > t_count or lv[-1] < 0:
    raise ValueError(f"levels must be strictly decreasing within [0, {t_count}], got {lv}")
  abar_all = diffusion.np_alpha_bar_levels()
  k, kn = lv[:-1].astype(np.int64), lv[1:].astype(np.int64)
  a, an = abar_all[k], abar_all[kn]
  ratio = a / an
  beta = 1.0 - ratio
  post_var = beta * (1.0 - an) / (1.0 - a)
  if t_count > 1:
    betas = 1.0 - abar_all[1:] / abar_all[:-1]
    # Full-chain posterior variance of the step from level 2 to level 1 (IDDPM's clip value).
    clip_value = betas[1] * (1.0 - abar_all[1]) / (1.0 - abar_all[2])
  else:
    clip_value = beta[-1]
  post_log_var = np.log(np.where(kn == 0, clip_value, np.maximum(post_var, 1e-300)))
  sigma = eta * np.sqrt((1.0 - an) / (1.0 - a)) * np.sqrt(beta)
  return {
    "k": k.astype(np.int32),
    "k_next": kn.astype(np.int32),
    "coef1": beta * np.sqrt(an) / (1.0 - a),
    "coef2": (1.0 - an) * np.sqrt(ratio) / (1.0 - a),
    "post_var": post_var,
    "post_log_var": post_log_var,
    "log_beta": np.log(beta),
    "sqrt_abar_next": np.sqrt(an),
    "ddim_sigma": sigma,
    "ddim_eps_coef": np.sqrt(np.maximum(1.0 - an - sigma**2, 0.0)),
  }


def predict(
  diffusion: GaussianDiffusion,
  denoise_fn: DenoiseFn,
  x: jax.Array,
  t: jax.Array,
  y: jax.Array | None,
  guidance_scale: float,
  null_label: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(x0, eps, var_values) at x, with classifier-free guidance in eps space when asked."""
  if guidance_scale == 1.0 or y is None:
    return diffusion.model_output_to_x0_eps(denoise_fn(x, t, y), x, t)
  b = x.shape[0]
  # One call on [cond; uncond] rather than two: half the launches, same maths.
  out = denoise_fn(
    jnp.concatenate([x, x]),
    jnp.concatenate([t, t]),
    jnp.concatenate([y, jnp.full_like(y, null_label)]),
  )
  _, eps_c, var_c = diffusion.model_output_to_x0_eps(out[:b], x, t)
  _, eps_u, _ = diffusion.model_output_to_x0_eps(out[b:], x, t)
  eps = eps_u + guidance_scale * (eps_c - eps_u)
  return diffusion.x0_from_eps(x, t, eps), eps, var_c


def reverse_step_mean_std(
  diffusion: GaussianDiffusion,
  c: dict[str, jax.Array],
  x: jax.Array,
  t: jax.Array,
  x0: jax.Array,
  eps: jax.Array,
  var_values: jax.Array | None,
  *,
  sampler: str,
  clip_denoised: bool,
  x0_clipping: str = "static",
  dynamic_threshold_percentile: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
  """Mean and std of one reverse step leaving level ``c["k"]``, before any noise is added.

  The one place the DDPM / DDIM update lives, so that every sampler over the core (``sample_segment``,
  hybrid's masked per-row chain) steps alike; noise (and which key draws it) is the caller's.

  Args:
    diffusion: the schedule.
    c: one row of ``step_coefficients`` (scalars), as jax values.
    x: [B, ...] latent at level c["k"]; t: [B] int32 model timestep (k - 1).
    x0, eps: [B, ...] the network's estimates at x; var_values: learned-sigma output or None.
    sampler: "ddpm" | "ddim".
    clip_denoised: bound x0 (``gaussian.clip_x0``) and recompute eps from it (IDDPM).
    x0_clipping: "static" (clip to [-1, 1]) | "dynamic" (Imagen's thresholding).
    dynamic_threshold_percentile: the quantile "dynamic" thresholds at.

  Returns:
    (mean [B, ...], std: scalar or [B, ...]); x_next = mean + std * z on a step into level > 0.
  """
  if clip_denoised:
    x0 = clip_x0(x0, x0_clipping, dynamic_threshold_percentile)
    eps = diffusion.eps_from_x0(x, t, x0)
  if sampler == "ddpm":
    mean = c["coef1"] * x0 + c["coef2"] * x
    if diffusion.learn_sigma:
      frac = (var_values + 1.0) / 2.0
      log_var = frac * c["log_beta"] + (1.0 - frac) * c["post_log_var"]
    elif diffusion.fixed_variance == "small":
      log_var = c["post_log_var"]
    else:
      log_var = c["log_beta"]
    return mean, jnp.exp(0.5 * log_var)
  return c["sqrt_abar_next"] * x0 + c["ddim_eps_coef"] * eps, c["ddim_sigma"]
