"""E5: the pruner ablation on the proxy alone (spec §8.3), no stage 2.

proxy_search(det) with and without the memory bank, uniform width, best-of-M random and an L1
one-shot pruner, for every pruned group of the reference arm and every proxy seed in
``experiments.search_seeds``; claim C6 reads the records (``adaptive.claims.pruner_claims``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from absl import logging

from common import fileio
from common.train.validate import ConfigError

PRUNER_VARIANTS = ("proxy_memory", "proxy_no_memory", "uniform", "random", "l1_oneshot")


def l1_oneshot(base_params, model_config, image_size: int, base, target: float, flops_fn,
               score_fn, *, tol: float):  # fmt: skip
  """One-shot magnitude pruning: no proxy inside the loop, the result scored once.

  From the full structure, repeatedly take the single edit (``search_space.search_space_edits``) that
  removes the least L1 weight mass of the inherited network per FLOP saved, until the structure
  is inside ``|flops / target - 1| <= tol``.

  Returns:
    SearchResult with ``pruner="l1_oneshot"``, one evaluation.
  """
  import jax

  from adaptive import inheritance, search_space
  from adaptive.search import SearchResult

  lo = target * (1 - tol)
  cache: dict[Any, float] = {}

  def mass(s) -> float:
    if s not in cache:
      tree = inheritance.inherit_weights(base_params, model_config, s, image_size=image_size)
      cache[s] = float(sum(np.abs(x).sum() for x in jax.tree.leaves(tree)))
    return cache[s]

  def inside(s) -> bool:
    return abs(flops_fn(s) / target - 1.0) <= tol

  cur, log = base, []
  while not inside(cur):
    now = flops_fn(cur)
    # An edit can save nothing (a width notch that rounds to the same whole GroupNorm groups).
    cands = [c for _, c in search_space.search_space_edits(base, cur) if lo <= flops_fn(c) < now]
    if not cands:
      break
    cur = min(cands, key=lambda c: ((mass(cur) - mass(c)) / (now - flops_fn(c)), flops_fn(c), c))
    log.append({"structure": cur.to_dict(), "flops": flops_fn(cur), "l1_mass": mass(cur)})
  return SearchResult(
    "l1_oneshot", cur, flops_fn(cur), float(score_fn(cur)), float(target), 1, len(log),
    inside(cur), log,
  )  # fmt: skip


def _run_pruner(variant: str, config, base_params, base, target, flops_fn, score_fn, seed: int):
  from adaptive.search import get_pruner

  p = config.adaptive.pruner
  if variant in ("proxy_memory", "proxy_no_memory"):
    cap = int(p.max_evals_per_round)
    pruner = get_pruner(
      "proxy_search(det)",
      tol=float(p.tol),
      beam_width=int(p.beam),
      max_rounds=int(p.max_rounds),
      use_memory=variant == "proxy_memory",
      max_evals_per_round=cap if cap > 0 else None,
    )
  elif variant == "uniform":
    pruner = get_pruner("uniform")
  elif variant == "random":
    pruner = get_pruner("random", num=int(p.random_candidates), tol=float(p.tol))
  else:
    return l1_oneshot(
      base_params, config.model, int(config.data.resolution), base, target, flops_fn, score_fn,
      tol=float(p.tol),
    )  # fmt: skip
  return pruner.prune(base, target, flops_fn, score_fn, seed=seed)


def run_pruners(config, e5_dir: str, stage1_dir: str, ref_dir: str, *, programs) -> dict:
  """E5 for one training seed: every variant x proxy seed x pruned group of the reference arm.

  Proxy seed 0 is the seed ``adaptive.train`` prunes with, so its ``proxy_memory`` search is the
  reference arm's (reused from ``ref_dir/pruning`` where that exists). All variants of one
  (group, proxy seed) share one score function, so their final scores are paired.

  Returns:
    ``{"groups": [...], "variants": {variant: {"<q>": {"<g>": result}}}}``; a result is the
    pruner's ``SearchResult.to_dict()`` without its log, plus ``flops_ratio`` and ``seconds``.
  """
  import jax

  from adaptive import heldout, proxy, pruning, search_space, stages
  from common import data
  from common import eval as eval_lib

  a, e = config.adaptive, config.experiments
  seed = int(config.seed)
  unknown = sorted(set(e.pruners) - set(PRUNER_VARIANTS))
  if unknown:
    raise ConfigError("experiments.pruners", unknown, f"one of {', '.join(PRUNER_VARIANTS)}")
  info = data.get_info(config.data)
  groups = stages.validate(config)
  flops_fn = pruning.flops_fn_for(config, info)
  targets = pruning.flops_targets(config, groups, flops_fn)
  base = search_space.base_structure(config.model)
  full = flops_fn(base)
  pruned_groups = [g for g, t in enumerate(targets) if abs(full / t - 1.0) > float(a.pruner.tol)]
  out: dict[str, Any] = {"groups": pruned_groups, "targets": targets, "variants": {}}
  base_params = x_fit = None
  for g in pruned_groups:
    for q in [int(q) for q in e.search_seeds]:
      score_fn = memo = None
      for variant in e.pruners:
        path = os.path.join(e5_dir, variant, f"search{q}", f"group{g}.json")
        reuse = os.path.join(ref_dir, pruning.PRUNING_DIR, f"group{g}.json")
        if not os.path.exists(path) and variant == "proxy_memory" and q == 0:
          if os.path.exists(reuse):
            with open(reuse) as f:
              rec = json.load(f)
            if rec.get("search") and rec["search"]["pruner"] == "proxy_search(det)":
              fileio.write_json(
                path, {**_slim(rec["search"], full), "seconds": rec["seconds"]}, indent=1
              )
        if not os.path.exists(path):
          if base_params is None:
            _, _, bp, _ = eval_lib.load_params(stage1_dir, step=stages.stage1_steps(config))
            base_params = jax.device_get(bp)
            x_fit, y_fit, x_val, y_val = proxy.proxy_split(config, seed)
            draws = heldout.fixed_draws(groups, x_val, int(a.pruner.proxy_eval_examples), seed=seed)
          if score_fn is None:
            raw = proxy.make_score_fn(
              config, info, base_params, groups.intervals[g], x_fit, x_val, draws, g,
              seed=seed + 1000 * g + 7919 * q, programs=programs,
            )  # fmt: skip
            memo: dict[Any, float] = {}

            # Deterministic in (structure, seed): sharing values across variants only saves time;
            # each pruner still counts every call it makes as an evaluation.
            def score_fn(s, raw=raw, memo=memo):
              if s not in memo:
                memo[s] = raw(s)
              return memo[s]

          t0 = time.time()
          result = _run_pruner(
            variant, config, base_params, base, targets[g], flops_fn, score_fn, seed + q
          )
          fileio.write_json(
            path, {**_slim(result.to_dict(), full), "seconds": time.time() - t0}, indent=1
          )
          logging.info(
            "E5 seed %d group %d proxy seed %d %s: score %.4f, %d evaluations, %d rounds, "
            "%.3f F", seed, g, q, variant, result.score, result.evaluations, result.rounds,
            result.flops / full,
          )  # fmt: skip
        with open(path) as f:
          out["variants"].setdefault(variant, {}).setdefault(str(q), {})[str(g)] = json.load(f)
  return out


def _slim(search: dict, full: float) -> dict:
  keep = ("pruner", "structure", "flops", "score", "target_flops", "evaluations", "rounds")
  return {
    **{k: search[k] for k in keep},
    "converged": bool(search["converged"]),
    "flops_ratio": search["flops"] / full,
  }
