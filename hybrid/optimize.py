"""Trains the DRL-convex scheduler and evaluates it against the baselines (spec §7-§9, §11 C-E).

``python -m hybrid.optimize --config=configs/hybrid.py:sim --workdir=DIR``

1. Trains PER-DQN (``hybrid.agent``) on the admission MDP: one agent in the dynamic setting, or
   one per (G, N) cell of the grid in the static one; optionally the same agent with uniform
   replay (plain DQN). Each agent lives in ``DIR/agents/<name>/`` and resumes from its last
   checkpoint; a finished agent is not retrained.
2. Draws ``scheduler.eval.scenarios`` held-out scenarios for every (G, N) of the grid (seeded
   apart from training) and runs every method on them: the exact optimum (by batch size, checked
   against enumeration and OR-Tools where they run), DRL-convex, GA (full, and cut at DRL's
   decision time), greedy, greedy by Delta, random, all-local, admit-all with optimal and fixed
   splits.
3. Writes ``DIR/results.json`` (every scenario's utilities and decision times, per-cell
   summaries), ``DIR/results.md`` (the tables and the spec's relative claims E1-E3) and
   ``DIR/results.png`` / ``DIR/training.png``.

Metrics per (G, N) and method: utility per user (mean of U / N); the gap to the optimum per user;
``gain_share`` = (U - U_local) / (U_opt - U_local) on scenario means, the share of the optimum's
gain over all-local that a method gets (1 = optimal; defined whatever the sign of U); the raw
ratio U / U_opt where U_opt > 0; the fraction of scenarios solved optimally; decision time.

Faults (issue 19): ``validate`` checks every ``seed`` / ``scheduler.*`` field before anything is
read or written (one line, exit 2); results and figures are written atomically; each agent's
checkpoint keeps the previous one and a damaged one falls back to it (``hybrid.agent.Trainer``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from common import fileio
from common.train.validate import (
  ConfigError,
  boolean,
  each,
  integer,
  number,
  require,
  require_choice,
)
from hybrid import agent as agent_lib
from hybrid import baselines, env, system


def _define_flags() -> None:
  """Defined only when this module runs as a binary: importing it next to another binary
  (tests, quickstart) must not register a second ``--config``."""
  config_flags.DEFINE_config_file("config", None, "Hybrid config and preset.")
  flags.DEFINE_string("workdir", None, "Output directory (resumable).")


# Methods in table order; "optimum" is the reference.
EXACT = ("optimum", "optimum_enumeration", "optimum_ortools")
HEADLINE = ("drl_convex", "ga", "greedy", "all_local", "admit_all_opt")


class _Stop:
  """Set by SIGTERM: the trainer checkpoints and the binary exits cleanly."""

  def __init__(self):
    self.flag = False

  def __call__(self) -> bool:
    return self.flag


def _validate_system(config) -> None:
  """``seed``, ``scheduler.profile`` / ``setting`` / ``system.*``."""
  require(config, "seed", integer(0), "must be an integer >= 0")
  s = config.scheduler
  extra = set(s.system.keys()) - {f.name for f in dataclasses.fields(system.SystemParams)}
  if extra:
    raise ConfigError("scheduler.system", sorted(extra), "unknown fields")
  t = require(config, "scheduler.system.num_steps", integer(1), "must be an integer >= 1")
  require(
    config, "scheduler.system.min_split", number(lambda v: 0 <= v <= t), f"must be in [0, T={t}]"
  )
  for k in ("capacity", "max_users"):
    require(config, f"scheduler.system.{k}", integer(1), "must be an integer >= 1")
  for k in ("window", "bandwidth_hz", "spectral_efficiency", "alpha_upper_scale"):
    require(config, f"scheduler.system.{k}", number(lambda v: v > 0), "must be > 0")
  for k in ("prompt_bits", "latent_bits"):
    require(config, f"scheduler.system.{k}", number(lambda v: v >= 0), "must be >= 0")
  require_choice(config, "scheduler.system.transmission", system.TRANSMISSION_FORMULAS)
  require(
    config,
    "scheduler.profile",
    lambda v: v == "paper" or os.path.isfile(v),
    "must be paper or an existing profile.json (hybrid.profile writes one)",
  )
  require(
    config,
    "scheduler.setting",
    lambda v: v in ("static", "dynamic"),
    "must be static or dynamic for the binary",
  )
  require(config, "scheduler.plain_dqn", boolean, "must be true or false")


def _validate_grid(config) -> None:
  """The training and evaluation grids and ``scheduler.eval.*``."""
  s, max_users = config.scheduler, config.scheduler.system.max_users
  g_ok, g_msg = number(lambda v: v > 0), "edge sizes G must be > 0 (a non-empty list)"
  n_ok = integer(1, max_users)
  n_msg = f"user counts N must be integers in [1, {max_users}] (a non-empty list)"
  for prefix in ("scheduler.train_", "scheduler.eval."):
    require(config, f"{prefix}num_gpus", each(g_ok), g_msg)
    require(config, f"{prefix}num_users", each(n_ok), n_msg)
  for k, lo in (("scenarios", 1), ("seed_offset", 0), ("enum_max_users", 0)):
    require(config, f"scheduler.eval.{k}", integer(lo), f"must be an integer >= {lo}")
  require(config, "scheduler.eval.ortools_max_users", integer(0), "must be an integer >= 0")
  require_choice(config, "scheduler.eval.ortools_solver", ("cp_sat", "scip"))
  require(
    config,
    "scheduler.eval.ga_population",
    lambda v: integer(2)(v) and v % 2 == 0,
    "must be an even integer >= 2",
  )
  require(config, "scheduler.eval.ga_generations", integer(1), "must be an integer >= 1")
  require(config, "scheduler.eval.ga_mutation", number(lambda v: 0 <= v <= 1), "must be in [0, 1]")
  t = s.system.num_steps
  require(
    config,
    "scheduler.eval.fixed_splits",
    lambda v: all(map(number(lambda n: 0 <= n <= t), v)),
    f"must be split points in [0, T={t}]",
  )


def _validate_agent(config) -> None:
  """``scheduler.agent.*``: the PER-DQN hyper-parameters and the training loop's."""
  a = config.scheduler.agent
  names = {f.name for f in dataclasses.fields(agent_lib.AgentConfig)} | agent_lib.LOOP_KEYS
  if set(a.keys()) - names:
    raise ConfigError("scheduler.agent", sorted(set(a.keys()) - names), "unknown fields")
  f = "scheduler.agent."
  for k, lo in (("episodes", 1), ("log_every_episodes", 1), ("ckpt_every_episodes", 1)):
    require(config, f + k, integer(lo), f"must be an integer >= {lo}")
  for k, lo in (("hidden", 1), ("depth", 1), ("embed_dim", 1), ("target_every", 1)):
    require(config, f + k, integer(lo), f"must be an integer >= {lo}")
  for k in ("learn_start", "eps_decay_start"):
    require(config, f + k, integer(0), "must be an integer >= 0")
  require(config, f + "eps_decay_episodes", integer(1), "must be an integer >= 1")
  for k in ("learning_rate", "grad_clip_norm", "priority_eps", "priority_clip"):
    require(config, f + k, number(lambda v: v > 0), "must be > 0")
  for k in ("weight_decay", "beta_increment"):
    require(config, f + k, number(lambda v: v >= 0), "must be >= 0")
  for k in ("gamma", "priority_exponent", "beta_start", "eps_start"):
    require(config, f + k, number(lambda v: 0 <= v <= 1), "must be in [0, 1]")
  eps = a.eps_start
  require(
    config, f + "eps_min", number(lambda v: 0 <= v <= eps), f"must be in [0, eps_start={eps}]"
  )
  require_choice(config, f + "replay", agent_lib.REPLAYS)
  require(config, f + "apply_is_weights", boolean, "must be true or false")
  frac = require(config, f + "terminal_fraction", number(lambda v: 0 < v < 1), "must be in (0, 1)")
  require(
    config,
    f + "batch_size",
    lambda v: integer(2)(v) and 1 <= int(v * frac) < v,
    f"must be an integer whose terminal_fraction={frac} part and the rest are both >= 1",
  )
  require(
    config,
    f + "capacity",
    lambda v: integer(2)(v) and 1 <= int(v * frac) < v,
    f"must be an integer whose terminal_fraction={frac} part and the rest are both >= 1",
  )


def validate(config) -> None:
  """Every ``seed`` / ``scheduler.*`` field the binary uses; raises ``ConfigError`` naming the
  first bad one, before anything is read or written."""
  _validate_system(config)
  _validate_grid(config)
  _validate_agent(config)


def build(config) -> tuple[system.SystemParams, system.Profile]:
  """The system constants and the profile of a config, validated (``validate``).

  Raises:
    ConfigError: a bad field, or a profile JSON that cannot be read.
  """
  validate(config)
  s = config.scheduler
  sysp = system.SystemParams.from_config(s.system)
  try:
    profile = system.load_profile(s.profile, sysp.num_steps)
  except (OSError, ValueError) as e:
    raise ConfigError("scheduler.profile", s.profile, " ".join(str(e).split())) from None
  return sysp, profile


def _agent_cfg(config, replay: str) -> agent_lib.AgentConfig:
  cfg = agent_lib.AgentConfig.from_config(config.scheduler.agent)
  return dataclasses.replace(cfg, replay=replay)


def agent_plan(config) -> list[tuple[str, str, tuple[float, ...], tuple[int, ...]]]:
  """(name, replay, G list, N list) of every agent to train."""
  s = config.scheduler
  replays = ["prioritized"] + (["uniform"] if s.plain_dqn else [])
  plan = []
  for replay in replays:
    suffix = "" if replay == "prioritized" else "_uniform"
    if s.setting == "dynamic":
      plan.append(
        (
          f"dynamic{suffix}",
          replay,
          tuple(float(g) for g in s.train_num_gpus),
          tuple(int(n) for n in s.train_num_users),
        )
      )
    else:
      for g in s.eval.num_gpus:
        for n in s.eval.num_users:
          plan.append((f"G{g:g}_N{n}{suffix}", replay, (float(g),), (int(n),)))
  return plan


def train_agents(config, sysp, profile, workdir: str, stop: _Stop) -> dict[str, Any]:
  """Trains (or resumes) every agent of the plan; returns name -> (PerDQN, params, history)."""
  s = config.scheduler
  out = {}
  for i, (name, replay, gpus, users) in enumerate(agent_plan(config)):
    cfg = _agent_cfg(config, replay)
    ag = agent_lib.PerDQN(cfg, sysp.max_users)
    stream = env.ScenarioStream(sysp, profile, s.setting, gpus, users)
    trainer = agent_lib.Trainer(
      ag, stream, seed=config.seed + 7919 * i, ckpt_dir=os.path.join(workdir, "agents", name)
    )
    if trainer.episode < s.agent.episodes:
      logging.info(
        "training agent %s (%s replay, G %s, N %s) from episode %d to %d",
        name,
        replay,
        gpus,
        users,
        trainer.episode,
        s.agent.episodes,
      )
      trainer.run(
        s.agent.episodes,
        log_every=s.agent.log_every_episodes,
        ckpt_every=s.agent.ckpt_every_episodes,
        stop=stop,
      )
      if stop():
        raise SystemExit(f"stopped by SIGTERM at agent {name}, episode {trainer.episode}")
    else:
      logging.info("agent %s already trained (%d episodes)", name, trainer.episode)
    out[name] = (ag, trainer.ts.params, trainer.history)
  return out


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
    for fixed in e.fixed_splits:
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


def _methods(cells) -> list[str]:
  """Every method of any cell, in first-seen order (enumeration only runs for small N)."""
  seen: dict[str, None] = {}
  for c in cells:
    seen.update(dict.fromkeys(c["summary"]))
  return list(seen)


def _fmt(v, spec=".3f"):
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


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
  fixed = [f"admit_all_n{v:g}" for v in config.scheduler.eval.fixed_splits]
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


def write_markdown(path: str, config, cells, summary_claims, train_info) -> None:
  s = config.scheduler
  methods = _methods(cells)
  lines = [
    "# hybrid.optimize results",
    "",
    f"Profile `{s.profile}`, transmission `{s.system.transmission}`, setting `{s.setting}`, "
    f"{s.agent.episodes} episodes per agent, {s.eval.scenarios} held-out scenarios per cell, "
    f"seed {config.seed}. Toy-scale simulator figures (seconds-equivalent), not the paper's.",
    "",
    "## Training",
    "",
  ]
  for name, info in train_info.items():
    lines.append(
      f"- `{name}`: {info['episodes']} episodes; utility/user over the last 10%: "
      f"{_fmt(info['final_utility_per_user'])}"
    )
  lines += ["", "## Utility per user (mean U/N) by (G, N)", ""]
  lines.append("| G | N | " + " | ".join(methods) + " |")
  lines.append("|---|---|" + "---|" * len(methods))
  for c in cells:
    vals = [_fmt(c["summary"].get(m, {}).get("utility_per_user"), ".2f") for m in methods]
    lines.append(f"| {c['num_gpus']:g} | {c['num_users']} | " + " | ".join(vals) + " |")
  lines += ["", "## DRL-convex and heuristics against the optimum", ""]
  cols = [m for m in ("drl_convex", "dqn_convex", "ga", "ga_at_drl_time", "greedy") if m in methods]
  lines.append(
    "| G | N | "
    + " | ".join(f"{m} gain share / optimal % / gap" for m in cols)
    + " | admitted opt / drl |"
  )
  lines.append("|---|---|" + "---|" * (len(cols) + 1))
  for c in cells:
    sm = c["summary"]
    vals = [
      f"{_fmt(sm[m]['gain_share'])} / {100 * sm[m]['optimal_fraction']:.0f} / "
      f"{_fmt(sm[m]['gap_per_user'])}"
      for m in cols
    ]
    adm = (
      f"{sm['optimum']['admitted']:.1f} / {_fmt(sm.get('drl_convex', {}).get('admitted'), '.1f')}"
    )
    lines.append(f"| {c['num_gpus']:g} | {c['num_users']} | " + " | ".join(vals) + f" | {adm} |")
  lines += ["", "## Decision time (ms per scenario, mean over the grid)", ""]
  lines.append("| method | ms |")
  lines.append("|---|---|")
  for m in methods:
    ms = np.mean([c["summary"][m]["decision_ms"] for c in cells if m in c["summary"]])
    lines.append(f"| {m} | {ms:.3f} |")
  lines += ["", "## Relative claims (spec §11 E)", "", "```", json.dumps(summary_claims, indent=2)]
  lines += ["```", ""]
  fileio.write_text(path, "\n".join(lines))


def plot(path: str, cells, config) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  gpus = sorted({c["num_gpus"] for c in cells})
  methods = [
    m
    for m in (
      "optimum",
      "drl_convex",
      "dqn_convex",
      "ga",
      "greedy",
      "admit_all_opt",
      "admit_all_n80",
      "admit_all_n200",
      "all_local",
    )
    if m in _methods(cells)
  ]
  fig, axes = plt.subplots(1, len(gpus) + 1, figsize=(4.2 * (len(gpus) + 1), 3.8))
  for ax, g in zip(axes[:-1], gpus, strict=True):
    sub = sorted((c for c in cells if c["num_gpus"] == g), key=lambda c: c["num_users"])
    ns = [c["num_users"] for c in sub]
    for m in methods:
      u = [c["summary"].get(m, {}).get("utility_per_user", np.nan) for c in sub]
      ax.plot(ns, u, marker="o", label=m)
    ax.set_title(f"G = {g:g}")
    ax.set_xlabel("users N")
    ax.set_ylabel("utility per user")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  ax = axes[-1]
  timed = [
    m
    for m in (
      "optimum",
      "optimum_enumeration",
      "optimum_ortools",
      "drl_convex",
      "ga",
      "ga_at_drl_time",
      "greedy",
    )
    if m in _methods(cells)
  ]
  for m in timed:
    per_n: dict[int, list[float]] = {}
    for c in cells:
      if m in c["summary"]:
        per_n.setdefault(c["num_users"], []).append(c["summary"][m]["decision_ms"])
    ns = sorted(per_n)
    ax.plot(ns, [np.mean(per_n[n]) for n in ns], marker="o", label=m)
  ax.set_yscale("log")
  ax.set_xlabel("users N")
  ax.set_ylabel("decision time (ms)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.suptitle(f"hybrid scheduler, transmission={config.scheduler.system.transmission}")
  fig.tight_layout()
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)


def plot_training(path: str, agents) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, (_, _, history) in agents.items():
    u = np.asarray(history["utility_per_user"])
    if len(u) == 0:
      continue
    w = max(1, len(u) // 50)
    ax.plot(np.convolve(u, np.ones(w) / w, mode="valid"), label=name, lw=0.8)
  ax.set_xlabel("episode")
  ax.set_ylabel("utility per user (moving mean)")
  ax.grid(alpha=0.3)
  if len(agents) <= 8:
    ax.legend(fontsize=7)
  fig.tight_layout()
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)


HEADLINE_BASELINES = ("optimum", "ga", "greedy", "admit_all_opt", "random", "all_local")
HEADLINE_KEYS = (
  "utility_per_user",
  "gain_share",
  "gap_per_user",
  "optimal_fraction",
  "decision_ms",
)


def write_headline(workdir: str, config, cells, wall_time_s: float) -> str:
  """``workdir/headline.json`` (``common.headline``): grid means of DRL-convex and the baselines."""
  from common import headline

  def mean_of(m, k):
    vals = [c["summary"][m][k] for c in cells if m in c["summary"]]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None

  u_opt, u_local = mean_of("optimum", "utility_per_user"), mean_of("all_local", "utility_per_user")

  def grid_mean(m):
    out = {k: mean_of(m, k) for k in HEADLINE_KEYS}
    # The gain share of the grid's mean utilities: a per-cell share explodes in cells where the
    # optimum barely beats all-local (a measured profile of briefly trained models has such cells).
    u = out["utility_per_user"]
    out["gain_share"] = (u - u_local) / (u_opt - u_local) if u_opt - u_local > 1e-9 else None
    return out

  methods = _methods(cells)
  arm = "drl_convex" if "drl_convex" in methods else "optimum"
  return headline.write(
    workdir,
    method="hybrid",
    kind="scheduler",
    arm=arm,
    metrics=grid_mean(arm),
    # Utility per user rather than the gain share as the one figure: the share's denominator
    # U_opt - U_local can be ~0 (a profile under which offloading barely pays).
    primary="utility_per_user",
    higher_is_better=True,
    baselines={m: grid_mean(m) for m in HEADLINE_BASELINES if m in methods and m != arm},
    wall_time_s=wall_time_s,
    note=f"profile {config.scheduler.profile}; means over {len(cells)} (G, N) cells of "
    f"{config.scheduler.eval.scenarios} held-out scenarios; gain share = (U - U_local) / "
    "(U_opt - U_local) on the grid's mean utility per user",
  )


def run(config, workdir: str, stop: _Stop | None = None) -> dict[str, Any]:
  """The whole binary; returns what results.json holds."""
  stop = stop or _Stop()
  sysp, profile = build(config)
  fileio.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  logging.info("jax %s on %s", jax.__version__, jax.devices()[0].platform)
  t0 = time.perf_counter()
  agents = train_agents(config, sysp, profile, workdir, stop)
  train_seconds = time.perf_counter() - t0
  e = config.scheduler.eval
  cells = []
  t0 = time.perf_counter()
  for g in e.num_gpus:
    for n in e.num_users:
      rows = evaluate_cell(config, sysp, profile, agents, float(g), int(n))
      summary = summarize_cell(rows, int(n))
      cells.append({"num_gpus": float(g), "num_users": int(n), "summary": summary, "raw": rows})
      d = summary.get("drl_convex", {})
      logging.info(
        "G=%g N=%d: optimum %.3f, drl %s (gain share %s, %s ms), ga %.3f (%.1f ms), greedy %.3f, "
        "admit-all %.3f, all-local %.3f per user",
        g,
        n,
        summary["optimum"]["utility_per_user"],
        _fmt(d.get("utility_per_user")),
        _fmt(d.get("gain_share")),
        _fmt(d.get("decision_ms"), ".2f"),
        summary["ga"]["utility_per_user"],
        summary["ga"]["decision_ms"],
        summary["greedy"]["utility_per_user"],
        summary["admit_all_opt"]["utility_per_user"],
        summary["all_local"]["utility_per_user"],
      )
  eval_seconds = time.perf_counter() - t0
  train_info = {}
  for name, (_, _, h) in agents.items():
    u = h["utility_per_user"]
    tail = u[-max(1, len(u) // 10) :]
    train_info[name] = {
      "episodes": len(u),
      "final_utility_per_user": float(np.mean(tail)) if tail else None,
    }
  summary_claims = claims(config, cells)
  result = {
    "config": json.loads(config.to_json_best_effort()),
    "profile": {
      "accuracy": profile.accuracy.__dict__,
      "latency_source": profile.latency.source,
    },
    "train": train_info,
    "train_seconds": train_seconds,
    "eval_seconds": eval_seconds,
    "cells": cells,
    "claims": summary_claims,
  }
  fileio.write_json(os.path.join(workdir, "results.json"), result, indent=1)
  write_markdown(os.path.join(workdir, "results.md"), config, cells, summary_claims, train_info)
  plot(os.path.join(workdir, "results.png"), cells, config)
  plot_training(os.path.join(workdir, "training.png"), agents)
  write_headline(workdir, config, cells, train_seconds + eval_seconds)
  logging.info("claims: %s", json.dumps(summary_claims))
  logging.info(
    "wrote %s/results.{json,md,png} (train %.0f s, eval %.0f s)",
    workdir,
    train_seconds,
    eval_seconds,
  )
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  stop = _Stop()

  def on_term(signum, frame):
    logging.warning("SIGTERM: checkpointing and stopping")
    stop.flag = True

  signal.signal(signal.SIGTERM, on_term)
  from common.train import cli

  cli.run_or_exit(run, flags.FLAGS.config, flags.FLAGS.workdir, stop)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  from common.train import cli

  app.run(main, flags_parser=cli.parse_flags_or_exit)
