"""TDC (arXiv 2312.13307) wired into the shared loop: N group networks, one per contiguous
timestep group, each trained only on its own timesteps and called only at them when sampling.

The same method is stage 2 (each group's network fine-tuned from weights pruned out of the stage-1
base model, which ``adaptive.train`` writes as the run's step-0 checkpoint), the single-stage
ablation E4 (the same networks from a random init) and what ``common.eval`` samples. One step
trains every group: the global batch holds ``batch_size`` images per group (the base model's batch,
spec §3.4), split in order, and each group's loss draws t uniformly inside its own interval.
Group networks may differ in structure (per-level widths, res blocks, attention), so they are a
dict of separate parameter trees, not a stacked one.
"""

from __future__ import annotations

import copy
from typing import Any

import chex
import jax
import ml_collections
import numpy as np

from adaptive import inheritance, routing, search_space
from adaptive.grouping import Groups
from common import data
from common.diffusion import sampling
from common.train.method import DDPM
from common.train.validate import ConfigError


def group_key(g: int) -> str:
  return f"group{g}"


class GroupNetwork(DDPM):
  """One group's network: a DDPM whose t is drawn from [t_lo, t_hi] only."""

  name = "adaptive_group"

  def __init__(self, config, data_info, t_range: tuple[int, int]):
    super().__init__(config, data_info)
    self.t_range = (int(t_range[0]), int(t_range[1]))

  def timestep_range(self) -> tuple[int, int]:
    return self.t_range[0], self.t_range[1] + 1


def group_model_config(
  config: ml_collections.ConfigDict, overrides: dict[str, Any] | None
) -> ml_collections.ConfigDict:
  """``config`` with ``model.*`` replaced by one group's structure (``None``: the base model)."""
  c = copy.deepcopy(config)
  c.unlock()
  for key, value in (overrides or {}).items():
    if key not in c.model:
      raise ConfigError("adaptive.group_models", key, "is not a model.* field")
    # A structure may turn an int field into a per-level tuple (num_res_blocks).
    with c.model.ignore_type():
      c.model[key] = tuple(value) if isinstance(value, list) else value
  return c


def groups_from_config(config: ml_collections.ConfigDict) -> Groups:
  """The ``Groups`` of ``adaptive.cuts`` (first 0-based timestep of groups 1..N-1)."""
  cuts = tuple(int(c) for c in config.adaptive.cuts)
  try:
    return Groups(cuts=cuts, num_timesteps=int(config.diffusion.num_timesteps))
  except ValueError as e:
    raise ConfigError("adaptive.cuts", list(cuts), str(e)) from None


class TDC(DDPM):
  """N group networks routed by timestep; params ``{"group0": tree, ..., "group{N-1}": tree}``."""

  name = "adaptive"

  def __init__(self, config, data_info):
    super().__init__(config, data_info)
    self.groups = groups_from_config(config)
    self._flops_per_step = None
    n = self.groups.num_groups
    overrides = list(config.adaptive.group_models or [])
    if overrides and len(overrides) != n:
      raise ConfigError(
        "adaptive.group_models",
        f"{len(overrides)} entries",
        f"need one structure per group ({n} groups) or none (every group the base model)",
      )
    self.members = [
      GroupNetwork(
        group_model_config(config, overrides[g] if overrides else None),
        data_info,
        self.groups.intervals[g],
      )
      for g in range(n)
    ]

  # --- networks -------------------------------------------------------------------------------
  def check_networks(self) -> None:
    for m in self.members:
      m.check_networks()

  def init_params(self, rng):
    return {
      group_key(g): m.init_params(jax.random.fold_in(rng, g)) for g, m in enumerate(self.members)
    }

  def build_network(self, rng):
    raise TypeError("TDC has one network per group: use .members[g].build_network")

  # --- training -------------------------------------------------------------------------------
  def train_iterator(self, *, process_index: int, process_count: int):
    return data.make_train_iterator(
      self.config.data,
      global_batch_size=self.images_per_step(),
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
    )

  def images_per_step(self) -> int:
    return int(self.config.batch_size) * self.groups.num_groups

  def loss_fn(self, params, batch, rng, step):
    n, b = self.groups.num_groups, int(self.config.batch_size)
    chex.assert_shape(batch["image"], (n * b, None, None, None))
    total, metrics = 0.0, {}
    for g, m in enumerate(self.members):
      part = {k: v[g * b : (g + 1) * b] for k, v in batch.items()}
      loss, aux = m.loss_fn(params[group_key(g)], part, jax.random.fold_in(rng, g), step)
      # Summed, not averaged: group g's gradient is its own loss's, as if trained alone.
      total = total + loss
      metrics[f"loss/{group_key(g)}"] = loss
      for k, v in aux.items():
        metrics[f"{k}/{group_key(g)}"] = v
    return total, metrics

  # --- sampling -------------------------------------------------------------------------------
  def denoise_fn(self, params):
    return routing.routed_denoise_fn(
      self.groups, [m.denoise_fn(params[group_key(g)]) for g, m in enumerate(self.members)]
    )

  def apply(self, params, x, t, y=None, dropout_rng=None):
    del dropout_rng
    return self.denoise_fn(params)(x, t, y)

  def sampling_chain(self, params, levels):
    """One segment per group over the sampler's grid (``routing.group_segments``)."""
    fns = [m.denoise_fn(params[group_key(g)]) for g, m in enumerate(self.members)]
    return routing.group_segments(self.groups, fns, levels)

  def sampler_timesteps(self) -> np.ndarray:
    """The 0-based model timesteps the configured sampler calls, in calling order."""
    return routing.sampler_timesteps(self.config)

  def routed_networks(self, params):
    """``(route, [(network, params)])``: ``route(t [n]) -> [n]`` group indices."""
    nets = [(m, params[group_key(g)]) for g, m in enumerate(self.members)]
    return self.groups.group_of, nets

  def sampling_steps_per_group(self) -> np.ndarray:
    """[N] sampler steps that call each group's network."""
    steps = self.groups.group_of(self.sampler_timesteps())
    return np.bincount(steps, minlength=self.groups.num_groups)

  def flops_per_step(self, params) -> list[float]:
    """FLOPs of one sampler step of each group's network at batch 1 (both passes under CFG).

    XLA's cost analysis depends on shapes only, so it runs once per method: ``common.eval``
    asks for it through both ``flops_per_sample`` and ``cost_description``.
    """
    if self._flops_per_step is None:
      self._flops_per_step = [
        m.denoiser_call_flops(params[group_key(g)], 1) for g, m in enumerate(self.members)
      ]
    return self._flops_per_step

  def flops_per_sample(self, params) -> float:
    return float(np.dot(self.sampling_steps_per_group(), self.flops_per_step(params)))

  def cost_description(self, params) -> dict[str, Any]:
    per_step = self.flops_per_step(params)
    steps = self.sampling_steps_per_group()
    out: dict[str, Any] = {
      "group_t_ranges": [list(iv) for iv in self.groups.intervals],
      "group_flops_per_step": per_step,
      "group_sampling_steps": steps.tolist(),
    }
    base = float(self.config.adaptive.get("base_flops_per_step", 0.0) or 0.0)
    if base > 0:
      out["base_flops_per_step"] = base
      out["sampling_flops_ratio"] = float(np.dot(steps, per_step) / (base * steps.sum()))
    return out


def validate_widths(widths) -> tuple[float, ...]:
  """The supernet's widths: strictly decreasing in (0, 1], the first 1.0 (the supernet itself).

  Raises:
    ConfigError: naming ``adaptive.supernet.widths``.
  """
  w = tuple(float(x) for x in widths)
  if (
    not w
    or w[0] != 1.0
    or any(not 0.0 < x <= 1.0 for x in w)
    or any(a <= b for a, b in zip(w[:-1], w[1:], strict=True))
  ):
    raise ConfigError(
      "adaptive.supernet.widths", list(w), "need strictly decreasing widths in (0, 1], first 1.0"
    )
  return w


class Supernet(DDPM):
  """E6 (``adaptive.supernet``): one U-Net whose uniform-width prefixes train together and are
  routed by sampler step.

  Params are the full network's pure dict (``DDPM``'s). ``config.adaptive.supernet.schedule``
  holds one index into ``widths`` per sampler step (``sampler_timesteps`` order); empty means
  the full width everywhere (the schedule is searched after training).
  """

  name = "adaptive_supernet"

  def __init__(self, config, data_info):
    super().__init__(config, data_info)
    s = config.adaptive.supernet
    self.widths = validate_widths(s.widths)
    base = search_space.base_structure(config.model)
    self.structures = [search_space.uniform_structure(base, w) for w in self.widths]
    self.members = [
      DDPM(
        group_model_config(config, search_space.structure_to_model_config(config.model, st)),
        data_info,
      )
      for st in self.structures
    ]
    steps = routing.sampler_timesteps(config)
    schedule = np.asarray(list(s.schedule or []), np.int64)
    if schedule.size and (
      schedule.shape != steps.shape or schedule.min() < 0 or schedule.max() >= len(self.widths)
    ):
      raise ConfigError(
        "adaptive.supernet.schedule",
        f"{schedule.size} entries",
        f"need one width index in [0, {len(self.widths)}) per sampler step ({steps.size})",
      )
    self.schedule = schedule if schedule.size else np.zeros(steps.shape, np.int64)
    self._plans = None
    self._flops_per_step = None

  # --- subnetworks ------------------------------------------------------------------------------
  @property
  def plans(self) -> list:
    if self._plans is None:
      like = jax.tree.map(
        lambda x: np.zeros(x.shape, np.int8),
        jax.eval_shape(lambda: self.init_params(jax.random.key(0))),
      )
      image_size = int(self.config.data.resolution)
      self._plans = [
        None
        if w == 1.0
        else inheritance.gather_plan(like, self.config.model, st, image_size=image_size)
        for w, st in zip(self.widths, self.structures, strict=True)
      ]
    return self._plans

  def subnet_params(self, params) -> list:
    """Per width, the subnetwork's parameters (the supernet's own at width 1)."""
    return [params if p is None else inheritance.apply_plan(params, p) for p in self.plans]

  def width_of_t(self) -> np.ndarray:
    """[T] width index per 0-based timestep: the schedule's entry of the nearest sampler step."""
    steps = routing.sampler_timesteps(self.config)
    t = np.arange(self.diffusion.num_timesteps)
    nearest = np.abs(t[:, None] - steps[None, :]).argmin(1)
    return self.schedule[nearest]

  def routed_networks(self, params):
    """``(route, [(network, params)])``: ``route(t [n]) -> [n]`` indices into the list."""
    table = self.width_of_t()
    nets = list(zip(self.members, self.subnet_params(params), strict=True))
    return (lambda t: table[np.asarray(t)]), nets

  # --- training ---------------------------------------------------------------------------------
  def loss_fn(self, params, batch, rng, step):
    total, metrics = 0.0, {}
    for i, (m, p) in enumerate(zip(self.members, self.subnet_params(params), strict=True)):
      loss, aux = m.loss_fn(p, batch, jax.random.fold_in(rng, i), step)
      total = total + loss  # summed: each width's gradient as if it trained alone
      metrics[f"loss/width{self.widths[i]:g}"] = loss
      for k, v in aux.items():
        metrics[f"{k}/width{self.widths[i]:g}"] = v
    return total, metrics

  # --- sampling ---------------------------------------------------------------------------------
  def denoise_fn(self, params):
    used = sorted(set(self.schedule.tolist()))
    subs = self.subnet_params(params)
    fns = [self.members[i].denoise_fn(subs[i]) for i in used]
    remap = {w: j for j, w in enumerate(used)}
    table = np.asarray([remap[w] for w in self.width_of_t()], np.int32)
    return sampling.routed_denoise_fn(table, fns)

  def apply(self, params, x, t, y=None, dropout_rng=None):
    del dropout_rng
    return self.denoise_fn(params)(x, t, y)

  def flops_per_step(self, params) -> list[float]:
    """XLA FLOPs of one sampler step of every width's subnetwork at batch 1."""
    if self._flops_per_step is None:
      self._flops_per_step = [
        m.denoiser_call_flops(p, 1)
        for m, p in zip(self.members, self.subnet_params(params), strict=True)
      ]
    return self._flops_per_step

  def sampling_steps_per_width(self) -> np.ndarray:
    return np.bincount(self.schedule, minlength=len(self.widths))

  def flops_per_sample(self, params) -> float:
    return float(np.dot(self.sampling_steps_per_width(), self.flops_per_step(params)))

  def cost_description(self, params) -> dict[str, Any]:
    per_step = self.flops_per_step(params)
    steps = self.sampling_steps_per_width()
    return {
      "widths": list(self.widths),
      "group_flops_per_step": per_step,
      "group_sampling_steps": steps.tolist(),
      "base_flops_per_step": per_step[0],
      "sampling_flops_ratio": float(np.dot(steps, per_step) / (per_step[0] * steps.sum())),
    }


def METHOD(config, data_info):  # noqa: N802 (the plugin name common.train.method imports)
  """TDC, or E6's slimmable supernet where ``config.adaptive.supernet.widths`` is set."""
  supernet = config.adaptive.get("supernet")
  if supernet is not None and supernet.get("widths"):
    return Supernet(config, data_info)
  return TDC(config, data_info)
