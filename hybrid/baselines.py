"""Admission policies to compare the DRL agent with; every one uses the closed-form cut points.

Exact optima (spec §5, §11 C):

* ``optimum_enumeration``: all admissions with at most C users (2^N of them), each scored with
  ``system.objective``; the spec's replacement of the code's branch and bound for N <= ~20.
* ``optimum_ortools``: an exact integer program solved by OR-Tools (CP-SAT, or SCIP through
  ``pywraplp``). The users interact only through the batch size B (every pairwise term of the
  GQAP, ``k_e x_i x_j`` and the shared link, is a function of ``B = sum_j x_j``), so the program
  picks one B with a one-hot ``z_B`` and linearizes ``y_iB = x_i z_B``:
  ``max sum_iB w_i(B) y_iB`` s.t. ``sum_B z_B = 1``, ``sum_i x_i = sum_B B z_B``,
  ``y_iB <= x_i``, ``y_iB <= z_B``, ``y_iB >= x_i + z_B - 1``, where ``w_i(B)`` is user i's gain
  from admission into a batch of B with its optimal cut point. This is the GQAP of the paper with
  the continuous cut point folded into the costs, exactly.
* ``optimum_by_batch``: the same observation as an algorithm: for every B the best admission is
  the B users with the largest ``w_i(B)``, so the optimum is the best of C sorted prefixes,
  O(C N log N). Exact for any N (cross-checked against the other two in the tests).

Heuristics: ``genetic_algorithm`` (the code's: population 100, 200 generations,
fitness-proportional selection, single-point crossover, swap mutation p = 0.1; optionally under a
wall-time budget), ``greedy`` (add the user with the largest marginal gain while U improves),
``greedy_delta`` (admit in order of Delta_i(1), the best prefix), ``random_admission``,
``all_local``, ``admit_all`` (optimal or fixed cut points).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from hybrid import convex, system


@dataclasses.dataclass
class Decision:
  """An admission with its cut points and objective.

  Attributes:
    admit: [N] bool.
    cut_point: [N] float64 cut points (T for denied users).
    utility: U.
    evaluations: objective evaluations spent (heuristics; 0 when not meaningful).
  """

  admit: np.ndarray
  cut_point: np.ndarray
  utility: float
  evaluations: int = 0


def decide(
  scn: system.Scenario, sysp: system.SystemParams, profile: system.Profile, admit
) -> Decision:
  """The decision of admitting ``admit`` ([N] bool) with closed-form cut points."""
  admit = np.asarray(admit, dtype=bool)
  utility, cut_points = convex.evaluate_admission(scn, sysp, profile, admit)
  return Decision(admit, cut_points, float(utility), 1)


def max_batch(scn: system.Scenario, sysp: system.SystemParams) -> int:
  return min(sysp.capacity, scn.num_users)


def gains_table(
  scn: system.Scenario, sysp: system.SystemParams, profile: system.Profile
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-user utilities when local and gains from admission into each batch size.

  Returns:
    local: [N] utility of each user when denied.
    gain: [Bmax + 1, N] ``w_i(B)``: admitted utility in a batch of B (optimal cut point) minus
      local; row 0 is 0. Bmax = min(C, N).
    cut_points: [Bmax + 1, N] the optimal cut point of user i in a batch of B (row 0: T).
  """
  bmax = max_batch(scn, sysp)
  t = sysp.num_steps
  local = scn.alpha * profile.accuracy(t) - system.local_latency(scn, sysp)
  batch = np.arange(1, bmax + 1, dtype=np.float64)[:, None]
  n = convex.optimal_cut_point(scn.alpha, scn.delta(batch), profile.accuracy, sysp.min_cut_point, t)
  admitted = scn.alpha * profile.accuracy(n) - system.admitted_latency(scn, sysp, batch, n)
  gain = np.concatenate([np.zeros((1, scn.num_users)), admitted - local], axis=0)
  cut_points = np.concatenate([np.full((1, scn.num_users), float(t)), n], axis=0)
  return local, gain, cut_points


# ------------------------------------------------------------------------------------------------
# Exact optima.


def optimum_enumeration(
  scn: system.Scenario,
  sysp: system.SystemParams,
  profile: system.Profile,
  max_users: int = 20,
  chunk: int = 1 << 15,
) -> Decision:
  """Exact optimum by scoring every admission with at most C users (2^N of them).

  Each admission is scored independently with its closed-form cut points and ``system.objective``
  (not through ``gains_table``), so it cross-checks the other two exact solvers.
  """
  n = scn.num_users
  if n > max_users:
    raise ValueError(f"optimum_enumeration: N={n} > max_users={max_users} (2^N admissions)")
  bits = np.arange(n)
  best_u, best_code = -np.inf, 0
  for start in range(0, 1 << n, chunk):
    codes = np.arange(start, min(start + chunk, 1 << n))
    admit = ((codes[:, None] >> bits) & 1).astype(bool)
    feasible = admit.sum(-1) <= sysp.capacity
    admit, codes = admit[feasible], codes[feasible]
    if not len(codes):
      continue
    utility, _ = convex.evaluate_admission(scn, sysp, profile, admit)
    i = int(np.argmax(utility))
    if utility[i] > best_u:
      best_u, best_code = float(utility[i]), int(codes[i])
  admit = ((best_code >> bits) & 1).astype(bool)
  d = decide(scn, sysp, profile, admit)
  d.evaluations = 1 << n
  return d


def optimum_by_batch(
  scn: system.Scenario, sysp: system.SystemParams, profile: system.Profile
) -> Decision:
  """Exact optimum in O(C N log N): for each B the B users with the largest gain w_i(B)."""
  local, gain, _ = gains_table(scn, sysp, profile)
  order = np.argsort(-gain, axis=1, kind="stable")
  sorted_gain = np.take_along_axis(gain, order, axis=1)
  bmax = gain.shape[0] - 1
  prefix = np.array([sorted_gain[b, :b].sum() for b in range(bmax + 1)])
  b = int(np.argmax(prefix))
  admit = np.zeros(scn.num_users, bool)
  admit[order[b, :b]] = True
  return decide(scn, sysp, profile, admit)


def optimum_ortools(
  scn: system.Scenario,
  sysp: system.SystemParams,
  profile: system.Profile,
  solver: str = "cp_sat",
  scale: float = 1e6,
  time_limit_s: float = 60.0,
  num_workers: int = 1,
) -> Decision:
  """Exact optimum of the linearized program of the module docstring, solved by OR-Tools.

  Args:
    solver: ``cp_sat`` (integer coefficients: gains times ``scale``, rounded) or ``scip``
      (floating-point MIP through ``pywraplp``).
    scale: CP-SAT only; 1e6 resolves utilities to a microsecond-equivalent.
    time_limit_s: the solver's limit; not reaching optimality within it raises.

  Returns:
    The admission, re-scored exactly in float64.
  """
  _, gain, _ = gains_table(scn, sysp, profile)
  n, bmax = scn.num_users, gain.shape[0] - 1
  if solver == "cp_sat":
    admit = _solve_cp_sat(gain, n, bmax, scale, time_limit_s, num_workers)
  elif solver == "scip":
    admit = _solve_scip(gain, n, bmax, time_limit_s)
  else:
    raise ValueError(f"optimum_ortools: solver must be 'cp_sat' or 'scip', got {solver!r}")
  return decide(scn, sysp, profile, admit)


def _solve_cp_sat(gain, n, bmax, scale, time_limit_s, num_workers) -> np.ndarray:
  from ortools.sat.python import cp_model

  m = cp_model.CpModel()
  x = [m.NewBoolVar(f"x{i}") for i in range(n)]
  z = [m.NewBoolVar(f"z{b}") for b in range(bmax + 1)]
  m.AddExactlyOne(z)
  m.Add(sum(x) == sum(b * z[b] for b in range(bmax + 1)))
  terms = []
  for b in range(1, bmax + 1):
    for i in range(n):
      y = m.NewBoolVar(f"y{i}_{b}")
      m.Add(y <= x[i])
      m.Add(y <= z[b])
      m.Add(y >= x[i] + z[b] - 1)
      terms.append(int(round(gain[b, i] * scale)) * y)
  m.Maximize(sum(terms))
  solver = cp_model.CpSolver()
  solver.parameters.max_time_in_seconds = float(time_limit_s)
  solver.parameters.num_workers = int(num_workers)
  status = solver.Solve(m)
  if status != cp_model.OPTIMAL:
    raise RuntimeError(f"CP-SAT did not prove optimality: {solver.StatusName(status)}")
  return np.array([bool(solver.Value(v)) for v in x])


def _solve_scip(gain, n, bmax, time_limit_s) -> np.ndarray:
  from ortools.linear_solver import pywraplp

  s = pywraplp.Solver.CreateSolver("SCIP")
  if s is None:
    raise RuntimeError("OR-Tools was built without SCIP")
  s.SetTimeLimit(int(time_limit_s * 1000))
  x = [s.BoolVar(f"x{i}") for i in range(n)]
  z = [s.BoolVar(f"z{b}") for b in range(bmax + 1)]
  s.Add(sum(z) == 1)
  s.Add(sum(x) == sum(b * z[b] for b in range(bmax + 1)))
  objective = s.Objective()
  for b in range(1, bmax + 1):
    for i in range(n):
      y = s.BoolVar(f"y{i}_{b}")
      s.Add(y <= x[i])
      s.Add(y <= z[b])
      s.Add(y >= x[i] + z[b] - 1)
      objective.SetCoefficient(y, float(gain[b, i]))
  objective.SetMaximization()
  status = s.Solve()
  if status != pywraplp.Solver.OPTIMAL:
    raise RuntimeError(f"SCIP did not prove optimality (status {status})")
  return np.array([v.solution_value() > 0.5 for v in x])


# ------------------------------------------------------------------------------------------------
# Heuristics.


def _repair(pop: np.ndarray, capacity: int, rng: np.random.Generator) -> np.ndarray:
  """Denies random admitted users of individuals over capacity (keeps C of them at random)."""
  over = np.nonzero(pop.sum(-1) > capacity)[0]
  for k in over:
    on = np.nonzero(pop[k])[0]
    pop[k, rng.choice(on, size=len(on) - capacity, replace=False)] = False
  return pop


def genetic_algorithm(
  scn: system.Scenario,
  sysp: system.SystemParams,
  profile: system.Profile,
  rng: np.random.Generator,
  population: int = 100,
  generations: int = 200,
  mutation_prob: float = 0.1,
  time_budget_s: float | None = None,
  elitism: bool = False,
) -> Decision:
  """The official code's GA over admission vectors (cut points in closed form for every individual).

  Fitness-proportional selection needs non-negative weights and our utilities are mostly
  negative, so the weights are ``U - min U`` of the generation (the code's fitness function is
  not released). Individuals over capacity are repaired. Like the code, it returns the best of
  the final population (``elitism`` also carries the best individual over, which the code does
  not). With ``time_budget_s`` it stops after the generation that used up the budget.

  Returns:
    The best decision found; ``evaluations`` counts objective evaluations (20,100 by default).
  """
  if population < 2 or population % 2:
    raise ValueError(f"genetic_algorithm: population must be even and >= 2, got {population}")
  start = time.perf_counter()
  n = scn.num_users
  pop = _repair(rng.integers(0, 2, size=(population, n)).astype(bool), sysp.capacity, rng)
  fitness, _ = convex.evaluate_admission(scn, sysp, profile, pop)
  evaluations = population
  cols = np.arange(n)
  for _ in range(generations):
    if time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
      break
    weights = fitness - fitness.min()
    total = weights.sum()
    p = weights / total if total > 0 else None
    parents = rng.choice(population, size=(population // 2, 2), p=p)
    a, b = pop[parents[:, 0]], pop[parents[:, 1]]
    if n > 1:
      cut = rng.integers(1, n, size=(population // 2, 1))
      left = cols[None, :] < cut
      children = np.concatenate([np.where(left, a, b), np.where(left, b, a)])
      mutate = np.nonzero(rng.random(population) < mutation_prob)[0]
      for k in mutate:
        i, j = rng.choice(n, size=2, replace=False)
        children[k, [i, j]] = children[k, [j, i]]
    else:
      children = np.concatenate([a, b])
    children = _repair(children, sysp.capacity, rng)
    if elitism:
      children[0] = pop[int(np.argmax(fitness))]
    pop = children
    fitness, _ = convex.evaluate_admission(scn, sysp, profile, pop)
    evaluations += population
  d = decide(scn, sysp, profile, pop[int(np.argmax(fitness))])
  d.evaluations = evaluations
  return d


def greedy(scn: system.Scenario, sysp: system.SystemParams, profile: system.Profile) -> Decision:
  """Adds, one at a time, the user whose admission raises U most; stops when none does."""
  n = scn.num_users
  admit = np.zeros(n, bool)
  best, _ = convex.evaluate_admission(scn, sysp, profile, admit)
  evaluations = 1
  while admit.sum() < sysp.capacity:
    free = np.nonzero(~admit)[0]
    if not len(free):
      break
    cands = np.repeat(admit[None], len(free), axis=0)
    cands[np.arange(len(free)), free] = True
    utility, _ = convex.evaluate_admission(scn, sysp, profile, cands)
    evaluations += len(free)
    k = int(np.argmax(utility))
    if utility[k] <= best:
      break
    best, admit = utility[k], cands[k]
  d = decide(scn, sysp, profile, admit)
  d.evaluations = evaluations
  return d


def greedy_delta(
  scn: system.Scenario, sysp: system.SystemParams, profile: system.Profile
) -> Decision:
  """Admits users in decreasing order of Delta_i(1) (what offloading saves per step); best prefix."""
  order = np.argsort(-scn.delta(1), kind="stable")
  bmax = max_batch(scn, sysp)
  cands = np.zeros((bmax + 1, scn.num_users), bool)
  for b in range(1, bmax + 1):
    cands[b, order[:b]] = True
  utility, _ = convex.evaluate_admission(scn, sysp, profile, cands)
  d = decide(scn, sysp, profile, cands[int(np.argmax(utility))])
  d.evaluations = bmax + 1
  return d


def all_local(scn: system.Scenario, sysp: system.SystemParams, profile: system.Profile) -> Decision:
  """Every user runs all T steps on its device."""
  return decide(scn, sysp, profile, np.zeros(scn.num_users, bool))


def admit_all(
  scn: system.Scenario,
  sysp: system.SystemParams,
  profile: system.Profile,
  fixed_cut_point: float | None = None,
) -> Decision:
  """Admits the first min(N, C) users in visiting order (an always-grant policy).

  Args:
    fixed_cut_point: None for the closed-form optimal cut points, else every admitted user's n.
  """
  admit = np.zeros(scn.num_users, bool)
  admit[: max_batch(scn, sysp)] = True
  if fixed_cut_point is None:
    return decide(scn, sysp, profile, admit)
  if not 0 <= fixed_cut_point <= sysp.num_steps:
    raise ValueError(f"admit_all: fixed cut point must lie in [0, T={sysp.num_steps}]")
  cut_points = np.where(admit, float(fixed_cut_point), float(sysp.num_steps))
  utility = float(system.objective(scn, sysp, profile, admit, cut_points))
  return Decision(admit, cut_points, utility, 1)


def random_admission(
  scn: system.Scenario,
  sysp: system.SystemParams,
  profile: system.Profile,
  rng: np.random.Generator,
  p: float = 0.5,
) -> Decision:
  """Grants each user with probability p in visiting order until the capacity is used up."""
  admit = rng.random(scn.num_users) < p
  over = np.cumsum(admit) > sysp.capacity
  return decide(scn, sysp, profile, admit & ~over)
