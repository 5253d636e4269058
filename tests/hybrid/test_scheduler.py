"""hybrid.env and hybrid.baselines: the MDP's state and rewards, exact optima, heuristics."""

import dataclasses

import numpy as np
import pytest

from hybrid import baselines as bl
from hybrid import convex, env, system

P = system.Profile.paper()
S = system.SystemParams()


# ------------------------------------------------------------------------------------------------
# The environment.


def test_state_layout_and_rotation():
  scn = system.sample_scenario(np.random.default_rng(0), P, S, 5, 16.0)
  e = env.HybridEnv(S, P)
  s_l, s_g = e.reset(scn)
  assert s_l.shape == (20, 4) and s_g.shape == (6,)
  assert s_l.dtype == np.float32 and s_g.dtype == np.float32
  np.testing.assert_array_equal(s_l[:, 0], [1, 0, 0, 0, 0] + [0] * 15)
  np.testing.assert_allclose(s_l[:5, 1:], np.stack([0.01 * scn.alpha, scn.tau, scn.wait], 1), 1e-6)
  assert np.all(s_l[5:] == 0)
  np.testing.assert_allclose(s_g, [1.8, 0.5, 0, 0, 100 * scn.edge_k, 100 * scn.edge_h], rtol=1e-6)
  s_l1, s_g1, done = e.step(1)
  assert not done
  # The decided row goes to the bottom of the padded matrix, the next user becomes current.
  np.testing.assert_allclose(s_l1[-1, 1:], s_l[0, 1:])
  assert s_l1[-1, 0] == env.GRANTED
  np.testing.assert_allclose(s_l1[0, 1:], s_l[1, 1:])
  assert s_l1[0, 0] == env.CURRENT
  np.testing.assert_allclose(s_g1[:4], [1.7, 0.4, 0.1, 0.0], rtol=1e-6)
  s_l2, s_g2, _ = e.step(0)
  assert s_l2[-1, 0] == env.DENIED and s_l2[-2, 0] == env.GRANTED
  np.testing.assert_allclose(s_g2[:4], [1.7, 0.3, 0.1, 0.1], rtol=1e-6)
  for _ in range(3):
    *_, done = e.step(1)
  assert done
  np.testing.assert_array_equal(e.admitted(), [True, False, True, True, True])


POLICIES = {
  "grant": lambda rng: lambda s_l, s_g: 1,
  "deny": lambda rng: lambda s_l, s_g: 0,
  "random": lambda rng: lambda s_l, s_g: int(rng.integers(2)),
}


@pytest.mark.parametrize("capacity", [18, 3])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_episode_rewards_sum_to_a_tenth_of_the_utility(policy, capacity):
  sysp = dataclasses.replace(S, capacity=capacity)
  e = env.HybridEnv(sysp, P)
  rng = np.random.default_rng(1)
  early = 0
  for n, g in ((1, 4.0), (5, 16.0), (12, 8.0), (20, 4.0), (20, 16.0)):
    scn = system.sample_scenario(rng, P, sysp, n, g)
    batch = env.rollout(e, scn, POLICIES[policy](rng))
    admit = batch["admit"]
    steps = len(batch["action"])
    # U of the final admissions (users never visited are denied) with closed-form cut points.
    cut_points = convex.cut_points_for_admission(scn, sysp, P, admit)
    u = float(system.objective(scn, sysp, P, admit, cut_points))
    assert batch["utility"] == pytest.approx(u, rel=1e-12)
    assert batch["reward"].sum() == pytest.approx(0.1 * u, rel=1e-10, abs=1e-10)
    # Every step but the last carries exactly its own user's accuracy term.
    acc = 0.1 * scn.alpha * P.accuracy(np.where(admit, cut_points, 200))
    np.testing.assert_allclose(batch["reward"][:-1], acc[: steps - 1], rtol=1e-12)
    assert batch["done"][-1] and not batch["done"][:-1].any()
    if admit.sum() == capacity and steps < n:
      early += 1
      assert not admit[steps:].any()
  if policy == "grant" and capacity == 3:
    assert early >= 3  # the capacity ran out before the last user in these episodes


def test_environment_errors():
  e = env.HybridEnv(S, P)
  with pytest.raises(RuntimeError, match="reset"):
    e.step(1)
  scn = system.sample_scenario(np.random.default_rng(0), P, S, 2, 4.0)
  e.reset(scn)
  with pytest.raises(ValueError, match="action"):
    e.step(2)
  with pytest.raises(RuntimeError, match="not finished"):
    e.episode_rewards()
  e.step(0)
  e.step(0)
  with pytest.raises(RuntimeError, match="over"):
    e.step(0)
  small = env.HybridEnv(dataclasses.replace(S, max_users=1), P)
  with pytest.raises(ValueError, match="max_users"):
    small.reset(scn)


def test_scenario_streams():
  stream = env.ScenarioStream(S, P, "dynamic", (4.0, 16.0), (4, 8, 12))
  rng = np.random.default_rng(0)
  seen = {(s.num_gpus, s.num_users) for s in (stream(rng) for _ in range(200))}
  assert seen == {(g, n) for g in (4.0, 16.0) for n in (4, 8, 12)}
  static = env.ScenarioStream(S, P, "static", (8.0,), (6,))
  a, b = static(rng), static(rng)
  assert (a.num_gpus, a.num_users) == (8.0, 6) and not np.array_equal(a.alpha, b.alpha)
  fixed = env.ScenarioStream(S, P, "fixed", (8.0,), (6,), fixed_seed=3)
  np.testing.assert_array_equal(fixed(rng).alpha, fixed(rng).alpha)
  for kwargs, match in (
    (dict(setting="online"), "setting"),
    (dict(setting="static", num_gpus=(4.0, 8.0)), "one G and one N"),
    (dict(num_gpus=(0.0,)), "G must be > 0"),
    (dict(num_users=(0,)), "user counts"),
    (dict(num_users=(21,)), "user counts"),
    (dict(num_users=()), "non-empty"),
  ):
    args = dict(sysp=S, profile=P, setting="dynamic", num_gpus=(4.0,), num_users=(4,))
    with pytest.raises(ValueError, match=match):
      env.ScenarioStream(**{**args, **kwargs})


# ------------------------------------------------------------------------------------------------
# Exact optima and heuristics.


def _instances(num, max_n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    sysp = dataclasses.replace(
      S,
      transmission=("code", "physical")[i % 2],
      capacity=int(rng.choice([2, 4, 18])),
    )
    n = int(rng.integers(1, max_n + 1))
    g = float(rng.choice([2.0, 4.0, 16.0]))
    out.append((sysp, system.sample_scenario(rng, P, sysp, n, g)))
  return out


def test_enumeration_optimum_equals_ortools_optimum():
  for sysp, scn in _instances(10, 9, seed=0):
    enum = bl.optimum_enumeration(scn, sysp, P)
    cp = bl.optimum_ortools(scn, sysp, P, solver="cp_sat")
    assert cp.utility == pytest.approx(enum.utility, rel=1e-9, abs=1e-6)
    assert bl.optimum_by_batch(scn, sysp, P).utility == pytest.approx(enum.utility, abs=1e-9)
    assert enum.admit.sum() <= sysp.capacity
  for sysp, scn in _instances(3, 6, seed=1):
    scip = bl.optimum_ortools(scn, sysp, P, solver="scip")
    assert scip.utility == pytest.approx(bl.optimum_enumeration(scn, sysp, P).utility, abs=1e-6)


def test_by_batch_optimum_is_exact_at_twenty_users():
  rng = np.random.default_rng(5)
  for g in (4.0, 16.0):
    scn = system.sample_scenario(rng, P, S, 20, g)
    by_batch = bl.optimum_by_batch(scn, S, P)
    assert by_batch.utility == pytest.approx(bl.optimum_ortools(scn, S, P).utility, abs=1e-6)
    if g == 4.0:
      # A small edge and many users: selective admission beats admitting the first C users.
      assert by_batch.admit.sum() < 18
      assert by_batch.utility > bl.admit_all(scn, S, P).utility + 1.0


def test_heuristics_never_exceed_the_optimum():
  rng = np.random.default_rng(2)
  hits = 0
  for sysp, scn in _instances(12, 12, seed=3):
    opt = bl.optimum_enumeration(scn, sysp, P).utility
    tol = 1e-9 * max(1.0, abs(opt))
    decisions = {
      "ga": bl.genetic_algorithm(scn, sysp, P, rng, population=20, generations=15),
      "ga_elitist": bl.genetic_algorithm(scn, sysp, P, rng, 20, 15, elitism=True),
      "greedy": bl.greedy(scn, sysp, P),
      "greedy_delta": bl.greedy_delta(scn, sysp, P),
      "random": bl.random_admission(scn, sysp, P, rng),
      "all_local": bl.all_local(scn, sysp, P),
      "admit_all": bl.admit_all(scn, sysp, P),
    }
    for name, d in decisions.items():
      assert d.utility <= opt + tol, name
      assert d.admit.sum() <= sysp.capacity, name
      assert d.utility == pytest.approx(float(system.objective(scn, sysp, P, d.admit, d.cut_point)))
    hits += decisions["greedy"].utility >= opt - tol
    # Optimal cut points beat any fixed cut point for the same admissions.
    for fixed in (80.0, 140.0, 200.0):
      assert bl.admit_all(scn, sysp, P, fixed).utility <= decisions["admit_all"].utility + tol
  assert hits >= 6  # greedy is a real baseline, not a strawman


def test_baseline_errors_and_budgets():
  rng = np.random.default_rng(0)
  scn = system.sample_scenario(rng, P, S, 6, 4.0)
  with pytest.raises(ValueError, match="2\\^N"):
    bl.optimum_enumeration(scn, S, P, max_users=5)
  with pytest.raises(ValueError, match="solver"):
    bl.optimum_ortools(scn, S, P, solver="gurobi")
  with pytest.raises(ValueError, match="fixed cut point"):
    bl.admit_all(scn, S, P, fixed_cut_point=250.0)
  with pytest.raises(ValueError, match="even"):
    bl.genetic_algorithm(scn, S, P, rng, population=7)
  # A zero time budget evaluates the initial population only.
  d = bl.genetic_algorithm(scn, S, P, rng, population=10, time_budget_s=0.0)
  assert d.evaluations == 10
  assert bl.genetic_algorithm(scn, S, P, rng, population=10, generations=3).evaluations == 40
  # One user: crossover has no cut point and must not fail.
  one = system.sample_scenario(rng, P, S, 1, 4.0)
  assert bl.genetic_algorithm(one, S, P, rng, population=4, generations=2).admit.shape == (1,)
  local, gain, cut_points = bl.gains_table(scn, S, P)
  assert gain.shape == (7, 6) and np.all(gain[0] == 0) and np.all(cut_points[0] == 200)
  assert local == pytest.approx(system.user_utility(scn, S, P, np.zeros(6, bool), 200.0))
