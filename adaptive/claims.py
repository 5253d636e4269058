"""Claims C1-C7 (spec §8.4) from the arms' records: per arm mean +- std over seeds, paired
differences between arms with their verdicts, and the pruner ablation's C6."""

from __future__ import annotations

from typing import Any

import numpy as np

from adaptive.arms import STAGE1_ARM, arm_catalog, reference_arm_name
from common.metrics import stats


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
  table = arm_table(results, seeds, arms, n_ref)
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


def arm_table(results: dict[str, dict], seeds: list[int], arms, n_ref: int) -> dict[str, Any]:
  """Per arm (E5 aside): each metric's mean +- std over seeds, per-group held-out L_simple over
  the ``n_ref`` reference groups, and the first seed's FLOPs per group network."""
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
  return table


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
