"""The one reverse-process runner: a chain of segments over one level grid, for every method.

A method describes its sampling as a **chain**: an ordered list of ``Segment``s, each saying which
denoiser (which network, or which slice of a stacked tree, or a router over several) runs which
levels, and on which side of a wire (``side``: "server"/"client", "edge"/"device", or "" for one
place). ``sample_chain`` runs it over one descending level grid, handing the latent over at each
boundary (through the method's ``handoff``, e.g. what crosses the wire), with respacing, DDPM or
DDIM, classifier-free guidance and, per row of the batch, its own boundaries and noise stream:

* the DDPM baseline is one segment from T to 0 (``sample``);
* collab's server and client halves are two segments that meet at the cut level;
* hybrid's edge and device halves are two segments whose boundary is a different level per row
  (each user's split), with per-request noise;
* adaptive's groups route by level inside a segment (``routed_denoise_fn``: the network of the
  group of each step's timestep).

Levels follow ``gaussian.py`` (``steps.py`` has the grids and the update). Two rules make cutting
a chain into segments invisible to the result: every step's coefficients depend only on its pair
of levels, and the noise of the step leaving level k is drawn from ``fold_in(key, k)`` with the
same key (the chain's, or the row's) in every segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from common.diffusion.gaussian import X0_CLIPPINGS, GaussianDiffusion, check_x0_clipping
from common.diffusion.steps import (
  SAMPLERS,
  TIMESTEP_SPACINGS,
  DenoiseFn,
  make_levels,
  predict,
  reverse_step_mean_std,
  space_timesteps,
  step_coefficients,
)

# The initial x_T noise uses fold 0: no reverse step ever leaves level 0, so step noise never
# collides with it.
_INIT_NOISE_FOLD = 0

Bound = int | jax.Array | np.ndarray  # one level for the batch, or [B] levels (one per row)
HandoffFn = Callable[[jax.Array, "Segment", "Segment"], jax.Array]


@dataclasses.dataclass(frozen=True)
class Segment:
  """Reverse steps from level k_start down to level k_end (k_start > k_end >= 0), one denoiser.

  ``denoise_fn(x [B, H, W, C] float32, t [B] int32, y [B] int32 | None) -> [B, H, W, C or 2C]``
  where t = level - 1 is the 0-based model timestep; a pure, traceable function (close over the
  parameters). ``k_start`` / ``k_end`` are ints, or [B] int arrays (possibly traced) when each row
  has its own boundary: a row takes the steps leaving levels in (k_end[i], k_start[i]] and is left
  as it is elsewhere. ``side`` names where the segment runs; the chain hands the latent over
  where it changes.
  """

  denoise_fn: DenoiseFn
  k_start: Bound
  k_end: Bound
  side: str = ""

  def __post_init__(self):
    if self.per_row:
      return
    if not 0 <= self.k_end < self.k_start:
      raise ValueError(f"Segment needs k_start > k_end >= 0, got {self.k_start}, {self.k_end}")

  @property
  def per_row(self) -> bool:
    return not (
      isinstance(self.k_start, int | np.integer) and isinstance(self.k_end, int | np.integer)
    )


def initial_noise(rng: jax.Array, shape: Sequence[int]) -> jax.Array:
  """x_T ~ N(0, I) drawn from the chain's reserved fold of rng. Returns ``shape`` float32."""
  return jax.random.normal(jax.random.fold_in(rng, _INIT_NOISE_FOLD), tuple(shape), jnp.float32)


def is_row_keys(rng: jax.Array) -> bool:
  """Whether ``rng`` holds one key per row ([B] typed keys or [B, 2] raw uint32 keys)."""
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  return jnp.ndim(rng) == (1 if typed else 2)


def _step_noise(rng: jax.Array, k: jax.Array, shape: tuple[int, ...], per_row: bool) -> jax.Array:
  """The noise of the step leaving level k: ``fold_in(rng, k)``, or per row ``fold_in(rng[i], k)``
  when ``rng`` holds one key per row (a request's own stream, whatever batch it lands in)."""
  if not per_row:
    return jax.random.normal(jax.random.fold_in(rng, k), shape, jnp.float32)
  row = (1, *shape[1:])
  return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), row, jnp.float32)[0])(
    rng
  )


@dataclasses.dataclass(frozen=True)
class _Stepper:
  """One reverse step of a chain at level k (the settings every segment of the chain shares)."""

  diffusion: GaussianDiffusion
  sampler: str
  clip_denoised: bool
  x0_clipping: str
  dynamic_threshold_percentile: float
  needs_noise: bool
  guidance_scale: float
  null_label: int | None
  per_row_keys: bool

  def __call__(self, denoise_fn, c, x, rng, y):
    t = jnp.full((x.shape[0],), c["k"] - 1, jnp.int32)
    x0, eps, var_values = predict(
      self.diffusion, denoise_fn, x, t, y, self.guidance_scale, self.null_label
    )
    x_next, std = reverse_step_mean_std(
      self.diffusion, c, x, t, x0, eps, var_values, sampler=self.sampler,
      clip_denoised=self.clip_denoised, x0_clipping=self.x0_clipping,
      dynamic_threshold_percentile=self.dynamic_threshold_percentile,
    )  # fmt: skip
    if self.needs_noise:
      noise = _step_noise(rng, c["k"], x.shape, self.per_row_keys)
      x_next = jnp.where(c["k_next"] > 0, x_next + std * noise, x_next)
    return x_next.astype(x.dtype)


def _coefficient_table(diffusion, levels, eta) -> dict[str, jax.Array]:
  coefs = step_coefficients(diffusion, levels, eta)
  return {
    name: jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32)
    for name, v in coefs.items()
  }


def _run_static(step: _Stepper, segment: Segment, x, rng, y, diffusion, grid, eta):
  """A segment with one boundary for the whole batch: one ``lax.scan`` over its part of the grid."""
  sub = grid[(grid <= segment.k_start) & (grid >= segment.k_end)]
  if sub.size < 2 or sub[0] != segment.k_start or sub[-1] != segment.k_end:
    raise ValueError(
      f"segment {segment.k_start} -> {segment.k_end}: both ends must be levels of the grid {grid}"
    )
  xs = _coefficient_table(diffusion, sub, eta)
  x_end, _ = jax.lax.scan(lambda x, c: (step(segment.denoise_fn, c, x, rng, y), None), x, xs)
  return x_end


def _run_per_row(step: _Stepper, segment: Segment, x, rng, y, diffusion, grid, eta):
  """A segment whose boundaries differ per row: a ``lax.while_loop`` over the grid's steps between
  the highest start and the lowest end (bounds may be traced: one program for any boundaries),
  each row updated only on its own steps."""
  b = x.shape[0]
  k_start = jnp.broadcast_to(jnp.asarray(segment.k_start, jnp.int32), (b,))
  k_end = jnp.broadcast_to(jnp.asarray(segment.k_end, jnp.int32), (b,))
  table = _coefficient_table(diffusion, grid, eta)
  grid_j = jnp.asarray(grid, jnp.int32)
  # Grid index of the highest start / lowest end (the grid descends).
  first = jnp.sum(grid_j > jnp.max(k_start)).astype(jnp.int32)
  last = jnp.sum(grid_j > jnp.min(k_end)).astype(jnp.int32)
  row = (b,) + (1,) * (x.ndim - 1)

  def body(carry):
    j, x = carry
    c = {name: v[j] for name, v in table.items()}
    x_next = step(segment.denoise_fn, c, x, rng, y)
    active = (c["k"] <= k_start) & (c["k"] > k_end)
    return j + 1, jnp.where(active.reshape(row), x_next, x)

  _, x = jax.lax.while_loop(lambda carry: carry[0] < last, body, (first, x))
  return x


def sample_chain(
  diffusion: GaussianDiffusion,
  segments: Sequence[Segment],
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
  x0_clipping: str = "static",
  dynamic_threshold_percentile: float = 0.95,
  handoff: HandoffFn | None = None,
  return_boundaries: bool = False,
) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
  """Runs ``segments`` in order over the level grid ``levels``; traceable under jit.

  DDPM: ancestral step from the posterior q(x_k' | x_k, x0_hat) of the respaced pair, variance
  beta_eff / posterior / learned interpolation. DDIM: x_k' = sqrt(abar') x0_hat +
  sqrt(1 - abar' - sigma^2) eps_hat + sigma z. No noise is added on a step into level 0. With
  ``clip_denoised``, x0_hat is bounded (clipped to [-1, 1], or Imagen's dynamic thresholding)
  and eps_hat recomputed from it (IDDPM).

  Args:
    diffusion: the schedule.
    segments: in chain order; each one's k_start is the previous one's k_end (per row where the
      bounds are arrays), and every int bound is a level of the grid.
    x_start: [B, H, W, C] float32 latent at segments[0].k_start.
    rng: one PRNG key for the chain, or [B] keys (one noise stream per row: a request's samples
      do not depend on the batch it is in).
    levels: concrete [N + 1] int grid, strictly decreasing (``make_levels``); the chain's steps.
    sampler: "ddpm" | "ddim".
    eta: DDIM eta (0 = deterministic).
    y: [B] int32 labels or None.
    guidance_scale: classifier-free guidance scale s; != 1 with y given evaluates the denoiser on
      [y; null_label] in one batch of 2B.
    null_label: the "no label" id the model was trained with (required for guidance).
    clip_denoised: bound x0_hat as ``x0_clipping`` says.
    x0_clipping: "static" clips x0_hat to [-1, 1]; "dynamic" is Imagen's dynamic thresholding,
      per sample s = max(quantile(|x0_hat|, dynamic_threshold_percentile), 1) and x0_hat =
      clip(x0_hat, -s, s) / s (``gaussian.clip_x0``).
    dynamic_threshold_percentile: in (0, 1]; Imagen's (and the official CollaFuse's) 0.95.
    handoff: ``fn(x, segment_before, segment_after) -> x`` applied at each boundary (the wire
      between two sides); default: the latent passes unchanged.
    return_boundaries: also return the latents each segment handed over (before ``handoff``).

  Returns:
    [B, H, W, C] latent at segments[-1].k_end (x_start's dtype), and with return_boundaries the
    list of len(segments) - 1 boundary latents.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
  if not segments:
    raise ValueError("a chain needs at least one segment")
  check_x0_clipping(x0_clipping, dynamic_threshold_percentile)
  grid = np.asarray(levels)
  if grid.ndim != 1 or grid.size < 2 or np.any(np.diff(grid) >= 0):
    raise ValueError(f"levels must be a strictly decreasing 1-D grid, got {grid}")
  for i in range(len(segments) - 1):
    a, b = segments[i].k_end, segments[i + 1].k_start
    if not (segments[i].per_row or segments[i + 1].per_row) and a != b:
      raise ValueError(
        f"segments not contiguous: segment {i} ends at level {a} but segment {i + 1} starts at {b}"
      )
  guided = guidance_scale != 1.0 and y is not None
  if guided and null_label is None:
    raise ValueError("classifier-free guidance (guidance_scale != 1 with y) needs null_label")
  chex.assert_rank(x_start, {2, 3, 4, 5})
  if y is not None:
    chex.assert_shape(y, (x_start.shape[0],))
  eta = eta if sampler == "ddim" else 0.0
  step = _Stepper(
    diffusion, sampler, clip_denoised, x0_clipping, float(dynamic_threshold_percentile),
    needs_noise=sampler == "ddpm" or eta > 0, guidance_scale=guidance_scale,
    null_label=null_label, per_row_keys=is_row_keys(rng),
  )  # fmt: skip
  x, boundaries = x_start, []
  for i, segment in enumerate(segments):
    run = _run_per_row if segment.per_row else _run_static
    x = run(step, segment, x, rng, y, diffusion, grid, eta)
    if i < len(segments) - 1:
      boundaries.append(x)
      if handoff is not None:
        x = handoff(x, segment, segments[i + 1])
  return (x, boundaries) if return_boundaries else x


def sample_segment(
  diffusion: GaussianDiffusion,
  segment: Segment,
  x_start: jax.Array,
  rng: jax.Array,
  *,
  levels: Sequence[int] | np.ndarray,
  **kwargs,
) -> jax.Array:
  """A one-segment chain: ``segment`` over the grid ``levels`` (its first and last entries are the
  segment's bounds). Keyword arguments as ``sample_chain``. Returns the latent at k_end."""
  return sample_chain(diffusion, [segment], x_start, rng, levels=levels, **kwargs)


def segmented_levels(
  num_timesteps: int, segments: Sequence[Segment], steps_per_segment: Sequence[int]
) -> np.ndarray:
  """One grid for segments that each space their own steps: segment i's part is
  ``make_levels(T, steps_per_segment[i], k_start_i, k_end_i)`` (the uniform spacing; a DDIM grid
  is the whole chain's, which segments split instead). Returns [sum(steps) + 1] int32."""
  if len(steps_per_segment) != len(segments):
    raise ValueError(f"got {len(steps_per_segment)} steps_per_segment for {len(segments)} segments")
  parts = [
    make_levels(num_timesteps, n, s.k_start, s.k_end)[(1 if i else 0) :]
    for i, (s, n) in enumerate(zip(segments, steps_per_segment, strict=True))
  ]
  return np.concatenate(parts).astype(np.int32)


def sample_segmented(
  diffusion: GaussianDiffusion,
  segments: Sequence[Segment],
  shape: Sequence[int],
  rng: jax.Array,
  *,
  steps_per_segment: Sequence[int],
  x_start: jax.Array | None = None,
  **kwargs,
) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
  """``sample_chain`` over ``segmented_levels``: each segment spaces its own steps, and the split
  chain reproduces the unsplit one whenever the grids agree.

  Args:
    diffusion: the schedule.
    segments: contiguous, int bounds.
    shape: (B, H, W, C).
    rng: PRNG key.
    steps_per_segment: reverse steps per segment.
    x_start: [B, H, W, C] float32 latent at segments[0].k_start; None draws
      ``initial_noise(rng, shape)`` and needs segments[0].k_start == T.
    **kwargs: as ``sample_chain`` (sampler, eta, y, guidance, clip_denoised, x0_clipping,
      handoff, return_boundaries).

  Returns:
    As ``sample_chain``: [B, H, W, C] samples (and the boundary latents).
  """
  if not segments:
    raise ValueError("sample_segmented needs at least one segment")
  t_count = diffusion.num_timesteps
  if x_start is None:
    if segments[0].k_start != t_count:
      raise ValueError(
        f"x_start is required when the first segment starts at level {segments[0].k_start} < T="
        f"{t_count}"
      )
    x_start = initial_noise(rng, shape)
  chex.assert_shape(x_start, tuple(shape))
  levels = segmented_levels(t_count, segments, steps_per_segment)
  return sample_chain(diffusion, segments, x_start, rng, levels=levels, **kwargs)


def sample(
  diffusion: GaussianDiffusion,
  denoise_fn: DenoiseFn,
  shape: Sequence[int],
  rng: jax.Array,
  *,
  num_steps: int,
  spacing: str = "uniform",
  x_T: jax.Array | None = None,
  **kwargs,
) -> jax.Array:
  """Full-chain sampling: one segment from the top of ``make_levels(T, num_steps, spacing=...)``
  (level T, or the DDIM grid's first level) to 0.

  Args:
    diffusion, denoise_fn: the schedule and the denoiser (see ``Segment``).
    shape: (B, H, W, C).
    rng: PRNG key.
    num_steps: reverse steps (T for the full chain).
    spacing: the grid, "uniform" (IDDPM's "N") or "ddim" (IDDPM's "ddimN"; ``make_levels``).
    x_T: [B, H, W, C] float32 starting noise; default ``initial_noise(rng, shape)``.
    **kwargs: sampler, eta, y, guidance_scale, null_label, clip_denoised, x0_clipping
      (``sample_chain``).

  Returns:
    [B, H, W, C] float32 samples.
  """
  levels = make_levels(diffusion.num_timesteps, num_steps, spacing=spacing)
  x_start = initial_noise(rng, shape) if x_T is None else x_T
  chex.assert_shape(x_start, tuple(shape))
  # The noise enters at the grid's first level: T, or (num_steps - 1) * stride + 1 for DDIM's.
  segment = Segment(denoise_fn, int(levels[0]), 0)
  return sample_chain(diffusion, [segment], x_start, rng, levels=levels, **kwargs)


def make_segment_sampler(
  diffusion: GaussianDiffusion,
  denoise_fn: DenoiseFn,
  *,
  levels: Sequence[int] | np.ndarray,
  **kwargs,
) -> Callable[..., jax.Array]:
  """A jitted ``fn(x_start, rng, y=None) -> latent at levels[-1]`` for one segment grid.

  Compiles once per (x_start shape, y presence); everything else is baked in.

  Args:
    diffusion, denoise_fn: the schedule and the denoiser (see ``Segment``).
    levels: concrete [N + 1] int grid, strictly decreasing (see ``make_levels``).
    **kwargs: sampler, eta, guidance_scale, null_label, clip_denoised, x0_clipping
      (``sample_chain``).

  Returns:
    fn(x_start [B, H, W, C] float32, rng key, y [B] int32 | None) -> [B, H, W, C] float32.
  """
  lv = np.asarray(levels, np.int32)
  segment = Segment(denoise_fn, int(lv[0]), int(lv[-1]))

  @jax.jit
  def run(x_start, rng, y=None):
    return sample_chain(diffusion, [segment], x_start, rng, levels=lv, y=y, **kwargs)

  return run


def routed_denoise_fn(table, denoise_fns: Sequence[DenoiseFn]) -> DenoiseFn:
  """Routing by level: one denoiser that calls ``denoise_fns[table[t]]`` for the step at model
  timestep t (adaptive's groups, E6's per-step widths), through ``lax.switch``.

  The whole batch goes to the network of ``t[0]``: the chain fills t with one value per step
  (also for classifier-free guidance's [cond; uncond] batch of 2B), so one network runs per
  step instead of all of them with a select. A batch mixing timesteps would be routed wrongly
  (sampling only), and under ``vmap`` the switch becomes a select of every branch.

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


__all__ = [
  "SAMPLERS",
  "TIMESTEP_SPACINGS",
  "X0_CLIPPINGS",
  "DenoiseFn",
  "Segment",
  "initial_noise",
  "is_row_keys",
  "make_levels",
  "make_segment_sampler",
  "routed_denoise_fn",
  "sample",
  "sample_chain",
  "sample_segment",
  "sample_segmented",
  "segmented_levels",
  "space_timesteps",
  "step_coefficients",
  "reverse_step_mean_std",
]
