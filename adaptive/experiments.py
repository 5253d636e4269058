"""The spec's arms E0-E6 (§8.3) and claims C1-C7 (§8.4):
``python -m adaptive.experiments --config=configs/adaptive.py:digits --workdir=DIR``.

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
leaves after stage 1 (``adaptive.train.stage2_steps``), so stages 1+2 cost B base steps (C7); E0+
costs B plus E1's stage 2, i.e. more than any TDC arm.

Each trained arm is scored on the same held-out draws (``experiments.heldout_per_group`` fixed
(x0, t, eps) test triples per group of the config's grouping, each routed to the arm's network
for its t, so per-group losses are paired across arms whatever their grouping) and by
``common.eval`` (FID/KID of ``experiments.num_samples`` samples, XLA FLOPs per sample). Writes
``DIR/experiments.json``, ``DIR/experiments.md`` (one table per claim, mean +- std over seeds and
paired wins) and ``DIR/experiments.png``. Re-running skips arms with a current
``experiment.json`` and resumes a cut-off one (every stage of ``adaptive.train`` resumes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from common import fileio
from common.metrics import stats
from common.train.validate import ConfigError

EVAL_VERSION = 1  # bump when the evaluation changes, to re-evaluate finished arms
STAGE1 = "stage1"
ARM_RECORD = "experiment.json"
FAMILIES = ("E0", "E0+", "E1", "E2", "E3", "E4", "E5", "E6")
PRUNER_VARIANTS = ("proxy_memory", "proxy_no_memory", "uniform", "random", "l1_oneshot")


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
  c = copy.deepcopy(config)
  c.unlock()
  c.seed = int(seed)
  c.adaptive.grouping.seed = int(seed)  # a random partition is drawn per seed (E3)
  return c


def _copy_latest_checkpoint(src: str, dst: str) -> int:
  """Starts run ``dst`` from ``src``'s latest checkpoint (state, data iterator, metrics log)."""
  from adaptive import train as adaptive_train

  step = adaptive_train.latest_step(src)
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
  from adaptive import train as adaptive_train
  from common.train import loop

  c = adaptive_train.stage1_config(config)
  c.total_steps = int(steps)
  latest = adaptive_train.latest_step(workdir)
  if latest is None and start_from:
    latest = _copy_latest_checkpoint(start_from, workdir)
  if latest == steps:
    return
  if latest is not None and latest > steps:
    raise ConfigError("total_steps", steps, f"{workdir} is already at step {latest}")
  loop.train(c, workdir, devices=devices)
  if adaptive_train.latest_step(workdir) != steps:
    raise RuntimeError(f"{workdir} stopped before step {steps}; run again to resume")


def extra_steps_e0plus(config) -> int:
  """E1's stage-2 training cost in base-network steps (every group the full network)."""
  from adaptive import train as adaptive_train

  n = int(config.adaptive.grouping.num_groups)
  s1 = adaptive_train.stage1_steps(config)
  steps2 = adaptive_train.stage2_steps(config, s1, [{"base_flops": 1.0, "flops": 1.0}] * n)
  return int(steps2 * n)


def arm_config(config, arm: Arm, stage1_dir: str):
  """The ``adaptive.train`` config of a TDC arm, starting from the shared stage 1."""
  from adaptive import train as adaptive_train

  c = copy.deepcopy(config)
  c.unlock()
  c.update_from_flattened_dict(dict(arm.overrides))
  c.adaptive.base_workdir = stage1_dir
  c.adaptive.base_step = adaptive_train.stage1_steps(config)
  return c


def reference_structures(config, arm_dir: str, stage1_dir: str, ref_dir: str, *, programs):
  """The reference arm's grouping and pruned structures, without training it.

  Its ``pruning/`` records are copied into ``arm_dir`` where it has run; otherwise the same
  deterministic search runs there (and resumes there).

  Args:
    config: the reference arm's ``arm_config``.

  Returns:
    (groups, pruned) as ``adaptive.train.prune_groups``.
  """
  import jax

  from adaptive import train as adaptive_train
  from common import data
  from common import eval as eval_lib

  src, dst = (
    os.path.join(ref_dir, adaptive_train.PRUNING_DIR),
    os.path.join(arm_dir, adaptive_train.PRUNING_DIR),
  )
  os.makedirs(dst, exist_ok=True)
  if os.path.isdir(src):
    for f in sorted(os.listdir(src)):
      if f.endswith(".json") and not os.path.exists(os.path.join(dst, f)):
        with fileio.atomic_path(os.path.join(dst, f)) as tmp:
          shutil.copy(os.path.join(src, f), tmp)
  info = data.get_info(config.data)
  _, _, base_params, _ = eval_lib.load_params(stage1_dir, step=int(config.adaptive.base_step))
  groups = adaptive_train.validate(config)
  pruned = adaptive_train.prune_groups(
    config, info, jax.device_get(base_params), groups, arm_dir, programs=programs
  )
  return groups, pruned


def train_supernet_arm(config, arm_dir: str, stage1_dir: str, ref_dir: str, *, programs,
                       devices=None) -> dict[str, Any]:  # fmt: skip
  """E6: the supernet at the reference arm's analytic sampling FLOPs; returns its summary."""
  from adaptive import supernet
  from adaptive import train as adaptive_train

  ref = next(a for a in arm_catalog(config) if a.name == reference_arm_name(config))
  c = arm_config(config, ref, stage1_dir)
  groups, pruned = reference_structures(c, arm_dir, stage1_dir, ref_dir, programs=programs)
  target = adaptive_train.sampling_flops_ratio(c, groups, pruned)
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
  from adaptive import train as adaptive_train

  c = arm_config(config, arm, stage1_dir)
  if arm.stage2_init == "scratch":
    _, pruned = reference_structures(c, arm_dir, stage1_dir, ref_dir, programs=programs)
    if int(c.adaptive.stage2_steps) < 0:
      # No stage 1: the whole budget B goes to the group networks.
      c.adaptive.stage2_steps = adaptive_train.stage2_steps(c, 0, pruned)
  return adaptive_train.run(
    c, arm_dir, programs=programs, stage2_init=arm.stage2_init, devices=devices
  )


# ------------------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class Reference:
  """The paired held-out draws every arm is scored on: the config's grouping, the test split."""

  groups: Any
  diffusion: Any
  x_test: np.ndarray
  labels: np.ndarray | None
  draws: Any
  prior_bpd: float
  # Jitted loss terms per network structure: every arm with the base network shares one program.
  terms: dict = dataclasses.field(default_factory=dict)

  def terms_fn(self, network):
    from adaptive import heldout

    key = network.config.model.to_json(sort_keys=True)
    if key not in self.terms:
      self.terms[key] = heldout.make_terms_fn(self.diffusion, network.apply)
    return self.terms[key]


def make_reference(config) -> Reference:
  from adaptive import heldout
  from adaptive import train as adaptive_train
  from common import data
  from common.train import method as method_lib

  groups = adaptive_train.make_groups(config)
  x_test, y_test = data.load_split(config.data, "test")
  per_group = int(config.experiments.heldout_per_group)
  draws = heldout.fixed_draws(groups, x_test, per_group, seed=0)
  diffusion = method_lib.make_diffusion(config)
  labels = y_test if config.model.class_conditional else None
  return Reference(groups, diffusion, x_test, labels, draws, heldout.prior_bpd(diffusion, x_test))


def routed_heldout(method, params, ref: Reference) -> dict[str, Any]:
  """Held-out L_simple and VLB of a run on ``ref``'s draws, each draw routed by its t.

  Args:
    method: a loaded ``DDPM`` (one network), or a method with ``routed_networks`` (``TDC``: a
      network per group of its own grouping; E6's ``Supernet``: a width per sampler step).
    params: its parameters.
    ref: the reference draws.

  Returns:
    as ``heldout.heldout_losses`` over ``ref.groups``.
  """
  from adaptive import heldout

  if hasattr(method, "routed_networks"):
    route, members = method.routed_networks(params)
    nets = [(ref.terms_fn(m), p) for m, p in members]
  else:

    def route(t):
      return np.zeros(np.shape(t), np.int64)

    nets = [(ref.terms_fn(method), params)]
  per_group = []
  for g in range(ref.groups.num_groups):
    t, index, noise = ref.draws.t[g], ref.draws.index[g], ref.draws.noise[g]
    batch = min(256, len(t))  # one compiled shape per network: short batches are padded
    mse, vlb = np.zeros(len(t)), np.zeros(len(t))
    which = route(t)
    for h in np.unique(which):
      terms_fn, p = nets[int(h)]
      sel = np.flatnonzero(which == h)
      mse[sel], vlb[sel] = heldout.per_example_terms(
        terms_fn, p, ref.x_test, index[sel], t[sel], noise[sel], ref.labels, batch_size=batch
      )
    size = int(ref.groups.sizes[g])
    per_group.append(
      {
        "t_range": list(ref.groups.intervals[g]),
        "l_simple": float(mse.mean()),
        "vlb_bpd_per_step": float(vlb.mean()),
        "vlb_bpd_contribution": float(size * vlb.mean()),
      }
    )
  sizes = np.asarray(ref.groups.sizes, np.float64)
  return {
    "groups": per_group,
    "l_simple": float(np.dot(sizes, [p["l_simple"] for p in per_group]) / sizes.sum()),
    "vlb_bpd": float(sum(p["vlb_bpd_contribution"] for p in per_group) + ref.prior_bpd),
    "prior_bpd": ref.prior_bpd,
  }


def heldout_raw(arm_dir: str, ref: Reference) -> dict[str, Any]:
  """``routed_heldout`` of the raw (non-EMA) weights.

  A stage 2 much shorter than the EMA's horizon (decay 0.999: ~1000 steps) leaves the EMA close
  to the inherited start, so the raw weights show what stage 2 itself changed.
  """
  from common import eval as eval_lib

  _, method, params, _ = eval_lib.load_params(arm_dir, use_ema=False)
  return routed_heldout(method, params, ref)


_SAMPLE_KEYS = ("fid", "kid_mean", "kid_std", "precision", "recall", "flops_per_sample", "params")


def raw_sample_metrics(config, arm_dir: str) -> dict[str, Any]:
  """FID/KID of the raw (non-EMA) weights' samples, in ``arm_dir/eval_raw``.

  The counterpart of ``heldout_raw`` for samples: a stage 2 shorter than the EMA's horizon
  leaves a pruned network's EMA near its inherited start, and the EMA figures alone would blame
  that on pruning.
  """
  from common import eval as eval_lib

  n = int(config.experiments.num_samples)
  m = eval_lib.evaluate(
    arm_dir,
    use_ema=False,
    num_samples=n,
    batch_size=min(int(config.experiments.sample_batch), n),
    out_name="eval_raw",
  )
  return {k: m[k] for k in _SAMPLE_KEYS if k in m}


def evaluate_arm(config, arm: Arm, arm_dir: str, ref: Reference, extra: dict) -> dict[str, Any]:
  """Held-out losses on the reference draws, FID/KID and FLOPs of one trained arm."""
  from common import eval as eval_lib

  e = config.experiments
  _, method, params, step = eval_lib.load_params(arm_dir)
  held = routed_heldout(method, params, ref)
  n = int(e.num_samples)
  raw = heldout_raw(arm_dir, ref)
  metrics = eval_lib.evaluate(arm_dir, num_samples=n, batch_size=min(int(e.sample_batch), n))
  out = {
    "eval_version": EVAL_VERSION,
    "arm": arm.name,
    "family": arm.family,
    "label": arm.label,
    "seed": int(config.seed),
    "num_samples": n,
    "heldout_per_group": int(e.heldout_per_group),
    "checkpoint_step": int(step),
    "heldout": held,
    "heldout_raw": raw,
    "samples": {k: metrics[k] for k in _SAMPLE_KEYS if k in metrics},
    "samples_raw": raw_sample_metrics(config, arm_dir),
    # XLA's cost analysis per sampler step of each group network and of the base network.
    "group_flops_per_step": metrics.get("group_flops_per_step"),
    "base_flops_per_step": metrics.get("base_flops_per_step"),
    "group_sampling_steps": metrics.get("group_sampling_steps"),
    **extra,
  }
  if "sampling_flops_ratio" in metrics:  # XLA's cost analysis of the routed chain (TDC, E6)
    out["sampling_flops_ratio"] = float(metrics["sampling_flops_ratio"])
  return out


# ------------------------------------------------------------------------------------------------
# E5: the pruners on the proxy alone.


def l1_oneshot(base_params, model_config, image_size: int, base, target: float, flops_fn,
               score_fn, *, tol: float):  # fmt: skip
  """One-shot magnitude pruning: no proxy inside the loop, the result scored once.

  From the full structure, repeatedly take the single edit (``pruning.search_space_edits``) that
  removes the least L1 weight mass of the inherited network per FLOP saved, until the structure
  is inside ``|flops / target - 1| <= tol``.

  Returns:
    SearchResult with ``pruner="l1_oneshot"``, one evaluation.
  """
  import jax

  from adaptive import pruning
  from adaptive.search import SearchResult

  lo = target * (1 - tol)
  cache: dict[Any, float] = {}

  def mass(s) -> float:
    if s not in cache:
      tree = pruning.inherit_weights(base_params, model_config, s, image_size=image_size)
      cache[s] = float(sum(np.abs(x).sum() for x in jax.tree.leaves(tree)))
    return cache[s]

  def inside(s) -> bool:
    return abs(flops_fn(s) / target - 1.0) <= tol

  cur, log = base, []
  while not inside(cur):
    now = flops_fn(cur)
    # An edit can save nothing (a width notch that rounds to the same whole GroupNorm groups).
    cands = [c for _, c in pruning.search_space_edits(base, cur) if lo <= flops_fn(c) < now]
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

  from adaptive import heldout, proxy, pruning
  from adaptive import train as adaptive_train
  from common import data
  from common import eval as eval_lib

  a, e = config.adaptive, config.experiments
  seed = int(config.seed)
  unknown = sorted(set(e.pruners) - set(PRUNER_VARIANTS))
  if unknown:
    raise ConfigError("experiments.pruners", unknown, f"one of {', '.join(PRUNER_VARIANTS)}")
  info = data.get_info(config.data)
  groups = adaptive_train.validate(config)
  flops_fn = adaptive_train.flops_fn_for(config, info)
  targets = adaptive_train.flops_targets(config, groups, flops_fn)
  base = pruning.base_structure(config.model)
  full = flops_fn(base)
  pruned_groups = [g for g, t in enumerate(targets) if abs(full / t - 1.0) > float(a.pruner.tol)]
  out: dict[str, Any] = {"groups": pruned_groups, "targets": targets, "variants": {}}
  base_params = x_fit = None
  for g in pruned_groups:
    for q in [int(q) for q in e.search_seeds]:
      score_fn = memo = None
      for variant in e.pruners:
        path = os.path.join(e5_dir, variant, f"search{q}", f"group{g}.json")
        reuse = os.path.join(ref_dir, adaptive_train.PRUNING_DIR, f"group{g}.json")
        if not os.path.exists(path) and variant == "proxy_memory" and q == 0:
          if os.path.exists(reuse):
            with open(reuse) as f:
              rec = json.load(f)
            if rec.get("search") and rec["search"]["pruner"] == "proxy_search(det)":
              _write_json(path, {**_slim(rec["search"], full), "seconds": rec["seconds"]})
        if not os.path.exists(path):
          if base_params is None:
            _, _, bp, _ = eval_lib.load_params(stage1_dir, step=adaptive_train.stage1_steps(config))
            base_params = jax.device_get(bp)
            x_fit, y_fit, x_val, y_val = adaptive_train.proxy_split(config, seed)
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
          _write_json(path, {**_slim(result.to_dict(), full), "seconds": time.time() - t0})
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


def _write_json(path: str, obj: Any) -> None:
  fileio.write_json(path, obj, indent=1)


# ------------------------------------------------------------------------------------------------
# Claims.


def _get(record, path):
  for key in path:
    if record is None:
      return None
    try:
      record = record[key]
    except (KeyError, IndexError, TypeError):
      return None
  return record


def _series(results, seeds, arm, path) -> np.ndarray:
  out = [_get(results.get(f"seed{s}/{arm}"), path) for s in seeds]
  return np.asarray([np.nan if v is None else float(v) for v in out], np.float64)


def paired(results, seeds, arm_a: str, arm_b: str, path) -> dict[str, Any]:
  """``a - b`` over the seeds that have both; lower is better for ``a``.

  verdict: "better" / "worse" where the mean paired difference is beyond one s.d. of the
  differences (spec §8.4), "within noise" otherwise; with one seed only the direction
  ("lower (1 seed)" / "higher (1 seed)"); "not run" with none.
  """
  a, b = _series(results, seeds, arm_a, path), _series(results, seeds, arm_b, path)
  both = np.isfinite(a) & np.isfinite(b)
  d = a[both] - b[both]
  out = {
    "a": stats.mean_std(a[both]),
    "b": stats.mean_std(b[both]),
    "diff": stats.mean_std(d),
    "wins": int((d < 0).sum()),
    "n": int(both.sum()),
  }
  if d.size == 0:
    out["verdict"] = "not run"
  elif d.size == 1:
    out["verdict"] = "lower (1 seed)" if d[0] < 0 else "higher (1 seed)"
  else:
    m, s = float(d.mean()), float(d.std(ddof=1))
    out["verdict"] = "better" if m < -s else ("worse" if m > s else "within noise")
  return out


METRICS = (
  ("L_simple", ("heldout", "l_simple")),
  ("VLB (bits/dim)", ("heldout", "vlb_bpd")),
  ("L_simple, raw weights", ("heldout_raw", "l_simple")),
  ("FID", ("samples", "fid")),
  ("KID", ("samples", "kid_mean")),
  ("FID, raw weights", ("samples_raw", "fid")),
)


def summarize(results: dict[str, dict], config) -> dict[str, Any]:
  """Per arm mean +- std over seeds and the claims C1-C7 (spec §8.4)."""
  seeds = sorted({int(k.split("/")[0][4:]) for k in results})
  arms = [
    a
    for a in [STAGE1_ARM, *arm_catalog(config)]
    if any(f"seed{s}/{a.name}" in results for s in seeds)
  ]
  ref = reference_arm_name(config)
  n_ref = int(config.adaptive.grouping.num_groups)
  table = {}
  for arm in arms:
    if arm.family == "E5":
      continue
    row = {m: stats.mean_std(_series(results, seeds, arm.name, p)) for m, p in METRICS}
    row["sampling_flops_ratio"] = stats.mean_std(
      _series(results, seeds, arm.name, ("sampling_flops_ratio",))
    )
    row["training_cost_ratio"] = stats.mean_std(
      _series(results, seeds, arm.name, ("training_cost", "ratio"))
    )
    row["per_group_l_simple"] = [
      stats.mean_std(_series(results, seeds, arm.name, ("heldout", "groups", g, "l_simple")))
      for g in range(n_ref)
    ]
    first = next(results[f"seed{s}/{arm.name}"] for s in seeds if f"seed{s}/{arm.name}" in results)
    if (
      first.get("group_flops_per_step") and first.get("base_flops_per_step") and first.get("groups")
    ):
      row["group_flops"] = {
        "xla_ratio": [f / first["base_flops_per_step"] for f in first["group_flops_per_step"]],
        "analytic_ratio": [g["flops_ratio"] for g in first.get("groups", [])],
        "sampling_steps": first.get("group_sampling_steps"),
        "t_ranges": [g["t_range"] for g in first.get("groups", [])],
        "seed": int(first["seed"]),
      }
    table[arm.name] = {"label": arm.label, "family": arm.family, **row}

  claims: dict[str, Any] = {}

  def compare(a, b):
    return {m: paired(results, seeds, a, b, p) for m, p in METRICS}

  claims["C1"] = {
    "rule": f"{ref} at ~0.8x sampling FLOPs <= E0 on held-out loss and FID; also against E0+",
    "sampling_flops_ratio": table.get(ref, {}).get("sampling_flops_ratio"),
    "vs": {"E0": compare(ref, "E0"), "E0plus": compare(ref, "E0plus")},
  }
  per_group = {}
  for b in ("E0plus", "E0"):
    per_group[b] = [
      {
        "l_simple": paired(results, seeds, "E1", b, ("heldout", "groups", g, "l_simple")),
        "vlb": paired(results, seeds, "E1", b, ("heldout", "groups", g, "vlb_bpd_per_step")),
        "l_simple_raw": paired(results, seeds, "E1", b, ("heldout_raw", "groups", g, "l_simple")),
      }
      for g in range(n_ref)
    ]
  won = sum(
    v["l_simple"]["diff"]["n"] > 0 and v["l_simple"]["diff"]["mean"] < 0
    for v in per_group["E0plus"]
  )
  claims["C2"] = {
    "rule": "E1 < E0+ on per-group held-out L_simple in most groups",
    "groups_won_vs_E0plus_on_seed_mean": int(won),
    "groups": n_ref,
    "per_group": per_group,
  }
  claims["C3"] = {
    "rule": f"{config.adaptive.grouping.method} grouping ({ref}) <= uniform_t grouping",
    "vs": {a.name: compare(ref, a.name) for a in arms if a.family == "E3"},
  }
  claims["C4"] = {
    "rule": f"two-stage ({ref}) < single-stage (E4)",
    "vs": {"E4": compare(ref, "E4")},
  }
  e2 = [a.name for a in arms if a.family == "E2"]
  k_arms = [a for a in e2 if a.startswith("E2_k")]
  claims["C5"] = {
    "rule": "results flat in k: every pair of k arms within one s.d. of their paired difference",
    "arms": e2,
    "pairs": {f"{x} vs {y}": compare(x, y) for i, x in enumerate(k_arms) for y in k_arms[i + 1 :]},
  }
  claims["C6"] = pruner_claims(results, seeds)
  claims["E6"] = {
    "rule": f"{ref} against the slimmable supernet (DDSM-style) at matched sampling FLOPs",
    "vs": {"E6": compare(ref, "E6")} if "E6" in table else {},
  }
  c7 = {}
  for a in arms:
    costs = [results[f"seed{s}/{a.name}"]["training_cost"] for s in seeds
             if a.costs_stages and f"seed{s}/{a.name}" in results]  # fmt: skip
    if costs:
      # The step counts depend on the structures, which may differ per seed: the worst seed.
      worst = max(costs, key=lambda c: c["ratio"])
      c7[a.name] = {"training_cost": worst, "holds": bool(worst["ratio"] <= 1.0 + 1e-9)}
  claims["C7"] = {"rule": "training FLOPs of stages 1+2 <= E0's (B base steps)", "arms": c7}
  return {"seeds": seeds, "reference_arm": ref, "table": table, "claims": claims}


def pruner_claims(results, seeds) -> dict[str, Any]:
  """C6 from the E5 records: final proxy score, evaluations, rounds, spread over proxy seeds."""
  recs = {s: results[f"seed{s}/E5"]["pruners"] for s in seeds if f"seed{s}/E5" in results}
  out: dict[str, Any] = {
    "rule": "proxy_search(det) with memory beats uniform / random at equal FLOPs; with memory a "
    "lower spread over proxy seeds and/or fewer evaluations than without",
    "variants": {},
  }
  if not recs:
    return out
  variants = list(next(iter(recs.values()))["variants"])

  def per_seed(variant, key, q="0"):
    """Per training seed: mean over pruned groups of ``key`` at proxy seed q."""
    vals = []
    for s in seeds:
      v = _get(recs.get(s), ("variants", variant, q))
      vals.append(np.nan if not v else float(np.mean([r[key] for r in v.values()])))
    return np.asarray(vals)

  def spread(variant):
    """Std of the final score over proxy seeds, per (training seed, group), averaged."""
    stds = []
    for rec in recs.values():
      by_q = rec["variants"].get(variant, {})
      for g in rec["groups"]:
        vals = [by_q[q][str(g)]["score"] for q in by_q if str(g) in by_q[q]]
        if len(vals) > 1:
          stds.append(float(np.std(vals, ddof=1)))
    return float(np.mean(stds)) if stds else float("nan")

  def cells(variant):
    """proxy_memory's final score against ``variant``'s on every (seed, group, proxy seed) both
    ran: the same score function, so a tie is the same structure or an equal proxy value."""
    lower = tie = higher = 0
    for rec in recs.values():
      ours, theirs = rec["variants"].get("proxy_memory", {}), rec["variants"].get(variant, {})
      for q, by_g in theirs.items():
        for g, r in by_g.items():
          if g not in ours.get(q, {}):
            continue
          d = ours[q][g]["score"] - r["score"]
          if abs(d) <= 1e-6 * max(1.0, abs(r["score"])):
            tie += 1
          elif d < 0:
            lower += 1
          else:
            higher += 1
    return {"lower": lower, "tie": tie, "higher": higher}

  ref_scores = per_seed("proxy_memory", "score")
  for variant in variants:
    scores = per_seed(variant, "score")
    both = np.isfinite(scores) & np.isfinite(ref_scores)
    out["variants"][variant] = {
      "cells": cells(variant),
      "evaluations_all_cells": stats.mean_std(
        [
          r["evaluations"]
          for rec in recs.values()
          for by_g in rec["variants"].get(variant, {}).values()
          for r in by_g.values()
        ]
      ),
      "score": stats.mean_std(scores),
      "evaluations": stats.mean_std(per_seed(variant, "evaluations")),
      "rounds": stats.mean_std(per_seed(variant, "rounds")),
      "flops_ratio": stats.mean_std(per_seed(variant, "flops_ratio")),
      "spread_over_proxy_seeds": spread(variant),
      "proxy_memory_wins": int((ref_scores[both] < scores[both]).sum()),
      "n": int(both.sum()),
    }
  return out


# ------------------------------------------------------------------------------------------------
# Reports.


def _pm(d, digits: int = 4) -> str:
  if not d or d.get("n", 0) == 0:
    return "-"
  if d["n"] == 1:
    return f"{d['mean']:.{digits}f}"
  return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _digits(metric: str) -> int:
  return 2 if metric == "FID" else 4


def _compare_rows(name_a, name_b, comp) -> list[str]:
  return [
    f"| {m} | {name_a} | {name_b} | {_pm(c['a'], _digits(m))} | {_pm(c['b'], _digits(m))} | "
    f"{_pm(c['diff'], _digits(m))} | {c['wins']}/{c['n']} | {c['verdict']} |"
    for m, c in comp.items()
  ]


_COMPARE_HEADER = [
  "| metric | A | B | A | B | A - B (paired) | A wins | verdict |",
  "|---|---|---|---|---|---|---|---|",
]


def write_markdown(path: str, summary: dict[str, Any], command: str) -> None:
  seeds, t, c = summary["seeds"], summary["table"], summary["claims"]
  lines = [
    "# TDC experiments (spec §8.3 arms, §8.4 claims)",
    "",
    f"Seeds {seeds}; mean ± std over seeds (one value: one seed). Held-out losses are on the "
    "same fixed (x0, t, eps) test draws for every arm; lower is better everywhere. Verdicts: "
    "better / worse = mean paired difference beyond one s.d. of the differences; with one seed "
    f"only the direction. Pruner: proxy_search(det), not GPT-4. Regenerate: `{command}`.",
    "",
    "## Arms",
    "",
    "| arm | what | L_simple | VLB (bits/dim) | L_simple, raw weights | FID | KID | "
    "FID, raw weights | sampling FLOPs / base | training FLOPs / E0 |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, row in t.items():
    lines.append(
      f"| {name} | {row['label']} | {_pm(row['L_simple'])} | {_pm(row['VLB (bits/dim)'])} | "
      f"{_pm(row['L_simple, raw weights'])} | "
      f"{_pm(row['FID'], 2)} | {_pm(row['KID'])} | {_pm(row['FID, raw weights'], 2)} | "
      f"{_pm(row['sampling_flops_ratio'], 3)} | "
      f"{_pm(row['training_cost_ratio'], 3)} |"
    )
  flops_rows = [(n, r["group_flops"]) for n, r in t.items() if r.get("group_flops")]
  if flops_rows:
    lines += [
      "",
      "FLOPs per group network (one sampler step, batch 1) over the base network's, XLA cost "
      "analysis (analytic count in brackets), and the sampler steps each group runs:",
      "",
      "| arm | seed | per group: t range, XLA (analytic) FLOPs / base, sampler steps |",
      "|---|---|---|",
    ]
    for name, gf in flops_rows:
      parts = [
        f"g{g} t{tr[0]}-{tr[1]}: {x:.3f} ({a:.3f}), {n} steps"
        for g, (tr, x, a, n) in enumerate(
          zip(gf["t_ranges"], gf["xla_ratio"], gf["analytic_ratio"], gf["sampling_steps"],
              strict=False)
        )
      ]  # fmt: skip
      lines.append(f"| {name} | {gf['seed']} | {'; '.join(parts)} |")
  ref = summary["reference_arm"]
  lines += ["", f"## C1: {c['C1']['rule']}", ""]
  lines.append(f"{ref} sampling FLOPs / base: {_pm(c['C1']['sampling_flops_ratio'], 3)}.")
  lines += ["", *_COMPARE_HEADER]
  for b, comp in c["C1"]["vs"].items():
    lines += _compare_rows(ref, b, comp)
  lines += ["", f"## C2: {c['C2']['rule']}", ""]
  lines.append(
    f"E1 below E0+ on the seed mean in {c['C2']['groups_won_vs_E0plus_on_seed_mean']} of "
    f"{c['C2']['groups']} groups (L_simple)."
  )
  lines += ["", "| group | B | E1 L_simple | B L_simple | A - B | E1 wins | verdict | E1 VLB/step | "
            "B VLB/step | verdict (VLB) | E1 raw L_simple | B raw L_simple | verdict (raw) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
  for b, rows in c["C2"]["per_group"].items():
    for g, r in enumerate(rows):
      ls, vb, rw = r["l_simple"], r["vlb"], r.get("l_simple_raw")
      raw = f"{_pm(rw['a'])} | {_pm(rw['b'])} | {rw['verdict']}" if rw else "- | - | -"
      lines.append(
        f"| {g} | {b} | {_pm(ls['a'])} | {_pm(ls['b'])} | {_pm(ls['diff'])} | "
        f"{ls['wins']}/{ls['n']} | {ls['verdict']} | {_pm(vb['a'])} | {_pm(vb['b'])} | "
        f"{vb['verdict']} | {raw} |"
      )
  for key in ("C3", "C4"):
    lines += ["", f"## {key}: {c[key]['rule']}", "", *_COMPARE_HEADER]
    if not c[key]["vs"]:
      lines.append("| (not run) | | | | | | | |")
    for b, comp in c[key]["vs"].items():
      lines += _compare_rows(ref, b, comp)
  lines += ["", f"## C5: {c['C5']['rule']}", ""]
  lines += [
    "| arm | what | sampling FLOPs / base | L_simple | VLB (bits/dim) | FID | KID |",
    "|---|---|---|---|---|---|---|",
  ]
  for name in c["C5"]["arms"]:
    row = t[name]
    lines.append(
      f"| {name} | {row['label']} | {_pm(row['sampling_flops_ratio'], 3)} | "
      f"{_pm(row['L_simple'])} | {_pm(row['VLB (bits/dim)'])} | {_pm(row['FID'], 2)} | "
      f"{_pm(row['KID'])} |"
    )
  if c["C5"]["pairs"]:
    lines += ["", *_COMPARE_HEADER]
    for pair, comp in c["C5"]["pairs"].items():
      a, b = pair.split(" vs ")
      lines += _compare_rows(a, b, comp)
  c6 = c["C6"]
  lines += ["", f"## C6: {c6['rule']}", ""]
  lines += [
    "| pruner | final proxy score | proxy evaluations | rounds | FLOPs / base | spread over "
    "proxy seeds | proxy_memory lower | every search: proxy_memory lower / tie / higher | "
    "every search: evaluations |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  if not c6["variants"]:
    lines.append("| (not run) | | | | | | | | |")
  for v, r in c6["variants"].items():
    cells = r["cells"]
    lines.append(
      f"| {v} | {_pm(r['score'])} | {_pm(r['evaluations'], 1)} | {_pm(r['rounds'], 1)} | "
      f"{_pm(r['flops_ratio'], 3)} | {r['spread_over_proxy_seeds']:.4f} | "
      f"{r['proxy_memory_wins']}/{r['n']} | "
      f"{cells['lower']} / {cells['tie']} / {cells['higher']} | "
      f"{_pm(r['evaluations_all_cells'], 1)} |"
    )
  if c6["variants"]:
    lines += [
      "",
      "Score, evaluations, rounds and FLOPs: per training seed the mean over pruned groups at "
      "proxy seed 0, then mean ± std over training seeds. Spread: the std over proxy seeds of "
      "one (training seed, group), averaged. The last two columns pool every (training seed, "
      "group, proxy seed) search the pruner ran.",
    ]
  e6 = c.get("E6", {"rule": "E6", "vs": {}})
  lines += ["", f"## E6: {e6['rule']}", "", *_COMPARE_HEADER]
  if not e6["vs"]:
    lines.append("| (not run) | | | | | | | |")
  for b, comp in e6["vs"].items():
    lines += _compare_rows(ref, b, comp)
  lines += ["", f"## C7: {c['C7']['rule']}", ""]
  lines += [
    "| arm | stage 1 (base steps) | stage 2 (base steps) | total / E0 | holds |",
    "|---|---|---|---|---|",
  ]
  for name, r in c["C7"]["arms"].items():
    tc = r["training_cost"]
    lines.append(
      f"| {name} | {tc['stage1']:.0f} | {tc['stage2']:.0f} | {tc['ratio']:.4f} | {r['holds']} |"
    )
  fileio.write_text(path, "\n".join(lines) + "\n")


def write_plot(path: str, summary: dict[str, Any]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  t = summary["table"]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
  names = list(t)
  n_groups = max((len(r["per_group_l_simple"]) for r in t.values()), default=0)
  width = 0.8 / max(len(names), 1)
  for i, name in enumerate(names):
    vals = [d["mean"] for d in t[name]["per_group_l_simple"]]
    errs = [d["std"] for d in t[name]["per_group_l_simple"]]
    axes[0].bar(np.arange(n_groups) + i * width, vals, width, yerr=errs, label=name)
  axes[0].set_xticks(np.arange(n_groups) + 0.4 - width / 2, [f"g{g}" for g in range(n_groups)])
  axes[0].set_title("held-out L_simple per reference group (lower better)", fontsize=9)
  axes[0].set_yscale("log")
  axes[0].legend(fontsize=6)
  for i, name in enumerate(names):
    x, y = t[name]["sampling_flops_ratio"], t[name]["FID"]
    if y["n"]:
      axes[1].errorbar(x["mean"], y["mean"], yerr=y["std"], fmt="o", color=f"C{i % 10}")
      axes[1].annotate(name, (x["mean"], y["mean"]), fontsize=7)
  axes[1].set_xlabel("sampling FLOPs / base model")
  axes[1].set_ylabel("FID (digits features)")
  axes[1].set_title("sample quality vs sampling FLOPs", fontsize=9)
  c6 = summary["claims"]["C6"]["variants"]
  if c6:
    vs = list(c6)
    axes[2].bar(vs, [c6[v]["score"]["mean"] for v in vs], yerr=[c6[v]["score"]["std"] for v in vs])
    axes[2].tick_params(axis="x", labelrotation=30, labelsize=7)
    # A collapsed pruner scores 10-50x the others; on a linear axis the rest look equal.
    axes[2].set_yscale("log")
  axes[2].set_title("E5: final proxy score per pruner (lower better, log)", fontsize=9)
  fig.suptitle(f"TDC experiments, seeds {summary['seeds']}")
  fig.tight_layout()
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The campaign.


def _e5_key(config) -> dict[str, list]:
  e = config.experiments
  return {"pruners": [str(p) for p in e.pruners], "search_seeds": [int(q) for q in e.search_seeds]}


def _load_record(path: str, num_samples: int) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rec = json.load(f)
  if rec.get("eval_version") != EVAL_VERSION or rec.get("num_samples") != num_samples:
    return None
  return rec


CAMPAIGN_CONFIG = "campaign_config.json"


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_campaign_config(config, workdir: str) -> None:
  """Records the config a campaign directory was made with; refuses another one.

  Finished arms are skipped by their records alone, so a directory trained with another B,
  model or pruner must not be reused. ``experiments.*`` (which arms exist) may change.

  Raises:
    ConfigError: the first field that differs from the recorded config.
  """
  now = json.loads(config.to_json_best_effort())
  now.pop("experiments", None)
  path = os.path.join(workdir, CAMPAIGN_CONFIG)
  if not os.path.exists(path):
    _write_json(path, now)
    return
  with open(path) as f:
    before = _flat(json.load(f))
  now_flat = _flat(now)
  for key in sorted(set(before) | set(now_flat)):
    if before.get(key) != now_flat.get(key):
      raise ConfigError(
        key,
        now_flat.get(key),
        f"{workdir} was made with {before.get(key)!r}; use another --workdir for this config",
      )


def run_experiments(
  config,
  workdir: str,
  *,
  seeds: list[int],
  arms: list[str] | None = None,
  devices=None,
  command: str = "",
  report_only: bool = False,
) -> dict[str, Any]:
  """Trains, evaluates and reports the selected arms for every seed; returns the summary.

  Args:
    config: a ``configs/adaptive.py`` config (``total_steps`` is B).
    workdir: the campaign directory (``seed<s>/<arm>`` below it).
    seeds: training seeds, paired across arms.
    arms: ``--arms`` names (families or arms; empty: all).
    devices: the devices every run trains on (default: all).
    command: recorded in the reports.
    report_only: write the reports from the finished arms' records; train nothing.
  """
  from adaptive import proxy
  from adaptive import train as adaptive_train

  selected = select_arms(config, arms)
  adaptive_train.validate(config)
  for arm in selected:
    if arm.is_tdc:
      adaptive_train.validate(arm_config(config, arm, ""))
    if arm.family == "E6":
      from adaptive import supernet

      supernet.validate_widths(config.experiments.e6_widths)
  if not seeds:
    raise ConfigError("--seeds", seeds, "give at least one seed")
  os.makedirs(workdir, exist_ok=True)
  check_campaign_config(config, workdir)
  programs = proxy.ProgramCache()
  b = int(config.total_steps)
  num_samples = int(config.experiments.num_samples)
  results: dict[str, dict] = {}
  t_start = time.time()
  for seed in seeds:
    cfg = seed_config(config, seed)
    seed_dir = os.path.join(workdir, f"seed{seed}")
    stage1_dir = os.path.join(seed_dir, STAGE1)
    ref_dir = os.path.join(seed_dir, reference_arm_name(cfg))
    ref = None
    stage1_record = os.path.join(stage1_dir, ARM_RECORD)
    cached = _load_record(stage1_record, num_samples)
    if cached is not None:
      results[f"seed{seed}/{STAGE1}"] = cached
    for arm in selected:
      key = f"seed{seed}/{arm.name}"
      arm_dir = os.path.join(seed_dir, arm.name)
      record_path = os.path.join(arm_dir, ARM_RECORD)
      cached = _load_record(record_path, num_samples)
      if cached is not None and arm.family == "E5" and cached.get("e5") != _e5_key(cfg):
        cached = None  # other pruners or proxy seeds: the finished searches are reused
      if cached is not None and arm.family != "E5" and not report_only:
        # Records from before the raw-weight figures were measured: add them, keep the rest.
        missing = {"heldout_raw", "samples_raw"} - set(cached)
        if "heldout_raw" in missing:
          if ref is None:
            ref = make_reference(cfg)
          cached["heldout_raw"] = heldout_raw(arm_dir, ref)
        if "samples_raw" in missing:
          cached["samples_raw"] = raw_sample_metrics(cfg, arm_dir)
        if missing:
          _write_json(record_path, cached)
      if cached is not None:
        results[key] = cached
        continue
      if report_only:
        continue
      logging.info("[%s] %s (elapsed %.0f s)", key, arm.label, time.time() - t_start)
      s1 = adaptive_train.stage1_steps(cfg)
      train_single(cfg, stage1_dir, s1, devices=devices)
      if arm.family == "E5":
        rec = {
          "eval_version": EVAL_VERSION,
          "arm": arm.name,
          "family": arm.family,
          "seed": seed,
          "num_samples": num_samples,
          "e5": _e5_key(cfg),
          "pruners": run_pruners(cfg, arm_dir, stage1_dir, ref_dir, programs=programs),
        }
      else:
        extra: dict[str, Any] = {}
        if arm.family in ("E0", "E0+"):
          steps = b if arm.family == "E0" else b + extra_steps_e0plus(cfg)
          start = stage1_dir if arm.family == "E0" else os.path.join(seed_dir, "E0")
          train_single(cfg, arm_dir, steps, start_from=start, devices=devices)
          extra = {
            "steps": steps,
            "sampling_flops_ratio": 1.0,
            "training_cost": {"stage1": 0, "stage2": 0, "single_model": steps, "ratio": steps / b},
          }
        elif arm.family == "E6":
          summary = train_supernet_arm(
            cfg, arm_dir, stage1_dir, ref_dir, programs=programs, devices=devices
          )
          extra = {
            "sampling_flops_ratio": summary["sampling_flops_ratio"],
            "sampling_flops_ratio_analytic": summary["sampling_flops_ratio"],
            "training_cost": summary["training_cost"],
            "stage2_steps": summary["steps"],
            "supernet": summary,
          }
        else:
          summary = train_tdc_arm(
            cfg, arm, arm_dir, stage1_dir, ref_dir, programs=programs, devices=devices
          )
          cost = dict(summary["training_cost"])
          if arm.stage2_init == "scratch":  # no stage 1 went into E4's networks
            cost["stage1"] = 0.0
            cost["ratio"] = cost["stage2"] / cost["single_model"]
          extra = {
            # Analytic; evaluate_arm replaces it with XLA's cost analysis of the chain.
            "sampling_flops_ratio": summary["sampling_flops_ratio"],
            "sampling_flops_ratio_analytic": summary["sampling_flops_ratio"],
            "training_cost": cost,
            "stage2_steps": summary["stage2_steps"],
            "grouping": summary["grouping"],
            "scaling": summary["scaling"],
            "groups": [
              {
                k: g[k]
                for k in (
                  "t_range",
                  "flops_ratio",
                  "structure",
                  "proxy_evaluations",
                  "proxy_rounds",
                  "proxy_score",
                )
              }  # fmt: skip
              for g in summary["groups"]
            ],
            "heldout_own_groups": summary["heldout"],
          }
        if ref is None:
          ref = make_reference(cfg)
        rec = evaluate_arm(cfg, arm, arm_dir, ref, extra)
        logging.info(
          "[%s] L_simple %.4f VLB %.3f bits/dim FID %.2f, sampling FLOPs %.3f, training %.3f",
          key, rec["heldout"]["l_simple"], rec["heldout"]["vlb_bpd"], rec["samples"]["fid"],
          rec["sampling_flops_ratio"], rec["training_cost"]["ratio"],
        )  # fmt: skip
      _write_json(record_path, rec)
      results[key] = rec
    s1 = adaptive_train.stage1_steps(cfg)
    if (
      f"seed{seed}/{STAGE1}" not in results
      and not report_only
      and adaptive_train.latest_step(stage1_dir) == s1
    ):
      ref = ref or make_reference(cfg)
      from common import eval as eval_lib

      _, method, params, _ = eval_lib.load_params(stage1_dir)
      rec = {
        "eval_version": EVAL_VERSION,
        "arm": STAGE1,
        "family": "S1",
        "label": STAGE1_ARM.label,
        "seed": seed,
        "num_samples": num_samples,
        "heldout": routed_heldout(method, params, ref),
        "heldout_raw": heldout_raw(stage1_dir, ref),
        "sampling_flops_ratio": 1.0,
        "training_cost": {"stage1": s1, "stage2": 0, "single_model": s1, "ratio": s1 / b},
      }
      _write_json(stage1_record, rec)
      results[f"seed{seed}/{STAGE1}"] = rec

  if not results:
    raise FileNotFoundError(f"{workdir}: no finished arm to report")
  summary = summarize(results, config)
  summary.update(
    {
      "command": command,
      "config": json.loads(config.to_json_best_effort()),
      "arms_run": [a.name for a in selected],
      "runs": results,
    }
  )
  _write_json(os.path.join(workdir, "experiments.json"), summary)
  write_markdown(os.path.join(workdir, "experiments.md"), summary, command)
  write_plot(os.path.join(workdir, "experiments.png"), summary)
  logging.info("wrote %s/experiments.{json,md,png}", workdir)
  return summary


def _define_flags() -> None:
  """Defined only when this module runs as a binary: importing it next to another binary
  (tests, quickstart) must not register a second ``--config``."""
  config_flags.DEFINE_config_file("config", None, "TDC config and preset.")
  flags.DEFINE_string("workdir", None, "Campaign directory (seed<s>/<arm> below it).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds, paired across arms.")
  flags.DEFINE_list("arms", [], f"Arms or families ({', '.join(FAMILIES)}); empty: all.")
  flags.DEFINE_bool("report_only", False, "Only rewrite the reports from finished arms.")


def main(argv):
  del argv
  from common.train import cli

  # A restarted campaign (or the next seed) compiles the same train steps and proxy programs.
  cli.start_binary(persistent_compile_cache=True)
  try:
    run_experiments(
      flags.FLAGS.config,
      flags.FLAGS.workdir,
      seeds=[int(s) for s in flags.FLAGS.seeds],
      arms=list(flags.FLAGS.arms),
      report_only=flags.FLAGS.report_only,
      command="python -m adaptive.experiments " + " ".join(sys.argv[1:]),
    )
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)
  except RuntimeError as e:  # preempted: every finished step is saved
    print(f"stopped: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  from common.train import cli

  app.run(main, flags_parser=cli.parse_flags_or_exit)
