"""The client's side of training: its own diffusion loss on the low-noise steps, and the cut image.

Client k owns levels 1..cut_point (model timesteps t in [0, cut_point)). Its loss is the ordinary
one with t drawn from that range; the cut image reuses the same noise draw,
``x_cut = sqrt(abar(cut_point)) x0 + sqrt(1 - abar(cut_point)) eps``, as the official code does
(§2.1 step 3 of the spec).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common.diffusion import GaussianDiffusion


def cut_image(
  diffusion: GaussianDiffusion, x0: jax.Array, noise: jax.Array, cut_point: int
) -> jax.Array:
  """``x0`` [B, H, W, C] noised to level ``cut_point`` with ``noise``; level 0 is ``x0`` itself."""
  if cut_point == 0:
    return x0
  t = jnp.full((x0.shape[0],), cut_point - 1, jnp.int32)
  return diffusion.q_sample(x0, t, noise)


def loss(
  diffusion: GaussianDiffusion,
  apply_fn,
  x0: jax.Array,
  labels: jax.Array | None,
  rng: jax.Array,
  cut_point: int,
) -> tuple[jax.Array, jax.Array]:
  """One client's loss on its batch and the cut image it would send.

  Args:
    apply_fn: ``(x_t, t, y) -> model output`` of this client's network.
    x0: [B, H, W, C] the client's private images; labels: [B] int32 or None.
    cut_point: the cut level (0: the client trains nothing; T: it trains every step).

  Returns:
    (scalar loss, x_cut [B, H, W, C]).
  """
  rng_t, rng_noise = jax.random.split(rng)
  noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
  x_cut = cut_image(diffusion, x0, noise, cut_point)
  if cut_point == 0:
    return jnp.zeros((), jnp.float32), x_cut
  t = diffusion.sample_timesteps(rng_t, x0.shape[0], 0, cut_point)
  terms = diffusion.training_losses(apply_fn, x0, t, noise, labels)
  return jnp.mean(terms["loss"]), x_cut
