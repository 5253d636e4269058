"""The held-out evaluation of the scheduler (spec §9, §11 C-E): every method on every (G, N) cell.

``evaluate_cell`` draws ``scheduler.eval.scenarios`` scenarios for one (G, N) (seeded apart from
training) and runs every method on them: the exact optimum (by batch size, checked against
enumeration and OR-Tools where they run), DRL-convex, GA (full, and cut at DRL's decision time),
greedy, greedy by Delta, random, all-local, admit-all with optimal and fixed cut points.

Metrics per (G, N) and method: utility per user (mean of U / N); the gap to the optimum per user;
``gain_share`` = (U - U_local) / (U_opt - U_local) on scenario means, the share of the optimum's
gain over all-local that a method gets (1 = optimal; defined whatever the sign of U); the raw
ratio U / U_opt where U_opt > 0; the fraction of scenarios solved optimally; decision time.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hybrid import agent as agent_lib
from hybrid import baselines, env, system


def _agent_for(config, agents, g: float, n: int, uniform: bool = False):
  suffix = "_uniform" if uniform else ""
  if config.scheduler.setting == "dynamic":
    return agents.get(f"dynamic{suffix}")
  return agents.get(f"G{g:g}_N{n}{suffix}")


def _timed(fn):
  t = time.perf_counter()
  d = fn()
  return d, time.perf_counter() - t


def evaluate_cell(config, sysp, profile, agents, g: float, n: int) -> dict[str, Any]:
  """Runs every method on the held-out scenarios of one (G, N); raw per-scenario results."""
  e = config.scheduler.eval
  seq = np.random.SeedSequence([config.seed, e.seed_offset, int(round(g * 1000)), n])
  scn_rng, algo_rng = (np.random.default_rng(s) for s in seq.spawn(2))
  hybrid_env = env.HybridEnv(sysp, profile)
  drl = _agent_for(config, agents, g, n)
  dqn = _agent_for(config, agents, g, n, uniform=True)
  for entry in (drl, dqn):
    if entry is not None:  # compile the greedy step outside the timings
      entry[0].greedy_action(
        entry[1], np.zeros((sysp.max_users, 4), np.float32), np.zeros(6, np.float32)
      )
  rows: dict[str, dict[str, list[float]]] = {}
  ga_kw = dict(
    population=e.ga_population, generations=e.ga_generations, mutation_prob=e.ga_mutation
  )

  def record(name, d, seconds):
    r = rows.setdefault(name, {"utility": [], "seconds": [], "admitted": []})
    r["utility"].append(float(d.utility))
    r["seconds"].append(float(seconds))
    r["admitted"].append(int(np.sum(d.admit)))

  for _ in range(e.scenarios):
    scn = system.sample_scenario(scn_rng, profile, sysp, n, g)
    opt, t = _timed(lambda scn=scn: baselines.optimum_by_batch(scn, sysp, profile))
    record("optimum", opt, t)
    checks = []
    if n <= e.enum_max_users:
      d, t = _timed(lambda scn=scn: baselines.optimum_enumeration(scn, sysp, profile))
      record("optimum_enumeration", d, t)
      checks.append(d.utility)
    if n <= e.ortools_max_users:
      d, t = _timed(
        lambda scn=scn: baselines.optimum_ortools(scn, sysp, profile, solver=e.ortools_solver)
      )
      record("optimum_ortools", d, t)
      checks.append(d.utility)
    for u in checks:
      if abs(u - opt.utility) > 1e-6 * max(1.0, abs(opt.utility)):
        raise AssertionError(f"exact solvers disagree at G={g}, N={n}: {u} vs {opt.utility}")
    drl_seconds = None
    if drl is not None:
      d, drl_seconds = _timed(lambda scn=scn: agent_lib.drl_decide(drl[0], drl[1], hybrid_env, scn))
      record("drl_convex", d, drl_seconds)
    if dqn is not None:
      d, t = _timed(lambda scn=scn: agent_lib.drl_decide(dqn[0], dqn[1], hybrid_env, scn))
      record("dqn_convex", d, t)
    d, t = _timed(
      lambda scn=scn: baselines.genetic_algorithm(scn, sysp, profile, algo_rng, **ga_kw)
    )
    record("ga", d, t)
    if drl_seconds is not None:
      d, t = _timed(
        lambda scn=scn, budget=drl_seconds: baselines.genetic_algorithm(
          scn, sysp, profile, algo_rng, time_budget_s=budget, **ga_kw
        )
      )
      record("ga_at_drl_time", d, t)
    for name, fn in (
      ("greedy", lambda scn=scn: baselines.greedy(scn, sysp, profile)),
      ("greedy_delta", lambda scn=scn: baselines.greedy_delta(scn, sysp, profile)),
      ("random", lambda scn=scn: baselines.random_admission(scn, sysp, profile, algo_rng)),
      ("all_local", lambda scn=scn: baselines.all_local(scn, sysp, profile)),
      ("admit_all_opt", lambda scn=scn: baselines.admit_all(scn, sysp, profile)),
    ):
      d, t = _timed(fn)
      record(name, d, t)
    for fixed in e.fixed_cut_points:
      d, t = _timed(lambda scn=scn, fixed=fixed: baselines.admit_all(scn, sysp, profile, fixed))
      record(f"admit_all_n{fixed:g}", d, t)
  return rows


def summarize_cell(rows: dict[str, dict[str, list[float]]], n: int) -> dict[str, dict[str, Any]]:
  """Per-method metrics of one cell from its raw rows (see the module docstring)."""
  opt = np.asarray(rows["optimum"]["utility"])
  local = np.asarray(rows["all_local"]["utility"])
  out = {}
  for name, r in rows.items():
    u = np.asarray(r["utility"])
    denom = opt.mean() - local.mean()
    out[name] = {
      "utility_per_user": float(u.mean() / n),
      "utility_per_user_std": float(u.std() / n),
      "gap_per_user": float((opt - u).mean() / n),
      "gain_share": float((u.mean() - local.mean()) / denom) if denom > 1e-9 else None,
      "ratio_to_optimum": float(u.mean() / opt.mean()) if opt.mean() > 0 else None,
      "optimal_fraction": float(np.mean(u >= opt - 1e-6 * np.maximum(1.0, np.abs(opt)))),
      "decision_ms": float(np.mean(r["seconds"]) * 1e3),
      "admitted": float(np.mean(r["admitted"])),
    }
  return out


def claims(config, cells: list[dict[str, Any]]) -> dict[str, Any]:
  """The spec's relative claims E1-E3 over the grid (E4, E5 need the model half's profiles)."""

  def collect(method, key):
    return [c["summary"][method][key] for c in cells if method in c["summary"]]

  out: dict[str, Any] = {}
  if any("drl_convex" in c["summary"] for c in cells):
    shares = [v for v in collect("drl_convex", "gain_share") if v is not None]
    ratios = [v for v in collect("drl_convex", "ratio_to_optimum") if v is not None]
    out["E1"] = {
      "drl_gain_share_mean": float(np.mean(shares)) if shares else None,
      "drl_gain_share_min": float(np.min(shares)) if shares else None,
      "drl_ratio_to_optimum_mean_where_positive": float(np.mean(ratios)) if ratios else None,
      "drl_gap_per_user_mean": float(np.mean(collect("drl_convex", "gap_per_user"))),
      "drl_optimal_fraction_mean": float(np.mean(collect("drl_convex", "optimal_fraction"))),
      "drl_decision_ms_mean": float(np.mean(collect("drl_convex", "decision_ms"))),
      "ga_gap_per_user_mean": float(np.mean(collect("ga", "gap_per_user"))),
      "ga_decision_ms_mean": float(np.mean(collect("ga", "decision_ms"))),
      "ga_at_drl_time_gap_per_user_mean": float(np.mean(collect("ga_at_drl_time", "gap_per_user"))),
      "cells_where_drl_beats_ga_at_its_time": int(
        sum(
          c["summary"]["drl_convex"]["utility_per_user"]
          >= c["summary"]["ga_at_drl_time"]["utility_per_user"]
          for c in cells
        )
      ),
      "cells": len(cells),
    }
  fixed = [f"admit_all_n{v:g}" for v in config.scheduler.eval.fixed_cut_points]
  out["E2"] = {
    f"optimal_minus_{f}_per_user": float(
      np.mean(
        [
          c["summary"]["admit_all_opt"]["utility_per_user"] - c["summary"][f]["utility_per_user"]
          for c in cells
        ]
      )
    )
    for f in fixed
  }
  out["E3"] = {
    "optimum_minus_all_local_per_user": float(
      np.mean(
        [
          c["summary"]["optimum"]["utility_per_user"]
          - c["summary"]["all_local"]["utility_per_user"]
          for c in cells
        ]
      )
    ),
    "selective_admission_gain_per_user": {
      f"G{c['num_gpus']:g}_N{c['num_users']}": c["summary"]["optimum"]["utility_per_user"]
      - c["summary"]["admit_all_opt"]["utility_per_user"]
      for c in cells
    },
  }
  return out
