"""Trains the DRL-convex scheduler and evaluates it against the baselines (spec §7-§9, §11 C-E).

``python -m hybrid.optimize --config=configs/hybrid.py:sim --workdir=DIR``

1. Trains PER-DQN (``hybrid.agent``) on the admission MDP: one agent in the dynamic setting, or
   one per (G, N) cell of the grid in the static one; optionally the same agent with uniform
   replay (plain DQN). Each agent lives in ``DIR/agents/<name>/`` and resumes from its last
   checkpoint; a finished agent is not retrained.
2. Draws ``scheduler.eval.scenarios`` held-out scenarios for every (G, N) of the grid (seeded
   apart from training) and runs every method on them (``hybrid.evaluation``): the exact optimum,
   DRL-convex, GA, the greedy heuristics, random, all-local and admit-all.
3. Measures the storage and memory of the config's models, hybrid against a full personalized
   model per user (``hybrid.footprint``: parameter trees and XLA's memory analysis, nothing run).
4. Writes (``hybrid.optimize_report``) ``DIR/results.json`` (every scenario's utilities and
   decision times, per-cell summaries, ``footprint``), ``DIR/results.md`` (the tables, the
   storage and memory table and the spec's relative claims E1-E3) and ``DIR/results.png`` /
   ``DIR/training.png``.

The metrics per (G, N) and method are defined in ``hybrid.evaluation``.

Faults (issue 19): ``validate`` checks every ``seed`` / ``scheduler.*`` field before anything is
read or written (one line, exit 2); results and figures are written atomically; each agent's
checkpoint keeps the previous one and a damaged one falls back to it (``hybrid.agent.Trainer``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
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
from hybrid import env, evaluation, footprint, optimize_report, system


def _define_flags() -> None:
  """Defined only when this module runs as a binary: importing it next to another binary
  (tests, quickstart) must not register a second ``--config``."""
  config_flags.DEFINE_config_file("config", None, "Hybrid config and preset.")
  flags.DEFINE_string("workdir", None, "Output directory (resumable).")


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
    config,
    "scheduler.system.min_cut_point",
    number(lambda v: 0 <= v <= t),
    f"must be in [0, T={t}]",
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
  if "footprint" in config.scheduler:  # absent in configs saved before the field
    require(config, "scheduler.footprint", boolean, "must be true or false")


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
    "scheduler.eval.fixed_cut_points",
    lambda v: all(map(number(lambda n: 0 <= n <= t), v)),
    f"must be cut points in [0, T={t}]",
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
      rows = evaluation.evaluate_cell(config, sysp, profile, agents, float(g), int(n))
      summary = evaluation.summarize_cell(rows, int(n))
      cells.append({"num_gpus": float(g), "num_users": int(n), "summary": summary, "raw": rows})
      d = summary.get("drl_convex", {})
      logging.info(
        "G=%g N=%d: optimum %.3f, drl %s (gain share %s, %s ms), ga %.3f (%.1f ms), greedy %.3f, "
        "admit-all %.3f, all-local %.3f per user",
        g,
        n,
        summary["optimum"]["utility_per_user"],
        optimize_report.fmt(d.get("utility_per_user")),
        optimize_report.fmt(d.get("gain_share")),
        optimize_report.fmt(d.get("decision_ms"), ".2f"),
        summary["ga"]["utility_per_user"],
        summary["ga"]["decision_ms"],
        summary["greedy"]["utility_per_user"],
        summary["admit_all_opt"]["utility_per_user"],
        summary["all_local"]["utility_per_user"],
      )
  eval_seconds = time.perf_counter() - t0
  train_info = optimize_report.training_summary(agents)
  summary_claims = evaluation.claims(config, cells)
  # The storage and memory side of the design, from the config's models (compiled, not run).
  fp = footprint.measure(config) if config.scheduler.get("footprint", True) else None
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
    **({"footprint": fp} if fp else {}),
  }
  fileio.write_json(os.path.join(workdir, "results.json"), result, indent=1)
  optimize_report.write_markdown(
    os.path.join(workdir, "results.md"), config, cells, summary_claims, train_info, fp
  )
  optimize_report.plot(os.path.join(workdir, "results.png"), cells, config)
  optimize_report.plot_training(os.path.join(workdir, "training.png"), agents)
  optimize_report.write_headline(workdir, config, cells, train_seconds + eval_seconds)
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

  cli.start_binary()
  cli.run_or_exit(run, flags.FLAGS.config, flags.FLAGS.workdir, stop)


if __name__ == "__main__":
  import sys

  from hybrid import fields

  fields.exit_if_renamed(sys.argv)
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  from common.train import cli

  app.run(main, flags_parser=cli.parse_flags_or_exit)
