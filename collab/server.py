"""The server's side: trained only on cut images, and the noisy half of every sample.

The server owns levels cut_point+1..T (model timesteps t in [cut_point, T)). Two formulations
(``config.collab.server_noising``):

* ``ratio`` (default, spec §2.3): the server treats ``x_cut`` as its data and noises it with the
  *rebased* chain, abar'(k) = abar(k) / abar(cut_point), which gives exactly the global marginal
  q(x_k | x_0) because x_cut ~ q(x_cut | x_0) and the chain is Markov. It samples down that chain
  to its own data, x_cut, with no clipping (x_cut is noisy, not in [-1, 1]).
* ``full`` (the official code, spec §2.1): the server noises ``x_cut`` as if it were clean data
  with the full schedule at t, so its inputs carry noise abar(t) * abar(cut_point) in total; it
  samples the ordinary chain from T down to level cut_point. The client then starts from an offset level
  (``collab.client_start_offset='code'``) that the official code uses to compensate.

Every function here receives a ``protocol.ClientMessage`` (training) or nothing private at all
(sampling): never x_0, never the clients' noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from collab import protocol
from common.diffusion import GaussianDiffusion, sampling

NOISINGS = ("ratio", "full")
SAMPLING_CHAINS = ("global", "rebased")


def loss(
  diffusion: GaussianDiffusion,
  apply_fn,
  x_cut: jax.Array,
  labels: jax.Array | None,
  rng: jax.Array,
  *,
  cut_point: int,
  noising: str,
) -> jax.Array:
  """The server's loss on one client's message.

  Args:
    apply_fn: ``(x_t, t, y) -> output`` of the server network, t the *global* model timestep.
    x_cut: [B, H, W, C] one client's cut images; labels: [B] int32 or None (not shared).

  Returns:
    Scalar loss (0 when cut_point == T: the server owns no step).
  """
  big_t = diffusion.num_timesteps
  if cut_point >= big_t:
    return jnp.zeros((), jnp.float32)
  rng_t, rng_noise = jax.random.split(rng)
  noise = jax.random.normal(rng_noise, x_cut.shape, x_cut.dtype)
  if noising == "ratio":
    chain = diffusion.rebased(cut_point)
    t = chain.sample_timesteps(rng_t, x_cut.shape[0], 0, big_t - cut_point)
    terms = chain.training_losses(
      lambda x, tt, y: apply_fn(x, tt + cut_point, y), x_cut, t, noise, labels
    )
  else:
    t = diffusion.sample_timesteps(rng_t, x_cut.shape[0], cut_point, big_t)
    terms = diffusion.training_losses(apply_fn, x_cut, t, noise, labels)
  return jnp.mean(terms["loss"])


def train_message_loss(diffusion, apply_fn, message: protocol.ClientMessage, k, rng, **kw):
  """``loss`` on client ``k``'s part of a message (what the server's update loop calls)."""
  labels = None if message.labels is None else message.labels[k]
  return loss(diffusion, apply_fn, message.x_cut[k], labels, rng, **kw)


def sample(
  diffusion: GaussianDiffusion,
  apply_fn,
  shape: tuple[int, ...],
  rng: jax.Array,
  *,
  cut_point: int,
  noising: str,
  num_steps: int,
  labels: jax.Array | None = None,
  chain: str = "global",
  spacing: str = "uniform",
  sampler: str = "ddpm",
  eta: float = 0.0,
  guidance_scale: float = 1.0,
  null_label: int | None = None,
  x0_clipping: str = "static",
  dynamic_threshold_percentile: float = 0.95,
) -> jax.Array:
  """Pure noise -> the hand-off latent at level ``cut_point`` ([B, H, W, C] float32).

  ``labels`` are the requesting clients' conditions (the only thing a client sends at inference).
  ``chain`` (ratio noising only): ``global`` samples the ordinary chain with the server's noise
  estimate rescaled to the global one (x0_hat clipped; default), ``rebased`` the spec's §2.3
  posterior of the rebased chain (unclipped; diverges under the cosine schedule).
  ``spacing`` (``sampling.make_levels``): "uniform" spaces the server's ``num_steps`` steps from T
  to cut_point; "ddim" takes the part above cut_point of the whole chain's DDIM grid of
  ``num_steps`` steps (cut_point must be one of its levels), starting at that grid's top.
  ``x0_clipping``, ``dynamic_threshold_percentile``: how a clipped x0_hat is bounded
  (``sampling.sample_chain``; "dynamic" is the official code's Imagen thresholding).
  """
  big_t = diffusion.num_timesteps
  x_T = jax.random.normal(jax.random.fold_in(rng, 1 << 20), shape, jnp.float32)
  if cut_point >= big_t:
    return x_T
  common = dict(
    sampler=sampler, eta=eta, y=labels, guidance_scale=guidance_scale, null_label=null_label,
    x0_clipping=x0_clipping, dynamic_threshold_percentile=dynamic_threshold_percentile,
  )  # fmt: skip
  if noising == "ratio" and chain == "global" and cut_point > 0:
    # The server's eps_s is, at its optimum, a fixed fraction of the global chain's noise:
    # x_k = sqrt(abar'_k) x_cut + sqrt(1 - abar'_k) eps_s = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps,
    # so E[eps_s | x_k] = r_k E[eps | x_k] with r_k = sqrt(1 - abar_k / abar_cut) / sqrt(1 - abar_k).
    # Converted, it samples the ordinary chain with x0_hat clipped to [-1, 1], which the
    # unclipped rebased posterior (spec §2.3) lacks: under the cosine schedule's beta = 0.999
    # top step it amplifies eps errors ~30x and the hand-off diverged (std 26 instead of 0.8).
    abar = diffusion.np_alpha_bar_levels()
    ratio = np.zeros(big_t, np.float64)
    levels_above = np.arange(cut_point + 1, big_t + 1)
    ratio[levels_above - 1] = np.sqrt(1 - abar[levels_above] / abar[cut_point]) / np.sqrt(
      1 - abar[levels_above]
    )
    ratio = jnp.asarray(ratio, jnp.float32)

    server_eps = apply_fn

    def apply_fn(x, t, y):  # the global chain's noise estimate; sampled below like `full`
      return server_eps(x, t, y) / ratio[t].reshape(-1, *([1] * (x.ndim - 1)))

  elif noising == "ratio":
    rebased = diffusion.rebased(cut_point)
    if spacing == "ddim":  # the global grid's part above the cut, as rebased levels
      levels = _server_levels(big_t, num_steps, cut_point, spacing) - cut_point
    else:
      levels = sampling.make_levels(rebased.num_timesteps, min(num_steps, rebased.num_timesteps))
    segment = sampling.Segment(lambda x, t, y: apply_fn(x, t + cut_point, y), int(levels[0]), 0)
    # x_cut is a noisy latent unless cut_point == 0, so only then is the estimate clipped to
    # [-1, 1].
    # The rebased chain's levels 1.. would reuse the client's step keys (fold_in(rng, k)), so the
    # server's steps draw from their own stream.
    return sampling.sample_segment(
      rebased, segment, x_T, jax.random.fold_in(rng, 1 << 21), levels=levels,
      clip_denoised=cut_point == 0, **common,
    )  # fmt: skip
  levels = _server_levels(big_t, num_steps, cut_point, spacing)
  segment = sampling.Segment(apply_fn, int(levels[0]), cut_point)
  return sampling.sample_segment(
    diffusion, segment, x_T, rng, levels=levels, clip_denoised=True, **common
  )


def _server_levels(big_t: int, num_steps: int, cut_point: int, spacing: str) -> np.ndarray:
  """The server's levels from the top of the chain down to ``cut_point`` (see ``sample``)."""
  if spacing == "ddim":
    return sampling.make_levels(big_t, num_steps, big_t, cut_point, spacing="ddim")
  return sampling.make_levels(big_t, min(num_steps, big_t - cut_point), big_t, cut_point)
