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
checked (``stages.validate`` and the shared loop's ``setup`` of stage 1) before ``DIR`` is
created: a bad one is one line naming it and exit 2.

The parts: the stages' configs and checks (``adaptive.stages``), the pruning per group
(``adaptive.pruning``), stage 2's inherited start (``adaptive.start_checkpoint``); this module
runs them in order and measures the result.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from adaptive import grouping, heldout, method, proxy, pruning, stages, start_checkpoint
from common import data, fileio
from common.train import method as method_lib
from common.train.validate import ConfigError

STAGE1_DIR = "stage1"
SUMMARY_JSON = "summary.json"


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
  from common.train import loop

  if stage2_init not in ("inherit", "scratch"):
    raise ValueError(f"stage2_init must be 'inherit' or 'scratch', got {stage2_init!r}")
  a = config.adaptive
  groups = stages.validate(config)
  if not a.base_workdir:  # the shared loop's checks of stage 1, before anything is written
    loop.setup(stages.stage1_config(config), devices=devices)
  data_info = data.get_info(config.data)
  os.makedirs(workdir, exist_ok=True)
  base_dir, base_step, base_params = _stage1(config, workdir, devices=devices)

  # --- Grouping and pruning. --------------------------------------------------------------
  logging.info(
    "groups (%s): t ranges %s, sizes %s",
    a.grouping.method,
    groups.intervals,
    groups.sizes.tolist(),
  )
  pruned = pruning.prune_groups(config, data_info, base_params, groups, workdir, programs=programs)

  steps2 = _stage2(
    config, workdir, data_info, groups, pruned, base_params, base_step,
    stage2_init=stage2_init, devices=devices,
  )  # fmt: skip
  summary = _summary(config, workdir, groups, pruned, base_dir, base_step, steps2, stage2_init)
  fileio.write_json(os.path.join(workdir, SUMMARY_JSON), summary, indent=1)
  save_summary_png(os.path.join(workdir, "summary.png"), config, groups, pruned)
  logging.info(
    "done: sampling FLOPs %.3f of the base, training FLOPs %.3f of the single model, held-out "
    "L_simple %.4f, VLB %.3f bits/dim",
    summary["sampling_flops_ratio"],
    summary["training_cost"]["ratio"],
    summary["heldout"]["l_simple"],
    summary["heldout"]["vlb_bpd"],
  )
  return summary


def _stage1(config, workdir: str, *, devices) -> tuple[str, int, Any]:
  """Trains (or resumes) stage 1, or takes ``adaptive.base_workdir``'s checkpoint.

  Returns:
    (the base run's directory, its step, its parameters as a pure dict on the host).
  """
  from common import eval as eval_lib
  from common.train import loop

  a = config.adaptive
  base_dir = str(a.base_workdir) or os.path.join(workdir, STAGE1_DIR)
  if not a.base_workdir:
    logging.info("stage 1: base DDPM for %d steps in %s", stages.stage1_steps(config), base_dir)
    # Stage 1 is the plain DDPM: the adaptive.* fields (stage 2's) do not change it.
    loop.train(stages.stage1_config(config), base_dir, devices=devices, resumable=("adaptive.*",))
    base_step = stages.stage1_steps(config)
  else:
    base_step = int(a.get("base_step", -1))
  base_config, _, base_params, base_step = eval_lib.load_params(base_dir, step=base_step)
  if json.loads(base_config.model.to_json()) != json.loads(config.model.to_json()):
    raise ConfigError(
      "adaptive.base_workdir", base_dir, "was trained with another model.* than this config's"
    )
  base_params = jax.device_get(base_params)
  logging.info("stage 1: base model from %s step %d", base_dir, base_step)
  return base_dir, base_step, base_params


def _stage2(config, workdir: str, data_info, groups, pruned, base_params, base_step: int, *,
            stage2_init: str, devices) -> int:  # fmt: skip
  """Trains (or resumes) the group networks in ``workdir``; returns stage 2's step count."""
  from common.train import loop

  steps2 = stages.stage2_steps(config, base_step, pruned)
  ddpm = method_lib.DDPM(config, data_info)
  base_call = ddpm.denoiser_call_flops(base_params, 1)
  c2 = stages.stage2_config(config, groups, pruned, steps2, base_call)
  if stage2_init == "inherit":
    start_checkpoint.write_inherited_start(
      c2, workdir, base_params, pruned, seed=int(config.seed), devices=devices
    )
  logging.info("stage 2: %d steps of %d group networks in %s", steps2, groups.num_groups, workdir)
  if steps2 > 0:
    # stage2_steps is stage 2's length (its total_steps), which a resume may change.
    loop.train(c2, workdir, devices=devices, resumable=("adaptive.stage2_steps",))
  return steps2


def _summary(config, workdir: str, groups, pruned, base_dir: str, base_step: int, steps2: int,
             stage2_init: str) -> dict[str, Any]:  # fmt: skip
  """``summary.json``: the stages' costs, each group's structure and search, held-out losses."""
  from common import eval as eval_lib

  a = config.adaptive
  c2_run, tdc, params, _ = eval_lib.load_params(workdir)
  networks = [(m.apply, params[method.group_key(g)]) for g, m in enumerate(tdc.members)]
  held = heldout_of_run(c2_run, networks, groups)
  base_train = int(config.total_steps) * pruned[0]["base_flops"]
  stage1_cost = base_step * pruned[0]["base_flops"]
  stage2_cost = steps2 * sum(p["flops"] for p in pruned)
  snr = groups.snr_range(method_lib.make_diffusion(config))
  return {
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
    "sampling_flops_ratio": pruning.sampling_flops_ratio(config, groups, pruned),
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
  fileio.write_figure(fig, path, dpi=120)


if __name__ == "__main__":
  from common.train import cli

  cli.config_workdir_binary(run, workdir_help="Run directory (stage 2; stage 1 in stage1/).")
