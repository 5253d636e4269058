"""How an arm is scored: paired held-out losses, FID/KID and FLOPs (spec §8.4's measurements).

Every trained arm is scored on the same held-out draws (``experiments.heldout_per_group`` fixed
(x0, t, eps) test triples per group of the config's grouping, each routed to the arm's network
for its t, so per-group losses are paired across arms whatever their grouping) and by
``common.eval`` (FID/KID of ``experiments.num_samples`` samples, XLA FLOPs per sample), each with
the EMA and the raw weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from adaptive.arms import STAGE1, STAGE1_ARM, Arm

EVAL_VERSION = 1  # bump when the evaluation changes, to re-evaluate finished arms


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
  """The draws every arm of one training seed is scored on (test split, fixed seed 0)."""
  from adaptive import heldout, stages
  from common import data
  from common.train import method as method_lib

  groups = stages.make_groups(config)
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


def evaluate_stage1(config, stage1_dir: str, ref: Reference, steps: int) -> dict[str, Any]:
  """Held-out losses of the shared stage 1 at ``steps``: where every arm starts from."""
  from common import eval as eval_lib

  b = int(config.total_steps)
  _, method, params, _ = eval_lib.load_params(stage1_dir)
  return {
    "eval_version": EVAL_VERSION,
    "arm": STAGE1,
    "family": "S1",
    "label": STAGE1_ARM.label,
    "seed": int(config.seed),
    "num_samples": int(config.experiments.num_samples),
    "heldout": routed_heldout(method, params, ref),
    "heldout_raw": heldout_raw(stage1_dir, ref),
    "sampling_flops_ratio": 1.0,
    "training_cost": {"stage1": steps, "stage2": 0, "single_model": steps, "ratio": steps / b},
  }
