"""The trained models of a hybrid run and the hybrid sampler: edge (cluster-wide) then device.

A request of user i with cut point n_i runs the reverse chain from level T to level n_i on the
edge with the cluster-wide model, batched with every other admitted request, then levels n_i..1 on
the device with the user's personalized model (spec §1, §11 A). ``n = 0`` is the cluster-wide model
alone, ``n = T`` the personalized model alone.

Every row of a batch carries its own PRNG key, and the noise of the step leaving level k of a row
is ``normal(fold_in(key_i, k), (1, H, W, C))``, the convention of ``common.diffusion.sampling`` for a
one-row chain. So a row's result does not depend on which other rows share its batch, and
``n = 0`` / ``n = T`` reproduce ``sampling.sample`` of the cluster / personalized model with that
key (``tests/hybrid/test_hybrid_models.py``). The chain is always the full one (every level), as
the paper's 200 inference steps with T = 200.

Both halves are segments of the core's chain (``common.diffusion.sampling.sample_chain``) with
per-row bounds: on the edge, row i is updated while its level is above n_i and frozen after, so the
batch shares one network call per level (what the latency model charges every admitted user for)
and the chain stops at the smallest cut point; the device's segment runs n_i -> 0 with its user's
slice of the stacked tree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common.diffusion import GaussianDiffusion, sampling
from common.train.method import x0_clipping_kwargs
from hybrid import fields


def row_keys(rng: jax.Array, batch: int) -> jax.Array:
  """Per-row keys: ``rng`` itself when it already holds ``batch`` keys, else ``split(rng, batch)``.

  Accepts typed keys (``jax.random.key``) and raw uint32 keys (``jax.random.PRNGKey``).
  """
  rng = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
  if sampling.is_row_keys(rng):
    if rng.shape[0] != batch:
      raise ValueError(f"got {rng.shape[0]} row keys for a batch of {batch}")
    return rng
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if rng.ndim != (0 if typed else 1):
    raise ValueError(f"rng must be one key or [B] keys, got shape {rng.shape}")
  return jax.random.split(rng, batch)


class Programs:
  """The jitted reverse chain shared by the edge and the device, for one network architecture.

  ``chain(params, x [B, H, W, C], k_start [B], k_end [B], keys [B]) -> x`` runs row i from level
  ``k_start[i]`` down to ``k_end[i]``; ``step(params, x, k, keys)`` is one batched step leaving
  level k (what ``hybrid.profile`` times). Compiled once per batch shape.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    diffusion: GaussianDiffusion,
    apply: Callable[[Any, jax.Array, jax.Array], jax.Array],
  ):
    d = config.diffusion
    if d.sampler not in sampling.SAMPLERS:
      raise ValueError(f"unknown sampler {d.sampler!r}; allowed: {', '.join(sampling.SAMPLERS)}")
    self.diffusion = diffusion
    self.apply = apply
    self.sampler = str(d.sampler)
    self.eta = float(d.ddim_eta) if self.sampler == "ddim" else 0.0
    self.clip_denoised = bool(d.clip_denoised)
    self.x0_clipping = x0_clipping_kwargs(config)
    self.num_timesteps = int(diffusion.num_timesteps)
    # The full chain: every level, as the paper's 200 inference steps with T = 200.
    self.levels = np.arange(self.num_timesteps, -1, -1, dtype=np.int32)
    self.chain = jax.jit(self._chain)
    self.step = jax.jit(self._step_at)
    self.device_chain = jax.jit(self._device_chain)

  def _run(self, params, x, k_start, k_end, keys, side):
    """One segment of the core's chain with per-row bounds and per-row noise streams."""
    segment = sampling.Segment(
      lambda x, t, y: self.apply(params, x, t), k_start, k_end, side=side
    )  # fmt: skip
    return sampling.sample_chain(
      self.diffusion, [segment], x, keys, levels=self.levels, sampler=self.sampler, eta=self.eta,
      clip_denoised=self.clip_denoised, **self.x0_clipping,
    )  # fmt: skip

  def _chain(self, params, x, k_start, k_end, keys):
    return self._run(params, x, k_start, k_end, keys, "edge")

  def _step_at(self, params, x, k, keys):
    k = jnp.full((x.shape[0],), k, jnp.int32)
    return self._run(params, x, k, k - 1, keys, "edge")

  def _device_chain(self, personal_params, user, x, k_start, keys):
    params = jax.tree.map(lambda a: a[user], personal_params)
    return self._run(params, x, k_start, jnp.zeros_like(k_start), keys, "device")


@dataclasses.dataclass
class HybridModels:
  """A hybrid run's networks (EMA weights) and the compiled sampler over them."""

  config: ml_collections.ConfigDict  # the run's resolved config
  diffusion: GaussianDiffusion
  cluster_params: Any  # pytree, the cluster-wide network's (EMA) params
  personal_params: Any  # pytree, stacked: every leaf has leading axis U
  num_users: int  # U (number of personalized models)
  image_shape: tuple[int, int, int]  # (H, W, C)
  programs: Programs | None = None  # built from config when not given (a method shares its own)
  step: int = -1  # the checkpoint step the params come from

  def __post_init__(self):
    if self.programs is None:
      self.programs = programs_for(self.config)
    for leaf in jax.tree.leaves(self.personal_params):
      if leaf.shape[0] != self.num_users:
        raise ValueError(
          f"personal_params leaves need a leading axis of {self.num_users} users, got {leaf.shape}"
        )

  @property
  def num_timesteps(self) -> int:
    return int(self.diffusion.num_timesteps)

  def denoise_fn(self, params):
    """``(x, t, y) -> output`` of one network (the form ``common.diffusion.sampling`` takes)."""
    return lambda x, t, y: self.programs.apply(params, x, t)


_PROGRAMS: dict[str, Programs] = {}


def programs_for(config: ml_collections.ConfigDict) -> Programs:
  """The compiled chain of ``config``'s network and sampler, shared by every run with the same
  ``model``, ``data`` and ``diffusion`` fields in this process (so a loop over runs or a
  reloaded run compiles nothing twice)."""
  from common.train import method as method_lib

  key = json.dumps(
    {k: json.loads(config[k].to_json()) for k in ("model", "data", "diffusion")}, sort_keys=True
  )
  if key not in _PROGRAMS:
    _PROGRAMS[key] = Programs(config, method_lib.make_diffusion(config), _network_apply(config))
  return _PROGRAMS[key]


def _network_apply(config):
  """The U-Net's ``apply(params, x, t)`` of ``config.model`` (unconditional)."""
  from common import data
  from common.train.method import DDPM

  net = DDPM(config, data.get_info(config.data))
  return lambda params, x, t: net.apply(params, x, t, None)


def _check_cut_points(cut_points, batch: int, big_t: int) -> jax.Array:
  if not isinstance(cut_points, jax.core.Tracer):
    s = np.asarray(cut_points)
    if s.shape != (batch,) or s.dtype.kind not in "iu":
      raise ValueError(f"cut_points must be [{batch}] integers, got {s.dtype} {s.shape}")
    if s.min() < 0 or s.max() > big_t:
      raise ValueError(f"cut points must lie in [0, T={big_t}], got [{s.min()}, {s.max()}]")
  return jnp.asarray(cut_points, jnp.int32)


def edge_denoise(models: HybridModels, x_T, cut_points, rng) -> jax.Array:
  """Cluster-wide model, one batch for all admitted users: level T down to n_i per row.

  Args:
    models: the run's models.
    x_T: [B, H, W, C] float32 noise.
    cut_points: [B] int32 cut points n_i in [0, T] (row i is frozen once it reaches n_i).
    rng: one key (split into B row keys) or [B] per-request keys.

  Returns:
    [B, H, W, C] float32: x_{n_i} per row.
  """
  x_T = jnp.asarray(x_T, jnp.float32)
  chex.assert_rank(x_T, 4)
  chex.assert_shape(x_T, (None, *models.image_shape))
  b = x_T.shape[0]
  big_t = models.num_timesteps
  n = _check_cut_points(cut_points, b, big_t)
  keys = row_keys(rng, b)
  return models.programs.chain(
    models.cluster_params, x_T, jnp.full((b,), big_t, jnp.int32), n, keys
  )


def device_denoise(models: HybridModels, user, x_n, cut_point, rng) -> jax.Array:
  """Personalized model of ``user`` runs levels n..1 on x_n and returns x_0 in [-1, 1].

  Args:
    models: the run's models.
    user: int in [0, U).
    x_n: [H, W, C] (one request; ``rng`` is then its key) or [b, H, W, C].
    cut_point: the level x_n is at: an int or [b] ints in [0, T]; n = 0 returns x_n unchanged.
    rng: one key or [b] per-request keys (as for ``edge_denoise``).

  Returns:
    x_0 with x_n's shape, float32.
  """
  if not 0 <= int(user) < models.num_users:
    raise ValueError(f"user must be in [0, {models.num_users}), got {user}")
  x = jnp.asarray(x_n, jnp.float32)
  single = x.ndim == 3
  if single:
    x = x[None]
    rng = jnp.asarray(rng)
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if rng.ndim == (0 if typed else 1):
      rng = rng[None]
  chex.assert_shape(x, (None, *models.image_shape))
  b = x.shape[0]
  n = np.broadcast_to(np.asarray(cut_point), (b,)) if np.ndim(cut_point) == 0 else cut_point
  n = _check_cut_points(n, b, models.num_timesteps)
  out = models.programs.device_chain(
    models.personal_params, jnp.int32(user), x, n, row_keys(rng, b)
  )
  return out[0] if single else out


def initial_noise(models: HybridModels, keys: jax.Array) -> jax.Array:
  """x_T of each request: ``sampling.initial_noise(key_i, (1, H, W, C))``. [B, H, W, C]."""
  shape = (1, *models.image_shape)
  return jax.vmap(lambda k: sampling.initial_noise(k, shape)[0])(keys)


def hybrid_sample(models: HybridModels, users, cut_points, rng) -> jax.Array:
  """``edge_denoise`` then ``device_denoise`` per user.

  Args:
    models: the run's models.
    users: [B] ints in [0, U).
    cut_points: [B] ints in [0, T].
    rng: one key (split into B request keys) or [B] request keys; x_T of request i is
      ``sampling.initial_noise(key_i, (1, H, W, C))``.

  Returns:
    x_0: [B, H, W, C] float32 in [-1, 1].
  """
  users = np.asarray(users)
  cut_points = np.asarray(cut_points)
  b = len(users)
  if users.shape != (b,) or cut_points.shape != (b,):
    raise ValueError(
      f"users and cut points must both be [B], got {users.shape} and {cut_points.shape}"
    )
  keys = row_keys(rng, b)
  x_n = edge_denoise(models, initial_noise(models, keys), cut_points, keys)
  out = x_n
  for u in np.unique(users):
    idx = np.flatnonzero(users == u)
    x0 = device_denoise(models, int(u), x_n[idx], cut_points[idx], keys[idx])
    out = out.at[idx].set(x0)
  return out


# ------------------------------------------------------------------------------------------------
# Loading a run.


def from_params(config, params, *, programs: Programs | None = None, step: int = -1):
  """``HybridModels`` over a hybrid params tree ``{'cluster': tree, 'users': stacked tree}``."""
  from common import data
  from common.train import method as method_lib

  info = data.get_info(config.data)
  leaves = jax.tree.leaves(params["users"])
  return HybridModels(
    config=config,
    diffusion=method_lib.make_diffusion(config),
    cluster_params=params["cluster"],
    personal_params=params["users"],
    num_users=int(leaves[0].shape[0]),
    image_shape=(int(info.resolution), int(info.resolution), int(info.channels)),
    programs=programs,
    step=step,
  )


def load_run(workdir: str, *, require_finished: bool = True) -> HybridModels:
  """Loads a finished ``hybrid.train`` workdir (latest checkpoint, EMA weights).

  Raises:
    FileNotFoundError: no ``config.json`` or no checkpoint in ``workdir``.
    ValueError: the workdir is another method's run, or (``require_finished``) stage 2 has not
      reached its last step.
  """
  from common import eval as eval_lib
  from common.train import loop

  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"{workdir}: no config.json (not a hybrid.train workdir)")
  config = loop.load_config(workdir)
  if config.method != "hybrid":
    raise ValueError(
      f"{workdir} is a {config.method!r} run, not a hybrid.train workdir (method 'hybrid')"
    )
  config, method, params, step = eval_lib.load_params(workdir)
  config = fields.upgrade(config)  # a run saved before the cut point's rename
  if require_finished and step < int(config.total_steps):
    raise ValueError(
      f"{workdir}: the personalized models are at step {step} of {config.total_steps}; "
      "resume `python -m hybrid.train` to finish them"
    )
  return from_params(config, jax.device_get(params), programs=method.programs, step=step)
