"""E6: a DDSM-style slimmable supernet with a per-step width schedule (spec §8.3).

The baseline the spec sets against TDC: one network whose uniform-width subnetworks share
weights, trained together, then a search for the width of every sampler step under the same
sampling FLOPs as the reference TDC arm. Our version:

* **Start.** Stage 1's base network (the same start as every TDC arm), with its channels put in
  L1 order by ``inheritance.rank_channels`` (the same function). The subnetwork of width ``w`` is
  then each channel space's first channels (``inheritance.gather_plan``): at ``w`` the one the L1
  pruner would inherit, and the same channels at every step while the weights train.
* **Training.** Every width on the same batch each step, the losses summed (slimmable networks'
  joint training; with a handful of widths the sandwich rule's samples are all of them). Stage 1
  plus this costs B base-network steps, like the TDC arms (C7).
* **Search.** Held-out L_simple of every width at every sampler timestep, on fixed (x0, eps)
  draws from the train split's proxy hold-out (never the test split), then the schedule that
  minimises the summed loss under the FLOPs budget, solved exactly as a multiple-choice knapsack
  (DP over quantised FLOPs). DDSM searches with an evolutionary algorithm on FID; an additive
  loss proxy makes the exact solution cheap, and the spec allows "a small GA or greedy".

The network is ``adaptive.method.Supernet``, what ``adaptive.method.METHOD`` builds when
``config.adaptive.supernet.widths`` is set: the shared loop trains it and ``common.eval``
samples it like any run.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import chex
import jax
import ml_collections
import numpy as np
from absl import logging

from adaptive import heldout, inheritance, pruning, routing, search_space, start_checkpoint
from adaptive.method import Supernet, validate_widths
from adaptive.proxy import proxy_split
from common import data, fileio
from common.train import method as method_lib
from common.train.method import DDPM
from common.train.validate import ConfigError

SEARCH_JSON = "supernet_search.json"
SUMMARY_JSON = "summary.json"


# ------------------------------------------------------------------------------------------------
# The width schedule.


def schedule_search(loss_table: np.ndarray, flops: np.ndarray, budget: float, *,
                    units: int = 2000) -> tuple[np.ndarray, float, float]:  # fmt: skip
  """The per-step widths that minimise the summed loss under a FLOPs budget, exactly.

  A multiple-choice knapsack: one option per step, cost ``flops[w]``, value ``loss_table[s, w]``.
  Costs are rounded *up* to ``flops.max() / units``, so the schedule's true FLOPs never exceed
  ``budget``; the optimum is exact up to that rounding.

  Args:
    loss_table: [S, W] float, the loss of width w at sampler step s.
    flops: [W] float, FLOPs per call of each width.
    budget: total FLOPs allowed over the S steps.
    units: quantisation steps per full-width call.

  Returns:
    (schedule [S] int64 width indices, its total FLOPs, its summed loss).

  Raises:
    ValueError: bad shapes, or a budget below S calls of the cheapest width.
  """
  table = np.asarray(loss_table, np.float64)
  f = np.asarray(flops, np.float64)
  if table.ndim != 2 or f.shape != (table.shape[1],):
    raise ValueError(f"loss_table [S, W] and flops [W] expected, got {table.shape}, {f.shape}")
  steps = table.shape[0]
  if budget < steps * f.min() * (1 - 1e-12):
    raise ValueError(
      f"FLOPs budget {budget:.4g} is below {steps} calls of the cheapest width ({f.min():.4g} each)"
    )
  unit = f.max() / units
  cost = np.ceil(f / unit - 1e-9).astype(np.int64)
  cap = int(math.floor(budget / unit + 1e-9))
  cap = max(cap, int(steps * cost.min()))  # the cheapest schedule fits however it rounds
  best = np.zeros(cap + 1)  # best[b]: least loss of the steps so far with cost <= b
  choice = np.zeros((steps, cap + 1), np.int8)
  for s in range(steps):
    new = np.full(cap + 1, np.inf)
    for w in range(f.shape[0]):
      c = int(cost[w])
      if c > cap:
        continue
      cand = np.full(cap + 1, np.inf)
      cand[c:] = best[: cap + 1 - c] + table[s, w]
      better = cand < new
      new[better] = cand[better]
      choice[s, better] = w
    best = new
  schedule = np.zeros(steps, np.int64)
  b = cap
  for s in reversed(range(steps)):
    w = int(choice[s, b])
    schedule[s] = w
    b -= int(cost[w])
  return schedule, float(f[schedule].sum()), float(table[np.arange(steps), schedule].sum())


def step_loss_table(method: Supernet, params, images: np.ndarray, *, per_step: int,
                    seed: int = 0, labels: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
  """[S, W] held-out L_simple of every width at every sampler timestep.

  Every width sees the same ``per_step`` (x0, eps) draws at a step, so the table's differences
  along W are paired.

  Args:
    method: the supernet.
    params: its parameters.
    images: [M, H, W, C] float32 images the draws index (not the test split).
    per_step: draws per sampler step.
    seed: fixes the draws.
    labels: [M] int32 for a class-conditional network.
  """
  chex.assert_rank(images, 4)
  steps = routing.sampler_timesteps(method.config)
  rng = np.random.default_rng(seed)
  index = rng.integers(0, len(images), (len(steps), per_step))
  noise = rng.standard_normal((len(steps), per_step, *images.shape[1:])).astype(np.float32)
  t = np.repeat(steps[:, None], per_step, 1)
  flat_i, flat_t, flat_n = index.reshape(-1), t.reshape(-1), noise.reshape(-1, *images.shape[1:])
  out = np.zeros((len(steps) * per_step, len(method.widths)))
  for w, (m, p) in enumerate(zip(method.members, method.subnet_params(params), strict=True)):
    terms = heldout.make_terms_fn(method.diffusion, m.apply)
    out[:, w], _ = heldout.per_example_terms(terms, p, images, flat_i, flat_t, flat_n, labels)
  return out.reshape(len(steps), per_step, -1).mean(1)


# ------------------------------------------------------------------------------------------------
# The E6 run.


def supernet_config(config, widths, steps: int, base_flops_per_step: float):
  """The supernet run's config: method and widths, its own step count, B kept as budget_steps."""
  c = copy.deepcopy(config)
  c.unlock()
  c.method = "adaptive"
  c.adaptive.budget_steps = int(config.total_steps)
  c.adaptive.base_flops_per_step = float(base_flops_per_step)
  c.adaptive.supernet = ml_collections.ConfigDict({"widths": list(widths), "schedule": []})
  c.total_steps = int(steps)
  c.ckpt_every_steps = max(1, min(int(c.ckpt_every_steps), int(steps) or 1))
  return c


def training_steps(config, stage1_done: int, flops: list[float]) -> int:
  """Supernet steps left under B's training FLOPs: floor((B - S1) F / sum_w F_w) (C7)."""
  left = int(config.total_steps) - int(stage1_done)
  return max(0, math.floor(left * flops[0] / sum(flops)))


def save_schedule_png(path: str, method: Supernet, loss_table: np.ndarray) -> None:
  """Width per sampler step over t, and each width's loss over t relative to the full width."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  t = routing.sampler_timesteps(method.config)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax1.step(t, [method.widths[i] for i in method.schedule], where="mid", color="C0")
  ax1.set_xlabel("timestep t (0-based)")
  ax1.set_ylabel("width multiplier")
  ax1.set_title("searched width per sampler step")
  for w in range(1, loss_table.shape[1]):
    ax2.plot(t, loss_table[:, w] / loss_table[:, 0], label=f"width {method.widths[w]:g}")
  ax2.axhline(1.0, color="gray", lw=0.8)
  ax2.set_xlabel("timestep t (0-based)")
  ax2.set_ylabel("L_simple / full width's")
  ax2.set_yscale("log")
  ax2.legend(fontsize=7)
  fig.tight_layout()
  fileio.write_figure(fig, path, dpi=120)


def run(config, workdir: str, *, widths, target_ratio: float, per_step: int = 128,
        devices: list | None = None) -> dict[str, Any]:  # fmt: skip
  """E6 end to end: supernet from stage 1's base, joint training, schedule search.

  Args:
    config: a ``configs/adaptive.py`` config with ``adaptive.base_workdir`` / ``base_step`` set
      (stage 1); ``total_steps`` is B.
    workdir: the run directory.
    widths: the supernet's widths (``validate_widths``).
    target_ratio: the schedule's sampling FLOPs over the base network's (analytic), e.g. the
      reference TDC arm's.
    per_step: held-out draws per sampler step for the search.
    devices: the devices the supernet trains on (default: all).

  Returns:
    the summary dict (also ``workdir/summary.json``); the searched schedule is written into
    ``workdir/config.json``, so ``common.eval`` samples with it.
  """
  from common import eval as eval_lib
  from common.train import loop

  widths = validate_widths(widths)
  if not 0.0 < float(target_ratio) <= 1.0:
    raise ConfigError("target_ratio", target_ratio, "must lie in (0, 1]")
  a = config.adaptive
  if not a.base_workdir:
    raise ConfigError("adaptive.base_workdir", "", "E6 starts from a stage-1 run; name it")
  data_info = data.get_info(config.data)
  os.makedirs(workdir, exist_ok=True)
  _, _, base_params, base_step = eval_lib.load_params(str(a.base_workdir), step=int(a.base_step))
  base_params = jax.device_get(base_params)
  flops_fn = pruning.flops_fn_for(config, data_info)
  base = search_space.base_structure(config.model)
  flops = [flops_fn(search_space.uniform_structure(base, w)) for w in widths]
  steps = training_steps(config, base_step, flops)
  base_call = DDPM(config, data_info).denoiser_call_flops(base_params, 1)
  c6 = supernet_config(config, widths, steps, base_call)

  latest = start_checkpoint.latest_step(workdir)
  if latest is None:
    ranked = inheritance.rank_channels(
      base_params, config.model, image_size=int(config.data.resolution)
    )
    start_checkpoint.write_start_checkpoint(c6, workdir, ranked, devices=devices)
  logging.info("E6: supernet of widths %s, %d steps in %s", list(widths), steps, workdir)
  if steps > 0 and (latest or 0) < steps:
    loop.train(c6, workdir, devices=devices)

  search = _searched_schedule(config, c6, workdir, widths, flops, target_ratio, per_step)
  c6.adaptive.supernet.schedule = list(search["schedule"])
  fileio.write_text(
    os.path.join(workdir, "config.json"), c6.to_json_best_effort(sort_keys=True, indent=2)
  )
  net = method_lib.load_method(c6, data_info)
  save_schedule_png(os.path.join(workdir, "summary.png"), net, np.asarray(search["loss_table"]))
  counts = np.bincount(search["schedule"], minlength=len(widths))
  summary = {
    "widths": list(widths),
    "steps": steps,
    "stage1_steps": base_step,
    "budget_steps": int(config.total_steps),
    "training_cost": {
      "stage1": float(base_step),
      "stage2": steps * sum(flops) / flops[0],
      "single_model": float(config.total_steps),
      "ratio": (base_step + steps * sum(flops) / flops[0]) / int(config.total_steps),
    },
    "sampling_flops_ratio": search["sampling_flops_ratio"],
    "target_ratio": float(target_ratio),
    "sampling_steps_per_width": counts.tolist(),
    "flops_ratio_per_width": [f / flops[0] for f in flops],
  }
  fileio.write_json(os.path.join(workdir, SUMMARY_JSON), summary, indent=1)
  logging.info(
    "E6: schedule at %.3f of the base's sampling FLOPs (target %.3f), steps per width %s, "
    "training FLOPs %.3f of the single model",
    summary["sampling_flops_ratio"], target_ratio, counts.tolist(),
    summary["training_cost"]["ratio"],
  )  # fmt: skip
  return summary


def _searched_schedule(config, c6, workdir: str, widths, flops: list[float], target_ratio: float,
                       per_step: int) -> dict[str, Any]:  # fmt: skip
  """The trained supernet's width schedule at ``target_ratio`` of the base's sampling FLOPs,
  from ``workdir/supernet_search.json`` where a run has searched it already."""
  from common import eval as eval_lib

  search_path = os.path.join(workdir, SEARCH_JSON)
  sampler_t = routing.sampler_timesteps(c6)
  budget = float(target_ratio) * len(sampler_t) * flops[0]
  if os.path.exists(search_path):
    with open(search_path) as f:
      return json.load(f)
  _, net, params, _ = eval_lib.load_params(workdir)
  _, _, x_val, y_val = proxy_split(config, int(config.seed))
  labels = y_val if config.model.class_conditional else None
  table = step_loss_table(net, params, x_val, per_step=per_step, seed=int(config.seed),
                          labels=labels)  # fmt: skip
  schedule, total, loss = schedule_search(table, np.asarray(flops), budget)
  search = {
    "widths": list(widths),
    "flops_per_width": flops,
    "target_ratio": float(target_ratio),
    "budget_flops": budget,
    "schedule": schedule.tolist(),
    "sampler_timesteps": sampler_t.tolist(),
    "sampling_flops_ratio": total / (len(sampler_t) * flops[0]),
    "summed_loss": loss,
    "summed_loss_full_width": float(table[:, 0].sum()),
    "loss_table": table.tolist(),
    "draws_per_step": int(per_step),
  }
  fileio.write_json(search_path, search, indent=1)
  return search
