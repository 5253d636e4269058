"""hybrid.convex: the closed-form cut point against numerical maximizers and the code's solver."""

import numpy as np
import pytest
from scipy import optimize

from hybrid import convex, system

P = system.Profile.paper()
S = system.SystemParams()


def _cases(num, seed=0):
  """(alpha, delta) pairs as the simulator produces them: every G, N and batch size."""
  rng = np.random.default_rng(seed)
  alphas, deltas = [], []
  while len(alphas) < num:
    g = rng.choice([2.0, 4.0, 8.0, 16.0])
    scn = system.sample_scenario(rng, P, S, 10, g)
    b = rng.integers(1, 19)
    alphas += scn.alpha.tolist()
    deltas += scn.delta(b).tolist()
  return np.array(alphas[:num]), np.array(deltas[:num])


def _grid_argmax(alpha, delta, accuracy, lo, hi, num=120_001):
  n = np.linspace(lo, hi, num)
  f = convex.cut_point_gain(n[None, :], alpha[:, None], delta[:, None], accuracy)
  return n[np.argmax(f, axis=1)], f.max(axis=1)


def test_closed_form_equals_numerical_maximizer():
  alpha, delta = _cases(300)
  n_star = convex.optimal_cut_point(alpha, delta, P.accuracy, 80, 200)
  f_star = convex.cut_point_gain(n_star, alpha, delta, P.accuracy)
  n_grid, f_grid = _grid_argmax(alpha, delta, P.accuracy, 80, 200)
  # Never below the best grid point, and at the same place (grid step 0.001).
  assert np.all(f_star >= f_grid - 1e-9)
  np.testing.assert_allclose(n_star, n_grid, atol=2e-3)
  # A bounded scalar optimizer agrees too (interior optima to its tolerance).
  for i in range(0, 300, 7):
    res = optimize.minimize_scalar(
      lambda n, i=i: -convex.cut_point_gain(n, alpha[i], delta[i], P.accuracy),
      bounds=(80, 200),
      method="bounded",
      options={"xatol": 1e-8},
    )
    assert -res.fun <= f_star[i] + 1e-9
    assert abs(res.x - n_star[i]) < 1e-3
  # The cases cover all three branches.
  assert np.any(n_star == 80) and np.any(n_star == 200) and np.any((n_star > 80) & (n_star < 200))


def _code_solver(alpha, delta, a=0.0413):
  """The official ``solving_split_point``: threshold, else the bracketed root of f'."""
  if alpha <= 4 * delta / a:
    return 80.0
  fprime = lambda n: alpha * P.accuracy.slope(n) - delta
  lo, hi = fprime(80.0), fprime(200.0)
  if lo * hi < 0:
    return optimize.root_scalar(fprime, bracket=[80, 200], xtol=1e-12).root
  return 80.0 if lo + hi < 0 else 200.0


def test_closed_form_equals_the_official_root_finder():
  alpha, delta = _cases(200, seed=1)
  n_star = convex.optimal_cut_point(alpha, delta, P.accuracy, 80, 200)
  ref = np.array([_code_solver(a, d) for a, d in zip(alpha, delta, strict=True)])
  np.testing.assert_allclose(n_star, ref, atol=1e-6)


def test_branches_and_monotonicity():
  acc = P.accuracy
  assert (
    convex.optimal_cut_point(10.0, -0.01, acc, 80, 200) == 200
  )  # local steps cheaper: all local
  assert convex.optimal_cut_point(10.0, 0.0, acc, 80, 200) == 200
  assert convex.optimal_cut_point(0.0, 0.05, acc, 80, 200) == 80  # no taste for accuracy
  c_quarter = 0.05 / (0.25 * acc.a)  # alpha with c = 1/4 exactly: f' <= 0 everywhere
  assert convex.optimal_cut_point(c_quarter, 0.05, acc, 80, 200) == 80
  assert 80 < convex.optimal_cut_point(3 * c_quarter, 0.05, acc, 80, 200) < 200
  assert convex.optimal_cut_point(1e6, 1e-9, acc, 80, 200) == 200  # tiny c: n+ beyond T, clipped
  # More preference, or a more crowded edge (smaller Delta), pushes n* up.
  alphas = np.linspace(1, 80, 200)
  assert np.all(np.diff(convex.optimal_cut_point(alphas, 0.1, acc, 80, 200)) >= 0)
  deltas = np.linspace(0.3, 0.001, 200)
  assert np.all(np.diff(convex.optimal_cut_point(40.0, deltas, acc, 80, 200)) >= 0)


@pytest.mark.parametrize("b", [120.0, 160.0])
def test_non_concave_measured_sigmoid(b):
  # A measured sigmoid with b > n_min: f is not concave on the interval; the closed form must
  # still return the global maximizer (n_min or the larger stationary point).
  acc = system.AccuracyProfile.fitted(0.05, b, 200)
  rng = np.random.default_rng(4)
  alpha = rng.uniform(0, 60, 400)
  delta = rng.uniform(-0.05, 0.4, 400)
  n_star = convex.optimal_cut_point(alpha, delta, acc, 80, 200)
  n_grid, f_grid = _grid_argmax(alpha, delta, acc, 80, 200)
  f_star = convex.cut_point_gain(n_star, alpha, delta, acc)
  assert np.all(f_star >= f_grid - 1e-9)
  # Somewhere the lower end beats the larger stationary point: the comparison is needed there.
  c = np.where(alpha > 0, delta / np.maximum(alpha * acc.a, 1e-12), np.inf)
  inner = (delta > 0) & (c < 0.25)
  s = np.sqrt(1 - 4 * np.where(inner, c, 0.1))
  n_plus = np.clip(acc.b + (2 * np.log1p(s) - np.log(4 * np.where(inner, c, 0.1))) / acc.a, 80, 200)
  stationary_worse = (
    convex.cut_point_gain(n_plus, alpha, delta, acc)
    < convex.cut_point_gain(80.0, alpha, delta, acc) - 1e-6
  )
  assert np.any(inner & stationary_worse & (n_star == 80))
  assert np.any(inner & (n_star > 80))


def test_cut_points_for_admission_and_errors():
  scn = system.sample_scenario(np.random.default_rng(0), P, S, 6, 4.0)
  admit = np.array([[True, False, True, True, False, False], [False] * 6])
  n = convex.cut_points_for_admission(scn, S, P, admit)
  assert n.shape == (2, 6)
  assert np.all(n[~admit] == 200)
  np.testing.assert_allclose(
    n[0, admit[0]],
    convex.optimal_cut_point(scn.alpha[admit[0]], scn.delta(3)[admit[0]], P.accuracy, 80, 200),
  )
  with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
    convex.optimal_cut_point(-1.0, 0.1, P.accuracy, 80, 200)
  with pytest.raises(ValueError, match="n_min"):
    convex.optimal_cut_point(1.0, 0.1, P.accuracy, 250, 200)
  with pytest.raises(ValueError, match=r"N=6"):
    convex.cut_points_for_admission(scn, S, P, np.ones(5, bool))
