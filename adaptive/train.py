"""TDC training end to end: ``python -m adaptive.train --config=configs/adaptive.py:digits --workdir=DIR``.

Stage 1 trains one base DDPM on all timesteps for ``stage1_frac * total_steps`` steps in
``DIR/stage1`` (or takes the checkpoint ``adaptive.base_step`` of an existing run given by
``adaptive.base_workdir``). The timesteps are then cut into N groups, each group gets the FLOPs
budget ``(i/N + (N-i)/N k) F`` and a structure from the pruner (``proxy_search(det)``, our
deterministic stand-in for the paper's GPT-4 proxy), and stage 2 fine-tunes every group's network,
initialised with the weights it inherits from the base, only on its own timesteps, in ``DIR``
itself: ``python -m common.eval --workdir=DIR`` evaluates the routed result.

Every stage resumes: stage 1 and 2 from their checkpoints, the pruning per group from
``DIR/pruning/group<g>.json``. The stage-2 run's ``total_steps`` is its own step count (what the
shared loop runs to); the single model's budget B stays in ``adaptive.budget_steps``.
Writes ``DIR/summary.json`` and ``DIR/summary.png`` (SNR curve with the group boundaries, FLOPs
per group against the target), each atomically (``common.fileio``). Every config field is
checked (``validate`` and the shared loop's ``setup`` of stage 1) before ``DIR`` is created: a bad
one is one line naming it and exit 2.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from adaptive import grouping, heldout, method, proxy, pruning
from adaptive.search import get_pruner
from common import data, fileio
from common.train import method as method_lib
from common.train.validate import ConfigError

STAGE1_DIR = "stage1"
PRUNING_DIR = "pruning"
SUMMARY_JSON = "summary.json"


# ------------------------------------------------------------------------------------------------
# Configs of the two stages.


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


def flops_fn_for(config: ml_collections.ConfigDict, data_info) -> Any:
  """Analytic ``structure -> FLOPs`` (batch 1, one call) of the config's base network."""
  learn_sigma = config.diffusion.loss == "hybrid"
  classes = data_info.num_classes if config.model.class_conditional else 0
  return pruning.make_flops_fn(
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
  base = pruning.base_structure(config.model)
  full = flops_fn(base)
  if not s.prune:
    return [full] * groups.num_groups
  try:
    targets = grouping.flops_budgets(
      full, groups.num_groups, float(s.k), str(s.full_model_end), int(s.rank_from)
    )
  except ValueError as e:
    raise ConfigError("adaptive.scaling", s.to_dict(), str(e)) from None
  smallest = flops_fn(pruning.smallest_structure(base))
  tol = float(config.adaptive.pruner.tol)
  if min(targets) * (1 + tol) < smallest:
    raise ConfigError(
      "adaptive.scaling.k",
      float(s.k),
      f"the smallest budget {min(targets) / full:.3f} F is below the smallest structure in the "
      f"search space ({smallest / full:.3f} F)",
    )
  return targets


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
  require_choice(config, p + "selection", pruning.SELECTIONS)
  for k, lo in (("beam", 1), ("max_rounds", 1), ("max_evals_per_round", 0)):
    if k in config.adaptive.pruner:  # max_evals_per_round is optional (0: off)
      require(config, p + k, integer(lo), f"must be an integer >= {lo}")
  for k, lo in (("random_candidates", 1), ("proxy_steps", 0), ("proxy_batch", 1)):
    require(config, p + k, integer(lo), f"must be an integer >= {lo}")
  require(config, p + "proxy_eval_examples", integer(1), "must be an integer >= 1")


def validate(config: ml_collections.ConfigDict) -> grouping.Groups:
  """Every check that needs no training, so a bad config fails before stage 1 starts.

  ``run`` adds the shared loop's checks of stage 1's config (``loop.setup``) before it writes.
  """
  from common.train.validate import validate_data

  stage1_steps(config)
  _validate_fields(config)
  info = validate_data(config)
  groups = make_groups(config)
  flops_targets(config, groups, flops_fn_for(config, info))
  _pruner(config)
  return groups


# ------------------------------------------------------------------------------------------------
# Pruning, one group at a time.


def _pruner(config: ml_collections.ConfigDict):
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


def proxy_split(config, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The train split cut into proxy fine-tuning images and proxy held-out images (10%).

  The proxy never sees the test split: that is where the held-out losses of the result are
  measured.
  """
  x, y = data.load_split(config.data, "train")
  order = np.random.default_rng(seed).permutation(len(x))
  n_val = max(1, len(x) // 10)
  val, fit = order[:n_val], order[n_val:]
  return x[fit], y[fit], x[val], y[val]


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
  base = pruning.base_structure(config.model)
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
        x_fit, y_fit, x_val, y_val = proxy_split(config, int(config.seed))
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
        result = _pruner(config).prune(base, target, flops_fn, score_fn, seed=int(config.seed))
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
    pruning.structure_to_model_config(config.model, pruning.Structure.from_dict(p["structure"]))
    for p in pruned
  ]
  c.adaptive.group_models = [
    {k: list(v) if isinstance(v, tuple) else v for k, v in o.items()} for o in overrides
  ]
  c.adaptive.base_flops_per_step = float(base_flops_per_step)
  c.ckpt_every_steps = max(1, min(int(c.ckpt_every_steps), int(steps) or 1))
  return c


def write_inherited_start(
  config, workdir: str, base_params, pruned, *, seed: int, devices: list | None = None
) -> None:
  """Writes the stage-2 run's step-0 checkpoint: each group's inherited weights, fresh Adam.

  The EMA starts from the pruned weights (spec §3.4). The shared loop then resumes from it, so
  stage 2 is an ordinary run of the loop (and a killed stage 2 resumes like any run).
  """
  if latest_step(workdir) is not None:
    return
  inherited = {
    method.group_key(g): pruning.inherit_weights(
      base_params,
      config.model,
      pruning.Structure.from_dict(p["structure"]),
      image_size=int(config.data.resolution),
      selection=str(config.adaptive.pruner.selection),
      seed=seed,
    )
    for g, p in enumerate(pruned)
  }
  write_start_checkpoint(config, workdir, inherited, devices=devices)


def latest_step(workdir: str) -> int | None:
  """The latest checkpoint step of the run in ``workdir``; None if it has none (or no
  ``checkpoints/`` folder, which is then not created)."""
  from common import checkpoint

  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return None
  ckpt = checkpoint.Checkpointer(path)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def write_start_checkpoint(config, workdir: str, params, *, devices: list | None = None) -> None:
  """Writes ``config``'s run a step-0 checkpoint holding ``params`` (EMA = params, fresh Adam).

  Args:
    config: the run's config (its method's fresh init fixes the tree and shapes).
    params: pure dict of numpy arrays with that tree.
  """
  from common import checkpoint
  from common.train import loop

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    if ckpt.latest_step() is not None:
      return
    mesh, run_method = loop.setup(config, devices=devices)
    fns = loop.build(config, run_method, mesh)
    state = fns["init"]()
    shard = fns["state_shardings"].params
    params = jax.tree.map(lambda a, s: jax.device_put(np.asarray(a), s), params, shard)
    # Same tree and shapes as the fresh init: the loop's restore checks this.
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), params, state.params)
    state = state.replace(
      params=params,
      ema_params=jax.tree.map(lambda a: a.copy(), params),
      opt_state=run_method.init_opt_state(run_method.make_optimizer()[0], params),
    )
    data_iter = run_method.train_iterator(process_index=0, process_count=1)
    ckpt.save(0, state, data_iter, config.to_json_best_effort(sort_keys=True, indent=2), force=True)
  finally:
    ckpt.close()


# ------------------------------------------------------------------------------------------------
# Measurements.


def heldout_of_run(config, networks, groups, *, per_group: int = 512) -> dict[str, Any]:
  """Held-out L_simple and VLB per group on the test split with fixed (x0, t, eps) draws.

  Args:
    networks: per group ``(apply, params)``; a single model is the same pair N times.
  """
  x_test, y_test = data.load_split(config.data, "test")
  draws = heldout.fixed_draws(groups, x_test, per_group, seed=0)
  diffusion = method_lib.make_diffusion(config)
  terms = [(heldout.make_terms_fn(diffusion, apply), params) for apply, params in networks]
  labels = y_test if config.model.class_conditional else None
  return heldout.heldout_losses(diffusion, groups, terms, x_test, draws, labels=labels)


def sampling_flops_ratio(config, groups, pruned) -> float:
  """Analytic sampling FLOPs of the routed chain over the base model's, at the sampler's steps."""
  from common.diffusion import sampling

  levels = sampling.make_levels(int(config.diffusion.num_timesteps), config.diffusion.sample_steps)
  t = np.asarray(levels[:-1]) - 1
  per_group = np.asarray([p["flops"] for p in pruned])
  return float(per_group[groups.group_of(t)].mean() / pruned[0]["base_flops"])


def save_summary_png(path: str, config, groups, pruned) -> None:
  """SNR_dB over t with the group boundaries; FLOPs per group, target against achieved."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  snr = grouping.snr_db(method_lib.make_diffusion(config))
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax1.plot(np.arange(len(snr)), snr, color="k", lw=1.2)
  for g, (lo, hi) in enumerate(groups.intervals):
    ax1.axvspan(lo, hi + 1, alpha=0.15, color=f"C{g}", label=f"group {g}")
  for c in groups.cuts:
    ax1.axvline(c, color="gray", lw=0.8, ls="--")
  ax1.set_xlabel("timestep t (0-based)")
  ax1.set_ylabel("SNR (dB)")
  ax1.set_title(f"groups: {config.adaptive.grouping.method}")
  ax1.legend(fontsize=7)
  n = len(pruned)
  base = pruned[0]["base_flops"]
  xs = np.arange(n)
  ax2.bar(xs - 0.2, [p["target_flops"] / base for p in pruned], 0.4, label="target", color="0.7")
  ax2.bar(xs + 0.2, [p["flops"] / base for p in pruned], 0.4, label="pruned", color="C0")
  ax2.set_xticks(xs, [f"g{g}" for g in range(n)])
  ax2.set_ylabel("FLOPs / base network")
  ax2.set_title(f"{config.adaptive.pruner.name}, k={config.adaptive.scaling.k}")
  ax2.legend(fontsize=7)
  fig.tight_layout()
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The pipeline.


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  programs: proxy.ProgramCache | None = None,
  stage2_init: str = "inherit",
  devices: list | None = None,
) -> dict[str, Any]:
  """Stage 1 (or a given base), grouping, pruning, stage 2, held-out losses and the summary.

  Args:
    config: an ``configs/adaptive.py`` config; ``total_steps`` is the single model's budget B.
    workdir: the run directory; stage 2 is the run in it.
    programs: a proxy program cache shared across runs in one process (experiments).
    stage2_init: "inherit" (the method) or "scratch" (E4: the group networks from a random init).
    devices: the devices both stages train on (default: all).

  Returns:
    the summary dict (also written to ``workdir/summary.json``).
  """
  from common import eval as eval_lib
  from common.train import loop

  if stage2_init not in ("inherit", "scratch"):
    raise ValueError(f"stage2_init must be 'inherit' or 'scratch', got {stage2_init!r}")
  a = config.adaptive
  groups = validate(config)
  if not a.base_workdir:  # the shared loop's checks of stage 1, before anything is written
    loop.setup(stage1_config(config), devices=devices)
  data_info = data.get_info(config.data)
  os.makedirs(workdir, exist_ok=True)

  # --- Stage 1. ---------------------------------------------------------------------------
  base_dir = str(a.base_workdir) or os.path.join(workdir, STAGE1_DIR)
  if not a.base_workdir:
    logging.info("stage 1: base DDPM for %d steps in %s", stage1_steps(config), base_dir)
    # Stage 1 is the plain DDPM: the adaptive.* fields (stage 2's) do not change it.
    loop.train(stage1_config(config), base_dir, devices=devices, resumable=("adaptive.*",))
    base_step = stage1_steps(config)
  else:
    base_step = int(a.get("base_step", -1))
  base_config, _, base_params, base_step = eval_lib.load_params(base_dir, step=base_step)
  if json.loads(base_config.model.to_json()) != json.loads(config.model.to_json()):
    raise ConfigError(
      "adaptive.base_workdir", base_dir, "was trained with another model.* than this config's"
    )
  base_params = jax.device_get(base_params)
  logging.info("stage 1: base model from %s step %d", base_dir, base_step)

  # --- Grouping and pruning. --------------------------------------------------------------
  logging.info(
    "groups (%s): t ranges %s, sizes %s",
    a.grouping.method,
    groups.intervals,
    groups.sizes.tolist(),
  )
  pruned = prune_groups(config, data_info, base_params, groups, workdir, programs=programs)

  # --- Stage 2. ---------------------------------------------------------------------------
  steps2 = stage2_steps(config, base_step, pruned)
  ddpm = method_lib.DDPM(config, data_info)
  base_call = ddpm.denoiser_call_flops(base_params, 1)
  c2 = stage2_config(config, groups, pruned, steps2, base_call)
  if stage2_init == "inherit":
    write_inherited_start(c2, workdir, base_params, pruned, seed=int(config.seed), devices=devices)
  logging.info("stage 2: %d steps of %d group networks in %s", steps2, groups.num_groups, workdir)
  if steps2 > 0:
    # stage2_steps is stage 2's length (its total_steps), which a resume may change.
    loop.train(c2, workdir, devices=devices, resumable=("adaptive.stage2_steps",))

  # --- Measurements. ----------------------------------------------------------------------
  c2_run, tdc, params, _ = eval_lib.load_params(workdir)
  networks = [(m.apply, params[method.group_key(g)]) for g, m in enumerate(tdc.members)]
  held = heldout_of_run(c2_run, networks, groups)
  base_train = int(config.total_steps) * pruned[0]["base_flops"]
  stage1_cost = base_step * pruned[0]["base_flops"]
  stage2_cost = steps2 * sum(p["flops"] for p in pruned)
  snr = groups.snr_range(method_lib.make_diffusion(config))
  summary = {
    "pruner": str(a.pruner.name),
    "grouping": a.grouping.to_dict(),
    "scaling": a.scaling.to_dict(),
    "stage2_init": stage2_init,
    "base": {"workdir": base_dir, "step": base_step, "flops_per_call": pruned[0]["base_flops"]},
    "stage1_steps": base_step,
    "stage2_steps": steps2,
    "budget_steps": int(config.total_steps),
    # Training FLOPs in base-network steps (the same batch; ~3x forward per sample cancels).
    "training_cost": {
      "stage1": stage1_cost / pruned[0]["base_flops"],
      "stage2": stage2_cost / pruned[0]["base_flops"],
      "single_model": base_train / pruned[0]["base_flops"],
      "ratio": (stage1_cost + stage2_cost) / base_train,
    },
    "sampling_flops_ratio": sampling_flops_ratio(config, groups, pruned),
    "groups": [
      {
        **{k: p[k] for k in ("group", "t_range", "target_flops", "flops", "structure")},
        "snr_db_range": [float(v) for v in snr[g]],
        "flops_ratio": p["flops"] / p["base_flops"],
        "proxy_evaluations": p["search"]["evaluations"] if p["search"] else 0,
        "proxy_rounds": p["search"]["rounds"] if p["search"] else 0,
        "proxy_score": p["search"]["score"] if p["search"] else None,
        "proxy_scores_per_round": (
          [r["beam"][0]["score"] if r.get("beam") else None for r in p["search"]["log"]]
          if p["search"] and p["search"]["pruner"] == "proxy_search(det)"
          else []
        ),
      }
      for g, p in enumerate(pruned)
    ],
    "heldout": held,
  }
  fileio.write_json(os.path.join(workdir, SUMMARY_JSON), summary, indent=1)
  save_summary_png(os.path.join(workdir, "summary.png"), config, groups, pruned)
  logging.info(
    "done: sampling FLOPs %.3f of the base, training FLOPs %.3f of the single model, held-out "
    "L_simple %.4f, VLB %.3f bits/dim",
    summary["sampling_flops_ratio"],
    summary["training_cost"]["ratio"],
    held["l_simple"],
    held["vlb_bpd"],
  )
  return summary


if __name__ == "__main__":
  from common.train import cli

  cli.config_workdir_binary(run, workdir_help="Run directory (stage 2; stage 1 in stage1/).")
