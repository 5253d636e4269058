"""CollaFuse's split chain on the DDIM grid (``diffusion.timestep_spacing=ddim``).

On the uniform grid each side spaces its own share of ``sample_steps`` between its bounds
(``CollaFuse.steps_split``). On the DDIM grid the grid is the whole chain's (``whole_grid``) and the
cut splits it: the server takes its levels down to cut_point, the client its levels from its start
level, so with the same network on both sides the split chain is the unsplit DDIM chain. A cut (or
client start) off that grid is a config error, not a silently different grid (``check_split``).
"""

from __future__ import annotations

import numpy as np

from common.diffusion import sampling, steps
from common.train.method import timestep_spacing
from common.train.validate import ConfigError


def whole_grid(config) -> np.ndarray | None:
  """The whole chain's DDIM grid ([sample_steps + 1] levels, ``make_levels(..., "ddim")``), or
  None on the uniform spacing."""
  if timestep_spacing(config) != "ddim":
    return None
  d = config.diffusion
  return sampling.make_levels(d.num_timesteps, d.sample_steps, spacing="ddim")


def check_split(grid: np.ndarray, big_t: int, cut_point: int, start: int) -> None:
  """The cut point and the client's start level must be levels of ``grid`` (or T, pure noise) so
  that the two sides split it (``steps.check_grid_boundary``); raises ``ConfigError`` naming the
  spacing and the nearest levels."""
  # The cut must lie below the grid's top (the server needs a step above it); the client may
  # start anywhere on it.
  hint = ""
  try:
    steps.check_grid_boundary(grid, big_t, "collab.cut_point", cut_point, below_top=True)
    if start != cut_point:
      hint = " (collab.client_start_offset=code starts the client above the cut)"
      steps.check_grid_boundary(grid, big_t, "the client's start level", start)
  except ValueError as err:
    raise ConfigError(
      "diffusion.timestep_spacing", "ddim",
      f"{err}, where the server's and the client's parts of it meet{hint}; pick one or "
      "timestep_spacing=uniform",
    ) from None  # fmt: skip


def steps_split(grid: np.ndarray, cut_point: int, start: int) -> tuple[int, int]:
  """(server steps, client steps): the grid's levels above cut_point, and those at or below the
  client's start level (level 0 excluded: no step leaves it)."""
  return int(np.sum(grid > cut_point)), int(np.sum((grid > 0) & (grid <= start)))


def levels_from_noise(big_t: int, steps: int, cut_point: int) -> np.ndarray:
  """The DDIM grid of a whole ``steps``-step chain (the client from pure noise at its share of the
  steps); ``ConfigError`` where no stride gives that many."""
  try:
    return sampling.make_levels(big_t, steps, spacing="ddim")
  except ValueError:
    raise ConfigError(
      "diffusion.timestep_spacing", "ddim",
      f"the client from pure noise runs its {steps} steps (collab.cut_point={cut_point}), and no "
      f"stride gives exactly {steps} DDIM steps over T={big_t}; pick another cut point or "
      "timestep_spacing=uniform",
    ) from None  # fmt: skip
