"""The spec's arms E0-E6 (§8.3): what each one is and how its workdir is made.

Every arm is an ordinary workdir ``DIR/seed<s>/<arm>`` (``common.eval`` works on each):

* ``stage1``: the base DDPM for ``S1 = stage1_frac * B`` steps, trained once per seed and shared:
  E0 continues it, every TDC arm starts from it (``adaptive.base_workdir``), E5 prunes it.
* ``E0``: the single model for B steps (the stage-1 run continued from S1 to B: the learning rate
  does not depend on ``total_steps`` and the data iterator is checkpointed, so this is the same
  trajectory as one B-step run).
* ``E0plus`` (E0+): E0 continued by E1's stage-2 training FLOPs, in base-network steps: the
  single model trained for the extra steps, the control for "specialisation or more training".
* ``E1``: TDC without pruning (every group the full network).
* ``E2_k<k>`` (progressive scaling at the config's N), ``E2_N<n>`` (other N at the config's k),
  ``E2_rev`` (the full model at the other SNR end); ``E2_k<config k>`` is the reference TDC arm.
* ``E3_<grouping>``: the reference arm with another grouping (uniform_t, task_affinity_dp,
  random).
* ``E4``: single stage: the reference arm's structures trained from a random init on their
  timesteps only, for the reference arm's total training FLOPs (B base steps).
* ``E5``: the pruner ablation on the proxy alone (no stage 2): proxy_search(det) with and without
  the memory bank, uniform width, best-of-M random and an L1 one-shot pruner, for every pruned
  group of the reference arm and every proxy seed in ``experiments.search_seeds``.
* ``E6``: the DDSM-style baseline (``adaptive.supernet``): stage 1's network as a slimmable
  supernet of ``experiments.e6_widths``, trained on the FLOPs stage 2 gets, then the width of every
  sampler step searched under the reference arm's sampling FLOPs.

The TDC arms' stage 2 (and E6's supernet training) gets the training FLOPs the single model
leaves after stage 1 (``adaptive.stages.stage2_steps``), so stages 1+2 cost B base steps (C7);
E0+ costs B plus E1's stage 2, i.e. more than any TDC arm. E5 trains nothing: its searches are
``adaptive.pruner_ablation``'s.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from typing import Any

from common import fileio
from common.train.validate import ConfigError

STAGE1 = "stage1"
FAMILIES = ("E0", "E0+", "E1", "E2", "E3", "E4", "E5", "E6")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: ``name`` is its directory under ``seed<s>/``."""

  name: str
  family: str
  label: str
  overrides: tuple[tuple[str, Any], ...] = ()  # flattened config overrides of a TDC arm
  stage2_init: str = "inherit"

  @property
  def is_tdc(self) -> bool:
    return self.family in ("E1", "E2", "E3", "E4")

  @property
  def costs_stages(self) -> bool:
    """Starts from stage 1 and spends the rest of B (C7 applies)."""
    return self.is_tdc or self.family == "E6"


# Not an arm of the catalog (nothing selects it): its held-out losses are the start every arm
# continues from, reported next to them.
STAGE1_ARM = Arm(STAGE1, "S1", "stage 1 alone: the shared base at S1 steps")


def reference_arm_name(config) -> str:
  """The reference TDC arm: E2 at the config's own k (E4, E5 and E6 reuse its pruning)."""
  return f"E2_k{float(config.adaptive.scaling.k):g}"


def arm_catalog(config) -> list[Arm]:
  """Every arm the config's ``experiments.*`` describes, in the order they run."""
  e, a = config.experiments, config.adaptive
  k_ref, n_ref = float(a.scaling.k), int(a.grouping.num_groups)
  end = str(a.scaling.full_model_end)
  arms = [
    Arm("E0", "E0", "single model, B steps"),
    Arm("E0plus", "E0+", "single model, B + E1's stage-2 FLOPs"),
    Arm("E1", "E1", f"TDC, N={n_ref}, full width", (("adaptive.scaling.prune", False),)),
  ]
  for k in sorted({float(k) for k in e.ks} | {k_ref}):
    arms.append(Arm(f"E2_k{k:g}", "E2", f"TDC, N={n_ref}, k={k:g}", (("adaptive.scaling.k", k),)))
  for n in sorted({int(n) for n in e.num_groups} - {n_ref}):
    arms.append(
      Arm(f"E2_N{n}", "E2", f"TDC, N={n}, k={k_ref:g}", (("adaptive.grouping.num_groups", n),))
    )
  if bool(e.reversed):
    other = "low_snr" if end == "high_snr" else "high_snr"
    arms.append(
      Arm(
        "E2_rev",
        "E2",
        f"TDC, N={n_ref}, k={k_ref:g}, full model at {other}",
        (("adaptive.scaling.full_model_end", other),),
      )
    )
  prune = () if bool(e.e3_prune) else (("adaptive.scaling.prune", False),)
  for g in e.groupings:
    if g != a.grouping.method:
      arms.append(
        Arm(f"E3_{g}", "E3", f"TDC, {g} groups", (("adaptive.grouping.method", str(g)), *prune))
      )
  # E5 (the proxy alone) before E4 (a full training run): both reuse the reference's pruning.
  arms.append(Arm("E5", "E5", "pruner ablation on the proxy"))
  arms.append(
    Arm("E4", "E4", f"single stage: {reference_arm_name(config)}'s structures from scratch",
        stage2_init="scratch")
  )  # fmt: skip
  widths = "/".join(f"{float(w):g}" for w in e.e6_widths)
  arms.append(
    Arm("E6", "E6", f"slimmable supernet ({widths}), per-step widths at "
        f"{reference_arm_name(config)}'s sampling FLOPs")
  )  # fmt: skip
  return arms


def select_arms(config, requested: list[str] | None) -> list[Arm]:
  """The arms named by ``--arms`` (families like ``E2`` or arm names like ``E2_k0.3``).

  E0+ continues E0, so asking for E0+ trains E0 too. An empty list selects every arm.

  Raises:
    ConfigError: a name that is neither a family nor an arm of the config.
  """
  catalog = arm_catalog(config)
  if not requested:
    return catalog
  by_name = {a.name: a for a in catalog}
  wanted: set[str] = set()
  for raw in requested:
    name = raw.strip()
    if name in FAMILIES:
      wanted |= {a.name for a in catalog if a.family == name}
    elif name in by_name:
      wanted.add(name)
    else:
      raise ConfigError(
        "--arms",
        name,
        f"not an arm: families {', '.join(FAMILIES)} or arms {', '.join(by_name)}",
      )
  if "E0plus" in wanted:
    wanted.add("E0")
  return [a for a in catalog if a.name in wanted]


# ------------------------------------------------------------------------------------------------
# Training.


def seed_config(config, seed: int):
  """``config`` for one training seed: the runs' seed and the random grouping's (E3)."""
  c = copy.deepcopy(config)
  c.unlock()
  c.seed = int(seed)
  c.adaptive.grouping.seed = int(seed)  # a random partition is drawn per seed (E3)
  return c


def _copy_latest_checkpoint(src: str, dst: str) -> int:
  """Starts run ``dst`` from ``src``'s latest checkpoint (state, data iterator, metrics log)."""
  from adaptive import start_checkpoint

  step = start_checkpoint.latest_step(src)
  if step is None:
    raise FileNotFoundError(f"{src} has no checkpoint to continue from")
  os.makedirs(os.path.join(dst, "checkpoints"), exist_ok=True)
  # Copied under a staging name and renamed whole: a kill mid-copy never leaves a checkpoint
  # folder that looks complete.
  staging = os.path.join(dst, f".checkpoint_{step}.partial")
  if os.path.exists(staging):
    shutil.rmtree(staging)
  shutil.copytree(os.path.join(src, "checkpoints", str(step)), staging)
  os.replace(staging, os.path.join(dst, "checkpoints", str(step)))
  if os.path.exists(os.path.join(src, "metrics.jsonl")):
    with fileio.atomic_path(os.path.join(dst, "metrics.jsonl")) as tmp:
      shutil.copy(os.path.join(src, "metrics.jsonl"), tmp)
  return step


def train_single(config, workdir: str, steps: int, *, start_from: str = "", devices=None) -> None:
  """The base DDPM of ``config`` trained (or resumed) to ``steps`` in ``workdir``.

  A fresh ``workdir`` starts from ``start_from``'s latest checkpoint when given.

  Raises:
    RuntimeError: the run stopped early (SIGTERM): it saved its state, run again to resume.
  """
  from adaptive import stages, start_checkpoint
  from common.train import loop

  c = stages.stage1_config(config)
  c.total_steps = int(steps)
  latest = start_checkpoint.latest_step(workdir)
  if latest is None and start_from:
    latest = _copy_latest_checkpoint(start_from, workdir)
  if latest == steps:
    return
  if latest is not None and latest > steps:
    raise ConfigError("total_steps", steps, f"{workdir} is already at step {latest}")
  loop.train(c, workdir, devices=devices)
  if start_checkpoint.latest_step(workdir) != steps:
    raise RuntimeError(f"{workdir} stopped before step {steps}; run again to resume")


def extra_steps_e0plus(config) -> int:
  """E1's stage-2 training cost in base-network steps (every group the full network)."""
  from adaptive import stages

  n = int(config.adaptive.grouping.num_groups)
  s1 = stages.stage1_steps(config)
  steps2 = stages.stage2_steps(config, s1, [{"base_flops": 1.0, "flops": 1.0}] * n)
  return int(steps2 * n)


def arm_config(config, arm: Arm, stage1_dir: str):
  """The ``adaptive.train`` config of a TDC arm, starting from the shared stage 1."""
  from adaptive import stages

  c = copy.deepcopy(config)
  c.unlock()
  c.update_from_flattened_dict(dict(arm.overrides))
  c.adaptive.base_workdir = stage1_dir
  c.adaptive.base_step = stages.stage1_steps(config)
  return c


def reference_structures(config, arm_dir: str, stage1_dir: str, ref_dir: str, *, programs):
  """The reference arm's grouping and pruned structures, without training it.

  Its ``pruning/`` records are copied into ``arm_dir`` where it has run; otherwise the same
  deterministic search runs there (and resumes there).

  Args:
    config: the reference arm's ``arm_config``.

  Returns:
    (groups, pruned) as ``adaptive.pruning.prune_groups``.
  """
  import jax

  from adaptive import pruning, stages
  from common import data
  from common import eval as eval_lib

  src, dst = (
    os.path.join(ref_dir, pruning.PRUNING_DIR),
    os.path.join(arm_dir, pruning.PRUNING_DIR),
  )
  os.makedirs(dst, exist_ok=True)
  if os.path.isdir(src):
    for f in sorted(os.listdir(src)):
      if f.endswith(".json") and not os.path.exists(os.path.join(dst, f)):
        with fileio.atomic_path(os.path.join(dst, f)) as tmp:
          shutil.copy(os.path.join(src, f), tmp)
  info = data.get_info(config.data)
  _, _, base_params, _ = eval_lib.load_params(stage1_dir, step=int(config.adaptive.base_step))
  groups = stages.validate(config)
  pruned = pruning.prune_groups(
    config, info, jax.device_get(base_params), groups, arm_dir, programs=programs
  )
  return groups, pruned


def train_supernet_arm(config, arm_dir: str, stage1_dir: str, ref_dir: str, *, programs,
                       devices=None) -> dict[str, Any]:  # fmt: skip
  """E6: the supernet at the reference arm's analytic sampling FLOPs; returns its summary."""
  from adaptive import pruning, supernet

  ref = next(a for a in arm_catalog(config) if a.name == reference_arm_name(config))
  c = arm_config(config, ref, stage1_dir)
  groups, pruned = reference_structures(c, arm_dir, stage1_dir, ref_dir, programs=programs)
  target = pruning.sampling_flops_ratio(c, groups, pruned)
  e = config.experiments
  return supernet.run(
    c, arm_dir, widths=tuple(e.e6_widths), target_ratio=target,
    per_step=int(e.e6_draws_per_step), devices=devices,
  )  # fmt: skip


def train_tdc_arm(config, arm: Arm, arm_dir: str, stage1_dir: str, ref_dir: str, *,
                  programs, devices=None) -> dict[str, Any]:  # fmt: skip
  """Runs ``adaptive.train`` for a TDC arm; returns its summary.

  E4 takes the reference arm's structures (its ``pruning/`` records, or the same deterministic
  search where the reference has not run) and trains them from scratch for B base steps.
  """
  from adaptive import stages
  from adaptive import train as adaptive_train

  c = arm_config(config, arm, stage1_dir)
  if arm.stage2_init == "scratch":
    _, pruned = reference_structures(c, arm_dir, stage1_dir, ref_dir, programs=programs)
    if int(c.adaptive.stage2_steps) < 0:
      # No stage 1: the whole budget B goes to the group networks.
      c.adaptive.stage2_steps = stages.stage2_steps(c, 0, pruned)
  return adaptive_train.run(
    c, arm_dir, programs=programs, stage2_init=arm.stage2_init, devices=devices
  )


# What a TDC arm's record keeps of each group in its ``summary.json``.
_GROUP_FIELDS = (
  "t_range", "flops_ratio", "structure", "proxy_evaluations", "proxy_rounds", "proxy_score",
)  # fmt: skip


def train_arm(config, arm: Arm, seed_dir: str, *, programs, devices=None) -> dict[str, Any]:
  """Trains (or resumes) one arm other than E5 in ``seed_dir/<arm>``, stage 1 being done.

  Returns:
    what its record says of its training: ``training_cost`` (base-network steps), the analytic
    ``sampling_flops_ratio`` (``scoring.evaluate_arm`` measures the routed chain with XLA) and
    per family its steps, supernet summary or groups.
  """
  b = int(config.total_steps)
  arm_dir = os.path.join(seed_dir, arm.name)
  stage1_dir = os.path.join(seed_dir, STAGE1)
  ref_dir = os.path.join(seed_dir, reference_arm_name(config))
  if arm.family in ("E0", "E0+"):
    steps = b if arm.family == "E0" else b + extra_steps_e0plus(config)
    start = stage1_dir if arm.family == "E0" else os.path.join(seed_dir, "E0")
    train_single(config, arm_dir, steps, start_from=start, devices=devices)
    return {
      "steps": steps,
      "sampling_flops_ratio": 1.0,
      "training_cost": {"stage1": 0, "stage2": 0, "single_model": steps, "ratio": steps / b},
    }
  if arm.family == "E6":
    summary = train_supernet_arm(
      config, arm_dir, stage1_dir, ref_dir, programs=programs, devices=devices
    )
    return {
      "sampling_flops_ratio": summary["sampling_flops_ratio"],
      "sampling_flops_ratio_analytic": summary["sampling_flops_ratio"],
      "training_cost": summary["training_cost"],
      "stage2_steps": summary["steps"],
      "supernet": summary,
    }
  summary = train_tdc_arm(
    config, arm, arm_dir, stage1_dir, ref_dir, programs=programs, devices=devices
  )
  cost = dict(summary["training_cost"])
  if arm.stage2_init == "scratch":  # no stage 1 went into E4's networks
    cost["stage1"] = 0.0
    cost["ratio"] = cost["stage2"] / cost["single_model"]
  return {
    # Analytic; evaluate_arm replaces it with XLA's cost analysis of the chain.
    "sampling_flops_ratio": summary["sampling_flops_ratio"],
    "sampling_flops_ratio_analytic": summary["sampling_flops_ratio"],
    "training_cost": cost,
    "stage2_steps": summary["stage2_steps"],
    "grouping": summary["grouping"],
    "scaling": summary["scaling"],
    "groups": [{k: g[k] for k in _GROUP_FIELDS} for g in summary["groups"]],
    "heldout_own_groups": summary["heldout"],
  }
