"""Held-out L_simple and VLB (bits/dim) per timestep group with fixed (x0, t, eps) draws (spec §8.2).

The most direct test of TDC's mechanism: a group network that specialised should have a lower
held-out loss on its own timesteps than the single model. The draws depend only on the seed, the
grouping and the test split, so every arm (single model, group networks, ablations) is scored on
exactly the same (x0, t, eps) triples and differences are paired.

Totals: L_simple over t ~ U[0, T) is the group-size-weighted mean of the group means; the VLB in
bits/dim is ``sum_g |g| * mean_g(L_t) + L_prior`` (the bound's T terms estimated per group, plus
the prior term KL(q(x_T | x0) || N(0, I)), which no network affects).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from adaptive.grouping import Groups
from common.diffusion.gaussian import GaussianDiffusion
from common.diffusion.likelihood import normal_kl

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]


@dataclasses.dataclass(frozen=True)
class FixedDraws:
  """Per group: test-image indices [n], 0-based timesteps [n] inside the group, noise [n, H, W, C]."""

  index: tuple[np.ndarray, ...]
  t: tuple[np.ndarray, ...]
  noise: tuple[np.ndarray, ...]


def fixed_draws(groups: Groups, x0: np.ndarray, per_group: int, seed: int = 0) -> FixedDraws:
  """``per_group`` (x0, t, eps) triples for every group, a function of the arguments only.

  Args:
    groups: the grouping.
    x0: [M, H, W, C] the held-out images (only the shape is read).
    per_group: triples per group (images are drawn with replacement).
    seed: numpy seed.
  """
  chex.assert_rank(x0, 4)
  if per_group < 1:
    raise ValueError(f"per_group={per_group}: need at least one draw per group")
  rng = np.random.default_rng(seed)
  index, ts, noise = [], [], []
  for t_lo, t_hi in groups.intervals:
    index.append(rng.integers(0, len(x0), per_group))
    ts.append(rng.integers(t_lo, t_hi + 1, per_group).astype(np.int32))
    noise.append(rng.standard_normal((per_group, *x0.shape[1:])).astype(np.float32))
  return FixedDraws(tuple(index), tuple(ts), tuple(noise))


def prior_bpd(diffusion: GaussianDiffusion, x0: np.ndarray) -> float:
  """Mean KL(q(x_T | x0) || N(0, I)) in bits/dim over ``x0`` [M, H, W, C]."""
  abar_t = float(diffusion.np_alpha_bar_levels()[-1])
  mean = math.sqrt(abar_t) * jnp.asarray(x0)
  log_var = jnp.full_like(mean, math.log(1.0 - abar_t))
  kl = normal_kl(mean, log_var, jnp.zeros_like(mean), jnp.zeros_like(mean))
  return float(jnp.mean(kl) / math.log(2.0))


def make_terms_fn(diffusion: GaussianDiffusion, apply: ApplyFn):
  """Jitted ``(params, x0, t, noise, y) -> (mse [B], vlb [B] | zeros)`` for one network."""

  @jax.jit
  def terms(params, x0, t, noise, y):
    out = diffusion.training_losses(lambda x, tt, yy: apply(params, x, tt, yy), x0, t, noise, y)
    return out["mse"], out.get("vlb", jnp.zeros_like(out["mse"]))

  return terms


def per_example_terms(terms_fn, params, x0: np.ndarray, index: np.ndarray, t: np.ndarray,
                      noise: np.ndarray, labels: np.ndarray | None = None, *,
                      batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
  """Per-draw L_simple and VLB term of one network, in padded batches of one compiled shape.

  Args:
    terms_fn: from ``make_terms_fn``.
    params: its network's parameters.
    x0: [M, H, W, C] float32 images the draws index.
    index: [n] ints into ``x0``; ``t`` [n] ints; ``noise`` [n, H, W, C] float32.
    labels: [M] int32 for a class-conditional network, else None.
    batch_size: every call's batch, so one program serves every call (a short last batch is
      padded with its first draw).

  Returns:
    (mse [n], vlb bits/dim [n]) as float64 numpy arrays.
  """
  n, batch = len(t), int(batch_size)
  mse, vlb = np.zeros(n), np.zeros(n)
  for s in range(0, n, batch):
    part = np.arange(s, min(s + batch, n))
    padded = np.concatenate([part, np.full(batch - len(part), part[0])])
    y = None if labels is None else jnp.asarray(labels[index[padded]], jnp.int32)
    m, v = terms_fn(
      params,
      jnp.asarray(x0[index[padded]]),
      jnp.asarray(t[padded], jnp.int32),
      jnp.asarray(noise[padded]),
      y,
    )
    mse[part] = np.asarray(m)[: len(part)]
    vlb[part] = np.asarray(v)[: len(part)]
  return mse, vlb


def heldout_losses(
  diffusion: GaussianDiffusion,
  groups: Groups,
  networks: Sequence[tuple[Callable, Any]],
  x0: np.ndarray,
  draws: FixedDraws,
  *,
  labels: np.ndarray | None = None,
  batch_size: int = 256,
) -> dict[str, Any]:
  """Held-out losses of the networks routed by group, on fixed draws.

  Args:
    diffusion: the schedule and loss.
    groups: the grouping the draws were made for (N groups).
    networks: per group ``(terms_fn, params)`` with ``terms_fn`` from ``make_terms_fn``; a single
      model is the same pair N times.
    x0: [M, H, W, C] float32 held-out images in [-1, 1].
    draws: from ``fixed_draws(groups, x0, ...)``.
    labels: [M] int32 for a class-conditional network, else None.
    batch_size: evaluation batch.

  Returns:
    ``{"groups": [{"t_range", "l_simple", "vlb_bpd_per_step", "vlb_bpd_contribution"}, ...],
    "l_simple": float, "vlb_bpd": float, "prior_bpd": float}``.
  """
  chex.assert_rank(x0, 4)
  if len(networks) != groups.num_groups:
    raise ValueError(f"need one network per group ({groups.num_groups}), got {len(networks)}")
  per_group = []
  for g, (terms_fn, params) in enumerate(networks):
    mses, vlbs = [], []
    n = len(draws.t[g])
    for s in range(0, n, batch_size):
      sl = slice(s, min(s + batch_size, n))
      idx = draws.index[g][sl]
      y = None if labels is None else jnp.asarray(labels[idx], jnp.int32)
      mse, vlb = terms_fn(
        params,
        jnp.asarray(x0[idx]),
        jnp.asarray(draws.t[g][sl]),
        jnp.asarray(draws.noise[g][sl]),
        y,
      )
      mses.append(np.asarray(mse))
      vlbs.append(np.asarray(vlb))
    size = groups.sizes[g]
    mean_vlb = float(np.concatenate(vlbs).mean())
    per_group.append(
      {
        "t_range": list(groups.intervals[g]),
        "l_simple": float(np.concatenate(mses).mean()),
        "vlb_bpd_per_step": mean_vlb,
        "vlb_bpd_contribution": float(size * mean_vlb),
      }
    )
  sizes = np.asarray(groups.sizes, np.float64)
  prior = prior_bpd(diffusion, x0)
  return {
    "groups": per_group,
    "l_simple": float(np.dot(sizes, [p["l_simple"] for p in per_group]) / sizes.sum()),
    "vlb_bpd": float(sum(p["vlb_bpd_contribution"] for p in per_group) + prior),
    "prior_bpd": prior,
  }
