"""The admission MDP (spec §7): users visited one at a time, grant or deny, cut points after the
episode.

State ``(s_l, s_g)``:

* ``s_l``: [max_users, 4] rows ``[status, 0.01 alpha_i, tau_i, K - r_i]``, zero-padded to
  ``max_users``; status 0 undecided/padding, 1 current, 2 granted, 3 denied. After a decision the
  decided row is rotated to the bottom of the whole padded matrix and row 0 becomes current (the
  official code's ``np.vstack((s_l[1:], s_l[0]))``).
* ``s_g``: [6] ``[0.1 capacity left, 0.1 undecided, 0.1 granted, 0.1 denied, 100 k_e, 100 h_e]``.

The episode ends when the capacity is used up (every user not yet visited is denied) or every user
has been decided. Then the admitted users' cut_points are solved in closed form with the final B and
rewards are assigned (gamma = 1): step t gets ``0.1 alpha_t A(n_t)`` for the user it decided, the
last step also the accuracy terms of the users never visited and ``-0.1 sum_i L_i``, so an
episode's rewards sum to ``0.1 U``. (The released code folds with the padded length, which drops
the never-visited users' terms and the latency penalty when capacity runs out before the last
user; the spec calls that a bug and we implement the intended fold.)

Settings of the scenario stream (the official directory names ``SCOM_SUN_SUC`` / ``DCOM_DUN_DUC``
suggest static vs dynamic edge compute, user number and user capability; inferred, spec §7):
``static`` one G and one N, users redrawn every episode; ``dynamic`` G and N drawn per episode
from lists, users redrawn; ``fixed`` the same seeded scenario every episode (what the released
``per_DQN_main.py`` does by re-seeding NumPy each episode).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hybrid import convex, system

UNDECIDED, CURRENT, GRANTED, DENIED = 0, 1, 2, 3
NUM_STATUS = 4
LOCAL_FEATURES = 4
GLOBAL_FEATURES = 6
REWARD_SCALE = 0.1
SETTINGS = ("static", "dynamic", "fixed")


@dataclasses.dataclass(frozen=True)
class ScenarioStream:
  """Draws training or evaluation scenarios (see the module docstring for the settings)."""

  sysp: system.SystemParams
  profile: system.Profile
  setting: str
  num_gpus: tuple[float, ...]
  num_users: tuple[int, ...]
  fixed_seed: int = 0

  def __post_init__(self):
    if self.setting not in SETTINGS:
      raise ValueError(f"ScenarioStream: setting must be one of {SETTINGS}, got {self.setting!r}")
    if not self.num_gpus or not self.num_users:
      raise ValueError("ScenarioStream: num_gpus and num_users must be non-empty")
    if self.setting in ("static", "fixed") and (len(self.num_gpus) > 1 or len(self.num_users) > 1):
      raise ValueError(f"ScenarioStream: a {self.setting} stream takes one G and one N")
    for g in self.num_gpus:
      if not g > 0:
        raise ValueError(f"ScenarioStream: edge sizes G must be > 0, got {g}")
    for n in self.num_users:
      if int(n) != n or not 1 <= n <= self.sysp.max_users:
        raise ValueError(
          f"ScenarioStream: user counts N must be integers in [1, {self.sysp.max_users}], got {n}"
        )
    if self.setting == "fixed":
      rng = np.random.default_rng(self.fixed_seed)
      scn = system.sample_scenario(
        rng, self.profile, self.sysp, self.num_users[0], self.num_gpus[0]
      )
      object.__setattr__(self, "_fixed", scn)

  def __call__(self, rng: np.random.Generator) -> system.Scenario:
    if self.setting == "fixed":
      return self._fixed
    g = self.num_gpus[rng.integers(len(self.num_gpus))] if len(self.num_gpus) > 1 else None
    n = self.num_users[rng.integers(len(self.num_users))] if len(self.num_users) > 1 else None
    g = self.num_gpus[0] if g is None else g
    n = self.num_users[0] if n is None else n
    return system.sample_scenario(rng, self.profile, self.sysp, int(n), float(g))


class HybridEnv:
  """The user-by-user admission environment over one scenario at a time (NumPy)."""

  def __init__(self, sysp: system.SystemParams, profile: system.Profile):
    self.sysp = sysp
    self.profile = profile
    self.scn: system.Scenario | None = None

  # --- transitions ------------------------------------------------------------------------------
  def reset(self, scn: system.Scenario) -> tuple[np.ndarray, np.ndarray]:
    """Starts an episode on ``scn``; returns (s_l [max_users, 4], s_g [6]) float32."""
    n = scn.num_users
    if n > self.sysp.max_users:
      raise ValueError(f"HybridEnv: N={n} users exceed max_users={self.sysp.max_users}")
    self.scn = scn
    self.actions: list[int] = []
    self.capacity_left = self.sysp.capacity
    self.granted = 0
    self.denied = 0
    self.done = False
    s_l = np.zeros((self.sysp.max_users, LOCAL_FEATURES), np.float64)
    s_l[:n, 1] = 0.01 * scn.alpha
    s_l[:n, 2] = scn.tau
    s_l[:n, 3] = scn.wait
    s_l[0, 0] = CURRENT
    self.s_l = s_l
    return self.observation()

  def observation(self) -> tuple[np.ndarray, np.ndarray]:
    scn = self.scn
    s_g = np.array(
      [
        0.1 * self.capacity_left,
        0.1 * (scn.num_users - len(self.actions)),
        0.1 * self.granted,
        0.1 * self.denied,
        100.0 * scn.edge_k,
        100.0 * scn.edge_h,
      ]
    )
    return self.s_l.astype(np.float32), s_g.astype(np.float32)

  def step(self, action: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Decides the current user (0 deny, 1 grant); returns (s_l', s_g', done)."""
    if self.scn is None or self.done:
      raise RuntimeError("HybridEnv.step: call reset() first; the episode is over")
    if action not in (0, 1):
      raise ValueError(f"HybridEnv.step: action must be 0 (deny) or 1 (grant), got {action!r}")
    action = int(action)
    self.actions.append(action)
    if action == 1:
      self.capacity_left -= 1
      self.granted += 1
      self.s_l[0, 0] = GRANTED
    else:
      self.denied += 1
      self.s_l[0, 0] = DENIED
    self.s_l = np.concatenate([self.s_l[1:], self.s_l[:1]], axis=0)
    self.s_l[0, 0] = CURRENT
    self.done = self.capacity_left == 0 or len(self.actions) == self.scn.num_users
    s_l, s_g = self.observation()
    return s_l, s_g, self.done

  # --- outcome and rewards ----------------------------------------------------------------------
  def admitted(self) -> np.ndarray:
    """[N] bool admissions so far (users never visited are denied)."""
    x = np.zeros(self.scn.num_users, bool)
    x[: len(self.actions)] = np.asarray(self.actions, bool)
    return x

  def outcome(self) -> tuple[float, np.ndarray, np.ndarray]:
    """(U, admit [N], cut_points [N]) of the finished episode (closed-form cut points at the final
    B)."""
    if not self.done:
      raise RuntimeError("HybridEnv.outcome: the episode is not finished")
    admit = self.admitted()
    utility, cut_points = convex.evaluate_admission(self.scn, self.sysp, self.profile, admit)
    return float(utility), admit, cut_points

  def episode_rewards(self) -> np.ndarray:
    """[steps] float64 rewards of the finished episode; they sum to 0.1 U."""
    if not self.done:
      raise RuntimeError("HybridEnv.episode_rewards: the episode is not finished")
    admit = self.admitted()
    cut_points = convex.cut_points_for_admission(self.scn, self.sysp, self.profile, admit)
    n = np.where(admit, cut_points, self.sysp.num_steps)
    per_user = REWARD_SCALE * self.scn.alpha * self.profile.accuracy(n)
    latency = system.user_latency(self.scn, self.sysp, admit, cut_points)
    steps = len(self.actions)
    rewards = per_user[:steps].copy()
    rewards[-1] += per_user[steps:].sum() - REWARD_SCALE * latency.sum()
    return rewards


def rollout(env: HybridEnv, scn: system.Scenario, policy) -> dict[str, np.ndarray]:
  """Runs one episode with ``policy(s_l, s_g) -> action``.

  Returns:
    dict with s_l [L, max_users, 4], s_g [L, 6], action [L], reward [L], next_s_l, next_s_g,
    done [L] (only the last True), and ``utility`` (U, a float) / ``admit`` [N].
  """
  s_l, s_g = env.reset(scn)
  out = {k: [] for k in ("s_l", "s_g", "action", "next_s_l", "next_s_g", "done")}
  done = False
  while not done:
    action = int(policy(s_l, s_g))
    out["s_l"].append(s_l)
    out["s_g"].append(s_g)
    s_l, s_g, done = env.step(action)
    out["action"].append(action)
    out["next_s_l"].append(s_l)
    out["next_s_g"].append(s_g)
    out["done"].append(done)
  batch = {k: np.asarray(v) for k, v in out.items()}
  batch["reward"] = env.episode_rewards()
  utility, admit, _ = env.outcome()
  batch["utility"] = utility
  batch["admit"] = admit
  return batch
