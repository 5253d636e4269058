"""CollaFuse's sampling side: the server's half to the cut level ``cut_point``, the hand-off, and
the client's half to 0, each its own sampler call (they run on different machines).

On the uniform grid each side spaces its own share of ``sample_steps``; on the DDIM grid the cut
splits the whole chain's grid (``collab.ddim_split``), so with one shared network on both sides the
split chain is exactly the unsplit one. ``sample_diagnostics`` adds what each side could draw
alone, for the disclosure and quality measurements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from collab import ddim_split, server
from common.diffusion import sampling
from common.train.method import timestep_spacing, x0_clipping_kwargs
from common.train.validate import validate_sampler


class HandoffSampling:
  """Split sampling, mixed into ``collab.method.CollaFuse`` (listed before ``DDPM``).

  Needs from the class it is mixed into: ``self.config`` (``diffusion.*``, ``collab.*``),
  ``self.diffusion``, ``self.data_info``, ``self.class_conditional``, ``self.apply(params, x, t,
  y)``, ``self.cut_point`` and ``self.noising`` (the server's noising). The host's ``__init__``
  calls ``_check_ddim_grid()`` once those are set, so a DDIM grid the cut does not fit fails at
  construction rather than at the first sample.
  """

  @functools.cached_property
  def ddim_grid(self) -> np.ndarray | None:
    """The whole chain's DDIM grid, or None on the uniform spacing (``ddim_split.whole_grid``)."""
    return ddim_split.whole_grid(self.config)

  def _check_ddim_grid(self) -> None:
    """On the DDIM grid, ``ddim_split.check_split`` of the cut and the client's start level."""
    if timestep_spacing(self.config) != "ddim":
      return
    validate_sampler(self.config)  # a stride giving sample_steps (eval builds methods directly)
    ddim_split.check_split(
      self.ddim_grid, self.diffusion.num_timesteps, self.cut_point, self.client_start_level()
    )

  def steps_split(self) -> tuple[int, int]:
    """(server steps, client steps) of the configured sampling budget: proportional to the split
    (uniform), or the DDIM grid's levels above cut_point and at or below the client's start."""
    big_t, total = self.diffusion.num_timesteps, self.config.diffusion.sample_steps
    if self.ddim_grid is not None:
      return ddim_split.steps_split(self.ddim_grid, self.cut_point, self.client_start_level())
    if self.cut_point == 0:
      return min(total, big_t), 0
    if self.cut_point == big_t:
      return 0, min(total, big_t)
    s = min(max(1, round(total * (big_t - self.cut_point) / big_t)), big_t - self.cut_point)
    return s, min(max(1, total - s), self.client_start_level())

  def client_start_level(self) -> int:
    """The level the client starts from: cut_point, or the official code's offset
    cut_point + cut_point (1 - c)."""
    big_t = self.diffusion.num_timesteps
    if self.config.collab.client_start_offset == "code" and 0 < self.cut_point < big_t:
      return min(big_t, self.cut_point + round(self.cut_point * (1 - self.cut_point / big_t)))
    return self.cut_point

  def _sampler_kwargs(self, labels):
    d = self.config.diffusion
    guided = labels is not None and self.class_conditional
    return dict(
      sampler=d.sampler,
      eta=d.ddim_eta,
      guidance_scale=d.guidance_scale if guided else 1.0,
      null_label=self.data_info.num_classes if self.class_conditional else None,
      **x0_clipping_kwargs(self.config),
    )

  def server_handoff(self, server_params, rng, shape, labels=None, num_steps=None):
    """The server's half: pure noise -> x_cut at level cut_point, for a batch of requests.

    ``num_steps``: the server's steps (uniform), or the whole chain's whose DDIM grid it takes
    its part of (ddim); default: the configured ones.
    """
    s_steps, _ = self.steps_split()
    if self.ddim_grid is not None:
      s_steps = int(self.config.diffusion.sample_steps)
    return server.sample(
      self.diffusion,
      lambda x, t, y: self.apply(server_params, x, t, y),
      shape,
      rng,
      cut_point=self.cut_point,
      noising=self.noising,
      num_steps=num_steps or max(s_steps, 1),
      chain=self.config.collab.server_sampling_chain,
      spacing=timestep_spacing(self.config),
      labels=labels if self.config.collab.share_labels else None,
      **self._sampler_kwargs(labels if self.config.collab.share_labels else None),
    )

  def client_finish(
    self, client_params, x_handoff, rng, labels=None, num_steps=None, *, network=None, start=None
  ):
    """The client's half: the hand-off latent at level ``start`` -> x_0 with its own network.

    ``network``: ``(x, t, y) -> output`` replacing the client's network (the server finishing
    alone uses its own; tests count calls with it). ``start``: the first level (default
    ``client_start_level()``; T for the client run from pure noise). ``num_steps``: the client's
    steps (default its share, ``steps_split``). On the DDIM grid the client takes the whole
    chain's grid from ``start`` down (``num_steps`` unused); from pure noise (start T) it runs a
    whole DDIM chain of its steps, which needs a stride giving exactly that many.
    """
    start = self.client_start_level() if start is None else start
    _, c_steps = self.steps_split()
    if start == 0:
      return jnp.clip(x_handoff, -1.0, 1.0)
    big_t = self.diffusion.num_timesteps
    steps = min(num_steps or max(c_steps, 1), start)
    if self.ddim_grid is not None and start < big_t:
      levels = sampling.make_levels(
        big_t, int(self.config.diffusion.sample_steps), start, 0, spacing="ddim"
      )
    elif self.ddim_grid is not None:
      levels = ddim_split.levels_from_noise(big_t, steps, self.cut_point)
    else:
      levels = sampling.make_levels(big_t, steps, start, 0)
    if network is None:
      network = functools.partial(self.apply, client_params)
    # The hand-off enters at the grid's first level: ``start``, or the DDIM grid's top for T.
    segment = sampling.Segment(network, int(levels[0]), 0)
    return sampling.sample_segment(
      self.diffusion,
      segment,
      x_handoff,
      # Same stream as the server's global-chain steps (their levels are disjoint), so with one
      # shared network on both sides the split chain is exactly the unsplit one.
      rng,
      levels=levels,
      y=labels,
      clip_denoised=True,
      **{k: v for k, v in self._sampler_kwargs(labels).items() if k != "sampler"},
      sampler=self.config.diffusion.sampler,
    )

  def check_client_from_noise(self) -> None:
    """Raises ``ConfigError`` where ``sample_diagnostics`` could not draw the client from pure
    noise on the configured grid (the sweep checks every run before training any)."""
    if self.ddim_grid is not None and 0 < self.cut_point < self.diffusion.num_timesteps:
      big_t, steps = self.diffusion.num_timesteps, max(self.steps_split()[1], 1)
      ddim_split.levels_from_noise(big_t, steps, self.cut_point)

  @functools.cached_property
  def _client_sample_jit(self):
    res, ch = self.data_info.resolution, self.data_info.channels

    def run(params, k, rng, labels, n):
      client_params = jax.tree.map(lambda a: a[k], params["clients"])
      x_cut = self.server_handoff(params["server"], rng, (n, res, res, ch), labels)
      return self.client_finish(client_params, x_cut, rng, labels)

    return jax.jit(run, static_argnums=(4,))

  @functools.cached_property
  def _diagnostics_jit(self):
    res, ch = self.data_info.resolution, self.data_info.channels
    big_t = self.diffusion.num_timesteps

    def run(params, k, rng, labels, n):
      client_params = jax.tree.map(lambda a: a[k], params["clients"])
      x_cut = self.server_handoff(params["server"], rng, (n, res, res, ch), labels)
      out = {
        "generated": self.client_finish(client_params, x_cut, rng, labels),
        "handoff": x_cut,
        # What the server can produce alone: its own network continues the global chain from
        # cut_point to 0 (it was never trained there; that is the point of the measurement).
        "server_alone": self.client_finish(
          None, x_cut, rng, labels, network=functools.partial(self.apply, params["server"])
        ),
      }
      if self.cut_point > 0:
        # The client alone at equal inference compute: its own network from pure noise with
        # only its cut_point-share of the steps (the official code's ``client_from_noise``).
        noise = jax.random.normal(jax.random.fold_in(rng, 1 << 22), x_cut.shape, jnp.float32)
        out["client_from_noise"] = self.client_finish(
          client_params, noise, rng, labels, start=big_t
        )
      return out

    return jax.jit(run, static_argnums=(4,))

  def sample_diagnostics(self, params, k, rng, n, labels=None) -> dict[str, np.ndarray]:
    """Everything one request of client ``k`` involves, each [n, H, W, C] float32.

    ``generated`` (CollaFuse output), ``handoff`` (the server's x_cut: what the client receives),
    ``server_alone`` (the server's own network continued to t=0) and, for cut_point > 0,
    ``client_from_noise`` (the client's network from pure noise with its cut_point-share of steps).
    ``generated`` equals ``sample_client`` with the same arguments.
    """
    y = None if labels is None else jnp.asarray(labels, jnp.int32)
    out = self._diagnostics_jit(params, jnp.int32(k), rng, y, n)
    return {name: np.asarray(v) for name, v in out.items()}
