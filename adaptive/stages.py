"""A TDC config read into its two stages (spec §3.1), every field checked before anything trains.

Stage 1 is the plain DDPM for ``S1 = stage1_frac * B`` steps; the timesteps are cut into the
config's groups; stage 2 trains a network per group for the training FLOPs the single model's
budget B leaves after stage 1 (C7). What each group's network is comes between the stages
(``adaptive.pruning``).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import ml_collections

from adaptive import grouping, inheritance, pruning, search_space
from common.train import drift
from common.train import method as method_lib
from common.train.validate import ConfigError

# ------------------------------------------------------------------------------------------------
# Stage 1 and the groups.


def stage1_steps(config: ml_collections.ConfigDict) -> int:
  """Steps of stage 1: ``round(stage1_frac * total_steps)``, at least 1."""
  from common.train import validate as validate_lib

  # B is checked here, not first by stage 1's loop: a B < 1 would become a 1-step stage 1.
  validate_lib.require(config, "total_steps", validate_lib.integer(1), "must be an integer >= 1")
  frac = float(config.adaptive.stage1_frac)
  if not 0.0 < frac <= 1.0:
    raise ConfigError("adaptive.stage1_frac", frac, "must be in (0, 1]")
  return max(1, round(frac * int(config.total_steps)))


def stage1_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The base model's run: the same network, data and optimizer, the DDPM method, S1 steps."""
  c = copy.deepcopy(config)
  c.unlock()
  c.method = "ddpm"
  c.total_steps = stage1_steps(config)
  return c


def make_groups(config: ml_collections.ConfigDict) -> grouping.Groups:
  """The run's timestep groups (``adaptive.grouping.*``); ConfigError on a bad value."""
  g = config.adaptive.grouping
  options: dict[str, Any] = {}
  if g.method == "snr_equal_db":
    options = {"clip_lo": float(g.clip_lo_db), "clip_hi": float(g.clip_hi_db)}
  elif g.method == "random":
    options = {"seed": int(g.seed)}
  elif g.method == "task_affinity_dp":
    options = {"cost": str(g.get("dp_cost", "log_snr"))}
  try:
    return grouping.make_groups(
      method_lib.make_diffusion(config), int(g.num_groups), str(g.method), **options
    )
  except ValueError as e:
    raise ConfigError("adaptive.grouping", g.to_dict(), str(e)) from None


# ------------------------------------------------------------------------------------------------
# Every check that needs no training.


def _validate_fields(config: ml_collections.ConfigDict) -> None:
  """``adaptive.*``'s own numbers and choices, each named in its one-line error."""
  from common.train.validate import boolean, integer, number, require, require_choice

  a, big_t = "adaptive.", int(config.diffusion.num_timesteps)
  require(
    config,
    a + "base_workdir",
    lambda v: not v or os.path.exists(os.path.join(v, "config.json")),
    "must be empty or a run holding config.json",
  )
  for k in ("base_step", "stage2_steps"):
    require(config, a + k, integer(-1), "must be an integer >= 0 or -1 (latest / by FLOPs)")
  if "stage2_ema_decay" in config.adaptive:
    require(config, a + "stage2_ema_decay", number(lambda v: v == -1.0 or 0.0 <= v < 1.0),
            "must be -1 (the run's ema_decay) or in [0, 1)")  # fmt: skip
  g = a + "grouping."
  require_choice(config, g + "method", grouping.METHODS)
  require(config, g + "num_groups", integer(1, big_t), f"must be an integer in [1, T={big_t}]")
  require(config, g + "seed", integer(0), "must be an integer >= 0")
  if "dp_cost" in config.adaptive.grouping:  # older configs lack it (default log_snr)
    require_choice(config, g + "dp_cost", grouping.DP_COSTS)
  require(config, g + "clip_lo_db", number(lambda v: v < config.adaptive.grouping.clip_hi_db),
          "must be a number < clip_hi_db")  # fmt: skip
  s = a + "scaling."
  require(config, s + "prune", boolean, "must be true or false")
  require_choice(config, s + "full_model_end", grouping.FULL_MODEL_ENDS)
  require(config, s + "rank_from", lambda v: v in (0, 1), "must be 0 or 1")
  p = a + "pruner."
  require_choice(config, p + "name", ("proxy_search(det)", "uniform", "random"))
  require(config, p + "use_memory", boolean, "must be true or false")
  require(config, p + "tol", number(lambda v: 0 <= v < 1), "must be in [0, 1)")
  require_choice(config, p + "selection", inheritance.SELECTIONS)
  for k, lo in (("beam", 1), ("max_rounds", 1), ("max_evals_per_round", 0)):
    if k in config.adaptive.pruner:  # max_evals_per_round is optional (0: off)
      require(config, p + k, integer(lo), f"must be an integer >= {lo}")
  for k, lo in (("random_candidates", 1), ("proxy_steps", 0), ("proxy_batch", 1)):
    require(config, p + k, integer(lo), f"must be an integer >= {lo}")
  require(config, p + "proxy_eval_examples", integer(1), "must be an integer >= 1")


def validate(config: ml_collections.ConfigDict) -> grouping.Groups:
  """Every check that needs no training, so a bad config fails before stage 1 starts.

  ``adaptive.train.run`` adds the shared loop's checks of stage 1's config (``loop.setup``)
  before it writes.
  """
  from common.train.validate import validate_data

  stage1_steps(config)
  _validate_fields(config)
  info = validate_data(config)
  groups = make_groups(config)
  pruning.flops_targets(config, groups, pruning.flops_fn_for(config, info))
  pruning.pruner_from_config(config)
  return groups


# ------------------------------------------------------------------------------------------------
# Stage 2.


def stage2_steps(config, stage1_done: int, pruned: list[dict[str, Any]]) -> int:
  """Steps left for stage 2 under the single model's training FLOPs (spec §3.1, C7).

  One stage-2 step trains every group network on a batch of ``batch_size``, one stage-1 step
  the base network on the same batch, so with per-sample training FLOPs ~3x the forward pass,
  steps = floor((B - S1) * F / sum_g F_g).
  """
  explicit = int(config.adaptive.stage2_steps)
  if explicit >= 0:
    return explicit
  base = pruned[0]["base_flops"]
  left = int(config.total_steps) - int(stage1_done)
  return max(0, math.floor(left * base / sum(p["flops"] for p in pruned)))


def stage2_config(config, groups, pruned, steps: int, base_flops_per_step: float):
  """The TDC run's config: groups, structures, the stage-2 step count; B kept as budget_steps."""
  c = copy.deepcopy(config)
  c.unlock()
  c.method = "adaptive"
  c.adaptive.budget_steps = int(config.total_steps)
  c.total_steps = int(steps)
  c.adaptive.cuts = [int(x) for x in groups.cuts]
  overrides = [
    search_space.structure_to_model_config(
      config.model, search_space.Structure.from_dict(p["structure"])
    )
    for p in pruned
  ]
  c.adaptive.group_models = [
    {k: list(v) if isinstance(v, tuple) else v for k, v in o.items()} for o in overrides
  ]
  c.adaptive.base_flops_per_step = float(base_flops_per_step)
  c.ckpt_every_steps = max(1, min(int(c.ckpt_every_steps), int(steps) or 1))
  stage2_ema = float(drift.added_field(config, "adaptive.stage2_ema_decay"))
  if stage2_ema >= 0.0:
    c.ema_decay = stage2_ema
  return c
