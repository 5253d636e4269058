"""Pruning between the stages, one group at a time (spec §3.3, §4.3).

Each group gets the FLOPs budget ``(i/N + (N-i)/N k) F`` of the base network and a structure
from the configured pruner (``proxy_search(det)``, our deterministic stand-in for the paper's
GPT-4 proxy, scored by ``adaptive.proxy``); the result is recorded in
``DIR/pruning/group<g>.json``, where a rerun finds it. Also the analytic sampling FLOPs of the
pruned, routed chain.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
from absl import logging

from adaptive import grouping, heldout, proxy, routing, search_space
from adaptive.search import get_pruner
from common import fileio
from common.train.validate import ConfigError

PRUNING_DIR = "pruning"


def flops_fn_for(config: ml_collections.ConfigDict, data_info) -> Any:
  """Analytic ``structure -> FLOPs`` (batch 1, one call) of the config's base network."""
  learn_sigma = config.diffusion.loss == "hybrid"
  classes = data_info.num_classes if config.model.class_conditional else 0
  return search_space.make_flops_fn(
    config.model,
    int(config.data.resolution),
    data_info.channels,
    data_info.channels * (2 if learn_sigma else 1),
    classes,
  )


def flops_targets(config, groups: grouping.Groups, flops_fn) -> list[float]:
  """Per group FLOPs_g(i) of the base network (spec §3.3); all F without pruning.

  Raises:
    ConfigError: k outside (0, 1], a bad rank option, or a budget below the smallest structure
      of the search space.
  """
  s = config.adaptive.scaling
  base = search_space.base_structure(config.model)
  full = flops_fn(base)
  if not s.prune:
    return [full] * groups.num_groups
  try:
    targets = grouping.flops_budgets(
      full, groups.num_groups, float(s.k), str(s.full_model_end), int(s.rank_from)
    )
  except ValueError as e:
    raise ConfigError("adaptive.scaling", s.to_dict(), str(e)) from None
  smallest = flops_fn(search_space.smallest_structure(base))
  tol = float(config.adaptive.pruner.tol)
  if min(targets) * (1 + tol) < smallest:
    raise ConfigError(
      "adaptive.scaling.k",
      float(s.k),
      f"the smallest budget {min(targets) / full:.3f} F is below the smallest structure in the "
      f"search space ({smallest / full:.3f} F)",
    )
  return targets


def pruner_from_config(config: ml_collections.ConfigDict):
  """The pruner ``adaptive.pruner.*`` names, with its options; ConfigError on an unknown name."""
  p = config.adaptive.pruner
  if p.name == "proxy_search(det)":
    cap = int(p.get("max_evals_per_round", 0))
    return get_pruner(
      p.name,
      tol=float(p.tol),
      beam_width=int(p.beam),
      max_rounds=int(p.max_rounds),
      use_memory=bool(p.use_memory),
      max_evals_per_round=cap if cap > 0 else None,
    )
  if p.name == "random":
    return get_pruner(p.name, num=int(p.random_candidates), tol=float(p.tol))
  if p.name == "uniform":
    return get_pruner(p.name)
  raise ConfigError("adaptive.pruner.name", p.name, "proxy_search(det) | uniform | random")


def prune_groups(
  config: ml_collections.ConfigDict,
  data_info,
  base_params,
  groups: grouping.Groups,
  workdir: str,
  *,
  programs: proxy.ProgramCache | None = None,
) -> list[dict[str, Any]]:
  """A structure per group, from ``DIR/pruning/group<g>.json`` where it exists.

  Returns:
    per group ``{"group", "t_range", "target_flops", "structure", "flops", "search"}``; ``search``
    is the pruner's ``SearchResult.to_dict()`` (None where the budget is the full network).
  """
  a = config.adaptive
  flops_fn = flops_fn_for(config, data_info)
  base = search_space.base_structure(config.model)
  full = flops_fn(base)
  targets = flops_targets(config, groups, flops_fn)
  out_dir = os.path.join(workdir, PRUNING_DIR)
  os.makedirs(out_dir, exist_ok=True)
  conditional = bool(config.model.class_conditional) and data_info.num_classes > 0
  x_fit = y_fit = x_val = y_val = draws = None
  programs = programs or proxy.ProgramCache()
  results = []
  for g, target in enumerate(targets):
    path = os.path.join(out_dir, f"group{g}.json")
    if os.path.exists(path):
      with open(path) as f:
        results.append(json.load(f))
      logging.info("pruning: group %d from %s", g, path)
      continue
    t0 = time.time()
    if abs(full / target - 1.0) <= float(a.pruner.tol):
      # The full network already meets the budget: nothing to search.
      structure, search = base, None
    else:
      if x_fit is None:
        x_fit, y_fit, x_val, y_val = proxy.proxy_split(config, int(config.seed))
        draws = heldout.fixed_draws(
          groups, x_val, int(a.pruner.proxy_eval_examples), seed=int(config.seed)
        )
      score_fn = proxy.make_score_fn(
        config,
        data_info,
        base_params,
        groups.intervals[g],
        x_fit,
        x_val,
        draws,
        g,
        train_labels=y_fit if conditional else None,
        heldout_labels=y_val if conditional else None,
        seed=int(config.seed) + 1000 * g,
        programs=programs,
      )
      try:
        result = pruner_from_config(config).prune(
          base, target, flops_fn, score_fn, seed=int(config.seed)
        )
      except ValueError as e:
        raise ConfigError("adaptive.scaling", a.scaling.to_dict(), str(e)) from None
      structure, search = result.structure, result.to_dict()
    record = {
      "group": g,
      "t_range": list(groups.intervals[g]),
      "target_flops": float(target),
      "base_flops": float(full),
      "structure": structure.to_dict(),
      "flops": float(flops_fn(structure)),
      "search": search,
      "seconds": round(time.time() - t0, 1),
    }
    fileio.write_json(path, record, indent=1)
    evals = search["evaluations"] if search else 0
    logging.info(
      "pruning: group %d t=%s target %.3f F -> %.3f F (%d proxy evaluations, %d programs compiled,"
      " %.0f s) %s",
      g,
      groups.intervals[g],
      target / full,
      record["flops"] / full,
      evals,
      programs.compiled,
      record["seconds"],
      structure,
    )
    results.append(record)
  return results


def sampling_flops_ratio(config, groups, pruned) -> float:
  """Analytic sampling FLOPs of the routed chain over the base model's, at the sampler's steps
  (``routing.sampling_flops`` with each group's pruned FLOPs)."""
  return routing.sampling_flops(
    groups,
    [p["flops"] for p in pruned],
    base_flops=pruned[0]["base_flops"],
    timesteps=routing.sampler_timesteps(config),
  ).ratio
