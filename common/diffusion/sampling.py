"""Reverse process: respaced DDPM / DDIM steps between arbitrary levels, run in segments.

Levels follow ``gaussian.py``: level k in {0..T}, level 0 is data, and the denoiser's timestep for
a step leaving level k is t = k - 1. A chain is a strictly decreasing array of levels; a segment
runs part of it with its own denoiser, so several models can share one chain. Two rules make
splitting a chain into segments invisible to the result:

* every step's coefficients depend only on its pair of levels (k, k'), never on the rest of the
  grid, and
* the noise of the step leaving level k is drawn from ``jax.random.fold_in(rng, k)`` with the same
  ``rng`` for every segment.

Per-step coefficients are built on the host in float64 from the level grid, which must therefore
be concrete (numpy / list), not traced; one compiled program per segment grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from common.diffusion.gaussian import GaussianDiffusion

SAMPLERS = ("ddpm", "ddim")

# The initial x_T noise uses fold 0: no reverse step ever leaves level 0, so step noise never
# collides with it.
_INIT_NOISE_FOLD = 0

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
    ValueError: a section asks for more steps than it has, or no stride gives N for "ddimN".
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      wanted = int(section_counts[len("ddim") :])
      for stride in range(1, num_timesteps):
        kept = list(range(0, num_timesteps, stride))
        if len(kept) == wanted:
          return kept
      raise ValueError(f"cannot make exactly {wanted} DDIM steps out of {num_timesteps}")
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


def make_levels(
  num_timesteps: int, num_steps: int, k_start: int | None = None, k_end: int = 0
) -> np.ndarray:
  """The descending level grid of a segment: k_start first, k_end last, num_steps steps.

  For k_end == 0 the levels above 0 are 1 + ``space_timesteps(k_start, [num_steps])``, so a full
  chain is exactly IDDPM's respacing (the last model call is at t = 0, then a step to level 0).
  For k_end > 0 the num_steps + 1 levels are evenly spaced from k_start to k_end, both included.
  Both rules give every level when num_steps == k_start - k_end, and evenly spaced grids split at
  one of their levels compose: make_levels(100, 10) (100, 89, ..., 12, 1, 0) equals
  make_levels(100, 4, 100, 56) followed by make_levels(100, 6, 56)[1:].

  Args:
    num_timesteps: T.
    num_steps: number of reverse steps, 1 <= num_steps <= k_start - k_end.
    k_start: first level (default T).
    k_end: last level, 0 <= k_end < k_start.

  Returns:
    [num_steps + 1] int32, strictly decreasing.
  """
  k_start = num_timesteps if k_start is None else int(k_start)
  k_end = int(k_end)
  if not 0 <= k_end < k_start <= num_timesteps:
    raise ValueError(f"need 0 <= k_end < k_start <= {num_timesteps}, got {k_start}, {k_end}")
  if not 1 <= num_steps <= k_start - k_end:
    raise ValueError(f"num_steps must be in [1, {k_start - k_end}], got {num_steps}")
  if k_end == 0:
    above = [k + 1 for k in space_timesteps(k_start, [num_steps])]
    levels = sorted(above, reverse=True) + [0]
  else:
    stride = (k_start - k_end) / num_steps
    levels = [k_start - round(i * stride) for i in range(num_steps)] + [k_end]
  return np.asarray(levels, np.int32)


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


@dataclasses.dataclass(frozen=True)
class Segment:
  """Reverse steps from level k_start down to level k_end (k_start > k_end >= 0).

  ``denoise_fn(x [B, H, W, C] float32, t [B] int32, y [B] int32 | None) -> [B, H, W, C or 2C]``
  where t = level - 1 is the 0-based model timestep. It must be a pure, traceable function (close
  over parameters; for NNX modules use nnx.split / nnx.merge or a functional wrapper).
  """

  denoise_fn: DenoiseFn
  k_start: int
  k_end: int

  def __post_init__(self):
    if not 0 <= self.k_end < self.k_start:
      raise ValueError(f"Segment needs k_start > k_end >= 0, got {self.k_start}, {self.k_end}")


def _predict(
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
    clip_denoised: clip x0 to [-1, 1] and recompute eps from it (IDDPM).

  Returns:
    (mean [B, ...], std: scalar or [B, ...]); x_next = mean + std * z on a step into level > 0.
  """
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
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


def sample_segment(
  diffusion: GaussianDiffusion,
  segment: Segment,
  x_start: jax.Array,
  rng: jax.Array,
  *,
  levels: Sequence[int] | np.ndarray,
  sampler: str = "ddpm",
  eta: float = 0.0,
  y: jax.Array | None = None,
  guidance_scale: float = 1.0,
  null_label: int | None = None,
  clip_denoised: bool = True,
) -> jax.Array:
  """Runs a segment's reverse steps over ``levels`` with one ``lax.scan``; traceable under jit.

  DDPM: ancestral step from the posterior q(x_k' | x_k, x0_hat) of the respaced pair, variance
  beta_eff / posterior / learned interpolation (frac = (v + 1) / 2 between log beta_eff and the
  clipped posterior log variance). DDIM: x_k' = sqrt(abar') x0_hat + sqrt(1 - abar' - sigma^2)
  eps_hat + sigma z. No noise is added on a step into level 0. With clip_denoised, eps_hat is
  recomputed from the clipped x0_hat (IDDPM).

  Args:
    diffusion: the schedule.
    segment: which levels and which denoiser.
    x_start: [B, H, W, C] float32 latent at level segment.k_start.
    rng: PRNG key shared by all segments of a chain.
    levels: concrete [N + 1] int, strictly decreasing, levels[0] == k_start, levels[-1] == k_end
      (see ``make_levels``).
    sampler: "ddpm" | "ddim".
    eta: DDIM eta (0 = deterministic).
    y: [B] int32 labels or None.
    guidance_scale: classifier-free guidance scale s; != 1 with y given evaluates the denoiser on
      [y; null_label] in one batch of 2B.
    null_label: the "no label" id the model was trained with (required for guidance).
    clip_denoised: clip x0_hat to [-1, 1].

  Returns:
    [B, H, W, C] latent at level segment.k_end, x_start's dtype.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
  lv = np.asarray(levels)
  if lv.ndim != 1 or lv[0] != segment.k_start or lv[-1] != segment.k_end:
    raise ValueError(
      f"levels must run from k_start={segment.k_start} to k_end={segment.k_end}, got {lv}"
    )
  guided = guidance_scale != 1.0 and y is not None
  if guided and null_label is None:
    raise ValueError("classifier-free guidance (guidance_scale != 1 with y) needs null_label")
  chex.assert_rank(x_start, {2, 3, 4, 5})
  b = x_start.shape[0]
  if y is not None:
    chex.assert_shape(y, (b,))
  coefs = step_coefficients(diffusion, lv, eta if sampler == "ddim" else 0.0)
  xs = {
    name: jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32)
    for name, v in coefs.items()
  }
  needs_noise = sampler == "ddpm" or eta > 0
  dtype = x_start.dtype

  def step(x, c):
    t = jnp.full((b,), c["k"] - 1, jnp.int32)
    x0, eps, var_values = _predict(
      diffusion, segment.denoise_fn, x, t, y, guidance_scale, null_label
    )
    x_next, std = reverse_step_mean_std(
      diffusion, c, x, t, x0, eps, var_values, sampler=sampler, clip_denoised=clip_denoised
    )
    if needs_noise:
      noise = jax.random.normal(jax.random.fold_in(rng, c["k"]), x.shape, jnp.float32)
      x_next = jnp.where(c["k_next"] > 0, x_next + std * noise, x_next)
    return x_next.astype(dtype), None

  x_end, _ = jax.lax.scan(step, x_start, xs)
  return x_end


def initial_noise(rng: jax.Array, shape: Sequence[int]) -> jax.Array:
  """x_T ~ N(0, I) drawn from the chain's reserved fold of rng. Returns ``shape`` float32."""
  return jax.random.normal(jax.random.fold_in(rng, _INIT_NOISE_FOLD), tuple(shape), jnp.float32)


def sample(
  diffusion: GaussianDiffusion,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  rng: jax.Array,
  *,
  num_steps: int,
  sampler: str = "ddpm",
  eta: float = 0.0,
  y: jax.Array | None = None,
  guidance_scale: float = 1.0,
  null_label: int | None = None,
  x_T: jax.Array | None = None,
  clip_denoised: bool = True,
) -> jax.Array:
  """Full-chain sampling: one segment from level T to 0 over ``make_levels(T, num_steps)``.

  Args:
    diffusion, denoise_fn: the schedule and the denoiser (see ``Segment``).
    shape: (B, H, W, C).
    rng: PRNG key.
    num_steps: reverse steps (T for the full chain).
    sampler, eta, y, guidance_scale, null_label, clip_denoised: see ``sample_segment``.
    x_T: [B, H, W, C] float32 starting noise; default ``initial_noise(rng, shape)``.

  Returns:
    [B, H, W, C] float32 samples.
  """
  t_count = diffusion.num_timesteps
  return sample_segmented(
    diffusion,
    [Segment(denoise_fn, t_count, 0)],
    shape,
    rng,
    steps_per_segment=[num_steps],
    x_start=x_T,
    sampler=sampler,
    eta=eta,
    y=y,
    guidance_scale=guidance_scale,
    null_label=null_label,
    clip_denoised=clip_denoised,
  )


def sample_segmented(
  diffusion: GaussianDiffusion,
  segments: Sequence[Segment],
  shape: Sequence[int],
  rng: jax.Array,
  *,
  steps_per_segment: Sequence[int],
  x_start: jax.Array | None = None,
  sampler: str = "ddpm",
  eta: float = 0.0,
  y: jax.Array | None = None,
  guidance_scale: float = 1.0,
  null_label: int | None = None,
  clip_denoised: bool = True,
  return_boundaries: bool = False,
) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
  """Runs contiguous segments in order, handing the latent over at each boundary.

  Segment i uses ``make_levels(T, steps_per_segment[i], k_start_i, k_end_i)``. Every segment gets
  the same rng (see the module docstring), so a split chain reproduces the unsplit one whenever
  the grids agree. Each segment is traced afresh per call; wrap in jax.jit or use
  ``make_segment_sampler`` for repeated calls.

  Args:
    diffusion: the schedule.
    segments: contiguous (segments[i].k_end == segments[i + 1].k_start).
    shape: (B, H, W, C).
    rng: PRNG key.
    steps_per_segment: reverse steps per segment.
    x_start: [B, H, W, C] float32 latent at segments[0].k_start; None draws
      ``initial_noise(rng, shape)`` and needs segments[0].k_start == T.
    sampler, eta, y, guidance_scale, null_label, clip_denoised: see ``sample_segment``.
    return_boundaries: also return the latents handed between segments.

  Returns:
    The [B, H, W, C] latent at segments[-1].k_end, and with return_boundaries the list of
    len(segments) - 1 boundary latents, [B, H, W, C] each (boundary i is at segments[i].k_end).
  """
  if not segments:
    raise ValueError("sample_segmented needs at least one segment")
  if len(steps_per_segment) != len(segments):
    raise ValueError(f"got {len(steps_per_segment)} steps_per_segment for {len(segments)} segments")
  for i in range(len(segments) - 1):
    if segments[i].k_end != segments[i + 1].k_start:
      raise ValueError(
        f"segments not contiguous: segment {i} ends at level {segments[i].k_end} but segment "
        f"{i + 1} starts at {segments[i + 1].k_start}"
      )
  t_count = diffusion.num_timesteps
  if x_start is None:
    if segments[0].k_start != t_count:
      raise ValueError(
        f"x_start is required when the first segment starts at level {segments[0].k_start} < T="
        f"{t_count}"
      )
    x_start = initial_noise(rng, shape)
  chex.assert_shape(x_start, tuple(shape))
  x = x_start
  boundaries = []
  for i, (seg, n) in enumerate(zip(segments, steps_per_segment, strict=True)):
    x = sample_segment(
      diffusion,
      seg,
      x,
      rng,
      levels=make_levels(t_count, n, seg.k_start, seg.k_end),
      sampler=sampler,
      eta=eta,
      y=y,
      guidance_scale=guidance_scale,
      null_label=null_label,
      clip_denoised=clip_denoised,
    )
    if i < len(segments) - 1:
      boundaries.append(x)
  return (x, boundaries) if return_boundaries else x


def make_segment_sampler(
  diffusion: GaussianDiffusion,
  denoise_fn: DenoiseFn,
  *,
  levels: Sequence[int] | np.ndarray,
  sampler: str = "ddpm",
  eta: float = 0.0,
  guidance_scale: float = 1.0,
  null_label: int | None = None,
  clip_denoised: bool = True,
) -> Callable[..., jax.Array]:
  """A jitted ``fn(x_start, rng, y=None) -> latent at levels[-1]`` for one segment grid.

  Compiles once per (x_start shape, y presence); everything else is baked in.

  Args:
    diffusion, denoise_fn: the schedule and the denoiser (see ``Segment``).
    levels: concrete [N + 1] int grid, strictly decreasing (see ``make_levels``).
    sampler, eta, guidance_scale, null_label, clip_denoised: see ``sample_segment``.

  Returns:
    fn(x_start [B, H, W, C] float32, rng key, y [B] int32 | None) -> [B, H, W, C] float32.
  """
  lv = np.asarray(levels, np.int32)
  segment = Segment(denoise_fn, int(lv[0]), int(lv[-1]))

  @jax.jit
  def run(x_start, rng, y=None):
    return sample_segment(
      diffusion,
      segment,
      x_start,
      rng,
      levels=lv,
      sampler=sampler,
      eta=eta,
      y=y,
      guidance_scale=guidance_scale,
      null_label=null_label,
      clip_denoised=clip_denoised,
    )

  return run
