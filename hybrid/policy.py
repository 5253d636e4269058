"""Admission decisions for the edge loop: who a window admits and where each chain is cut.

A ``Scheduler`` turns one window's requests into the MDP's view (users in visiting order,
strongest device first) and asks a policy ``Scenario -> Decision`` for admissions and cut points,
rounded to whole steps. The policy is the trained PER-DQN of a ``hybrid.optimize`` workdir
(``drl_policy``: grant/deny user by user, closed-form cut points at the final B) or a
``hybrid.baselines`` fallback (``fallback_policy``). This module is the one that knows the
layout of a ``hybrid.optimize`` workdir (``config.json``, ``agents/<name>/agent.npz``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from hybrid import agent as agent_lib
from hybrid import baselines, env, system

FALLBACKS = ("optimum", "greedy", "admit_all", "all_local")


@dataclasses.dataclass
class WindowDecision:
  """One window's decision, indexed in request (arrival) order.

  Attributes:
    admit: [N] bool.
    cut_point: [N] int local steps n_i (T for denied users).
    batch: B, the number admitted.
    predicted: [N] float64 latency model's L_i (seconds) for these decisions and waits.
    utility: U of the decision (closed-form objective with the rounded cut points).
    scenario: the scheduler's view, users in visiting order; ``order[j]`` is the request index of
      scenario row j.
    seconds: wall time of the decision.
  """

  admit: np.ndarray
  cut_point: np.ndarray
  batch: int
  predicted: np.ndarray
  utility: float
  scenario: system.Scenario
  order: np.ndarray
  seconds: float


class Scheduler:
  """Turns a window's requests into admissions and cut points with a policy
  ``Scenario -> Decision``."""

  def __init__(
    self,
    sysp: system.SystemParams,
    profile: system.Profile,
    num_gpus: float,
    policy: Callable[[system.Scenario], baselines.Decision],
    name: str,
  ):
    self.sysp, self.profile, self.policy, self.name = sysp, profile, policy, name
    self.num_gpus = float(num_gpus)
    self.edge_k, self.edge_h = profile.latency.edge(num_gpus)

  def scenario(self, alpha, tau, wait) -> tuple[system.Scenario, np.ndarray]:
    """The window as the MDP sees it: users sorted by device step latency, strongest first."""
    alpha, tau, wait = (np.asarray(v, np.float64) for v in (alpha, tau, wait))
    order = np.argsort(tau, kind="stable")
    types = np.abs(self.profile.latency.device_tau[None, :] - tau[order, None]).argmin(-1)
    scn = system.Scenario(
      alpha=alpha[order],
      tau=tau[order],
      wait=wait[order],
      device_type=types,
      num_gpus=self.num_gpus,
      edge_k=self.edge_k,
      edge_h=self.edge_h,
    )
    return scn, order

  def decide(self, alpha, tau, wait) -> WindowDecision:
    """Args: [N] alpha, device step latency tau (s) and measured wait (s), in request order."""
    t0 = time.perf_counter()
    n = len(alpha)
    if not 1 <= n <= self.sysp.max_users:
      raise ValueError(f"Scheduler: a window holds 1..{self.sysp.max_users} requests, got {n}")
    scn, order = self.scenario(alpha, tau, wait)
    d = self.policy(scn)
    t = self.sysp.num_steps
    cut_point = np.where(d.admit, np.rint(d.cut_point), t).astype(np.int64)
    predicted = system.user_latency(scn, self.sysp, d.admit, cut_point)
    utility = float(system.objective(scn, self.sysp, self.profile, d.admit, cut_point))
    seconds = time.perf_counter() - t0
    inverse = np.empty(n, np.int64)
    inverse[order] = np.arange(n)
    return WindowDecision(
      admit=np.asarray(d.admit, bool)[inverse],
      cut_point=cut_point[inverse],
      batch=int(np.sum(d.admit)),
      predicted=predicted[inverse],
      utility=utility,
      scenario=scn,
      order=order,
      seconds=seconds,
    )


def fallback_policy(
  name: str, sysp: system.SystemParams, profile: system.Profile
) -> Callable[[system.Scenario], baselines.Decision]:
  """A ``hybrid.baselines`` policy by name (see ``FALLBACKS``)."""
  fns = {
    "optimum": baselines.optimum_by_batch,
    "greedy": baselines.greedy,
    "admit_all": baselines.admit_all,
    "all_local": baselines.all_local,
  }
  if name not in fns:
    raise ValueError(f"fallback policy must be one of {FALLBACKS}, got {name!r}")
  fn = fns[name]
  return lambda scn: fn(scn, sysp, profile)


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def find_policy_workdir(workdir: str) -> str | None:
  """The default ``hybrid.optimize`` workdir of a hybrid run: ``WORKDIR/optimize`` or ``WORKDIR``."""
  for d in (os.path.join(workdir, "optimize"), workdir):
    if os.path.isdir(os.path.join(d, "agents")):
      return d
  return None


def _pick_agent(agents_dir: str, name: str, num_gpus: float, num_users: int) -> str:
  names = sorted(
    d for d in os.listdir(agents_dir) if os.path.exists(os.path.join(agents_dir, d, "agent.npz"))
  )
  if not names:
    raise FileNotFoundError(f"{agents_dir} holds no trained agent (agents/<name>/agent.npz)")
  if name:
    if name not in names:
      raise FileNotFoundError(f"agent {name!r} not in {agents_dir}: {names}")
    return name
  if "dynamic" in names:
    return "dynamic"

  def distance(n: str):
    try:
      g, u = n.split("_")[:2]
      return (abs(float(g[1:]) - num_gpus), abs(int(u[1:]) - num_users), n)
    except (ValueError, IndexError):
      return (math.inf, math.inf, n)

  return min(names, key=distance)


def load_agent(
  policy_workdir: str, name: str = "", num_gpus: float = 1.0, num_users: int = 1
) -> tuple[agent_lib.PerDQN, Any, str, int]:
  """The trained Q-network of a ``hybrid.optimize`` workdir, without its replay buffers.

  ``Trainer.save`` writes ``jax.tree.leaves(TrainState)``; the Q-network's parameters are the
  first leaves (``TrainState.params`` is its first field), checked leaf by leaf against a fresh
  network of the saved agent settings.

  Returns:
    (agent, params, agent name, max_users of its state).
  """
  cfg_path = os.path.join(policy_workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{policy_workdir} is not a hybrid.optimize workdir (no config.json)")
  sched = _read_json(cfg_path)["scheduler"]
  max_users = int(sched["system"]["max_users"])
  agents_dir = os.path.join(policy_workdir, "agents")
  if not os.path.isdir(agents_dir):
    raise FileNotFoundError(f"{policy_workdir} has no agents/ (train with hybrid.optimize)")
  name = _pick_agent(agents_dir, name, num_gpus, num_users)
  meta = _read_json(os.path.join(agents_dir, name, "agent.json"))
  cfg = agent_lib.AgentConfig(**meta["agent"])
  ag = agent_lib.PerDQN(cfg, max_users)
  _, template = nnx.split(
    agent_lib.QNetwork(max_users, cfg.hidden, cfg.depth, cfg.embed_dim, rngs=nnx.Rngs(0))
  )
  leaves, treedef = jax.tree.flatten(template)
  # Checksums verified and the state finite (fileio.DamagedFileError names a damaged file).
  arrays, _ = agent_lib.read_checkpoint(os.path.join(agents_dir, name, "agent.npz"))
  loaded = [arrays[f"leaf{i:05d}"] for i in range(len(leaves))]
  for i, (a, b) in enumerate(zip(loaded, leaves, strict=True)):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(
        f"{agents_dir}/{name}: leaf {i} is {a.shape} {a.dtype}, the Q-network's is "
        f"{b.shape} {b.dtype}"
      )
  params = jax.tree.unflatten(treedef, [jax.numpy.asarray(v) for v in loaded])
  return ag, params, name, max_users


def drl_policy(
  ag: agent_lib.PerDQN, params, sysp: system.SystemParams, profile: system.Profile
) -> Callable[[system.Scenario], baselines.Decision]:
  """DRL-convex: the trained agent's greedy admissions, closed-form cut points."""
  if ag.max_users != sysp.max_users:
    raise ValueError(
      f"the agent's state has {ag.max_users} user rows, the serving system {sysp.max_users}"
    )
  hybrid_env = env.HybridEnv(sysp, profile)
  lock = threading.Lock()  # the env is stateful; one window at a time

  def policy(scn):
    with lock:
      return agent_lib.drl_decide(ag, params, hybrid_env, scn)

  return policy


def make_scheduler(
  workdir: str,
  sysp: system.SystemParams,
  profile: system.Profile,
  num_gpus: float,
  users: int,
  policy_workdir: str = "",
  agent_name: str = "",
  fallback: str = "optimum",
) -> Scheduler:
  """The trained policy of ``policy_workdir`` (default: found next to the run), else ``fallback``."""
  found = chosen_policy_workdir(workdir, policy_workdir)
  if found is None:
    logging.warning("no trained admission policy given or found: deciding with %r", fallback)
    return Scheduler(sysp, profile, num_gpus, fallback_policy(fallback, sysp, profile), fallback)
  ag, params, name, max_users = load_agent(found, agent_name, num_gpus, users)
  if max_users != sysp.max_users:
    sysp = dataclasses.replace(sysp, max_users=max_users)
  policy = drl_policy(ag, params, sysp, profile)
  ag.greedy_action(params, np.zeros((max_users, 4), np.float32), np.zeros(6, np.float32))
  return Scheduler(sysp, profile, num_gpus, policy, f"drl_convex ({found}/agents/{name})")


def chosen_policy_workdir(workdir: str, policy_workdir: str) -> str | None:
  """The ``hybrid.optimize`` workdir ``--policy_workdir`` names: none for ``none``, the one given,
  else the one found next to the run (``find_policy_workdir``)."""
  if policy_workdir == "none":
    return None
  return policy_workdir or find_policy_workdir(workdir)


def resolve_profile(workdir: str, profile_path: str, policy_dir: str | None) -> str:
  """The profile the decisions and predictions use: ``--profile``; else the one the policy was
  trained on (its ``scheduler.profile``); else ``WORKDIR/profile.json``; else the paper's."""
  if profile_path:
    return profile_path
  if policy_dir is not None:
    cfg = os.path.join(policy_dir, "config.json")
    if not os.path.exists(cfg):
      raise FileNotFoundError(f"{policy_dir} is not a hybrid.optimize workdir (no config.json)")
    trained = _read_json(cfg)["scheduler"]["profile"]
    if trained == "paper" or os.path.exists(trained):
      return trained
  candidate = os.path.join(workdir, "profile.json")
  return candidate if os.path.exists(candidate) else "paper"
