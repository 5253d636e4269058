"""hybrid.system: the spec's accuracy and latency figures, the utility, profiles, scenarios, errors."""

import json

import numpy as np
import pytest

from hybrid import system

P = system.Profile.paper()
S = system.SystemParams()


def _scenario(alpha, tau, wait, num_gpus=16.0):
  k, h = P.latency.edge(num_gpus)
  n = len(alpha)
  return system.Scenario(
    alpha=np.asarray(alpha, float),
    tau=np.asarray(tau, float),
    wait=np.asarray(wait, float),
    device_type=np.zeros(n, int),
    num_gpus=num_gpus,
    edge_k=k,
    edge_h=h,
  )


def test_accuracy_sigmoid_matches_spec_values():
  # Spec §3: A(0)=0.05, A(40)=0.21, A(80)=0.59, A(120)=0.88, A(160)=0.975, A(200)=0.995.
  a = P.accuracy(np.array([0, 40, 80, 120, 160, 200]))
  np.testing.assert_allclose(a, [0.05, 0.21, 0.59, 0.88, 0.975, 0.995], atol=0.005)
  # b < n_min is what makes the cut-point problem concave on [80, 200].
  assert P.accuracy.b < S.min_cut_point
  n = np.linspace(0, 200, 11)
  np.testing.assert_allclose(
    P.accuracy.slope(n), (P.accuracy(n + 1e-6) - P.accuracy(n - 1e-6)) / 2e-6, rtol=1e-5
  )


def test_latency_figures_match_spec():
  # Spec §4: G=16 edge 3.1 ms @B=1 and 41.9 ms @B=18; G=4 12.6 / 167.5 ms.
  for g, b1, b18 in ((16, 3.1, 41.9), (4, 12.6, 167.5)):
    k, h = P.latency.edge(g)
    assert round((k + h) * 1e3, 1) == b1
    assert round((18 * k + h) * 1e3, 1) == b18
  tau = P.latency.device_tau * 1e3
  assert round(tau.min(), 1) == 119.5 and round(tau.max(), 1) == 305.8
  probs = P.latency.device_probs
  np.testing.assert_allclose(probs, np.linspace(1, 2, 8) / np.linspace(1, 2, 8).sum())
  # Transmission: physical B (S_p + S_z) / (W eta) = 0.0044 B s, the code's * eta = 0.44 B s.
  np.testing.assert_allclose(S.transmission_latency(3), 3 * 0.4400216, rtol=1e-9)
  phys = system.SystemParams(transmission="physical")
  np.testing.assert_allclose(phys.transmission_latency(3), 3 * 0.004400216, rtol=1e-9)


@pytest.mark.parametrize("transmission", ["code", "physical"])
def test_utility_by_hand(transmission):
  sysp = system.SystemParams(transmission=transmission)
  scn = _scenario([30.0, 5.0, 60.0], [0.2, 0.12, 0.3], [0.5, 0.3, 0.1], num_gpus=8)
  admit = np.array([True, False, True])
  cut_point = np.array([100.0, 17.0, 150.0])  # user 1's cut_point is ignored: denied
  k, h = P.latency.edge(8)
  tau_e = 2 * k + h
  tx = 2 * (216 + 4.4e6) / 100e6 * (10 if transmission == "code" else 0.1)
  expect_l = [
    100 * tau_e + tx + 100 * 0.2 + 0.5,
    200 * 0.12 + 0.3,
    50 * tau_e + tx + 150 * 0.3 + 0.1,
  ]
  np.testing.assert_allclose(system.user_latency(scn, sysp, admit, cut_point), expect_l, rtol=1e-12)
  acc = P.accuracy(np.array([100.0, 200.0, 150.0]))
  expect_u = np.array([30.0, 5.0, 60.0]) * acc - np.array(expect_l)
  np.testing.assert_allclose(
    system.user_utility(scn, sysp, P, admit, cut_point), expect_u, rtol=1e-12
  )
  np.testing.assert_allclose(system.objective(scn, sysp, P, admit, cut_point), expect_u.sum())
  # Batched over a leading axis: each row has its own B.
  rows = np.array([[True, False, True], [False, False, False], [True, True, True]])
  u = system.objective(scn, sysp, P, rows, np.full((3, 3), 120.0))
  for r in range(3):
    assert u[r] == pytest.approx(float(system.objective(scn, sysp, P, rows[r], 120.0)))


def test_bad_decisions_are_refused():
  scn = _scenario([10.0, 20.0], [0.2, 0.3], [0.1, 0.2])
  with pytest.raises(ValueError, match=r"\[0, T=200\]"):
    system.user_latency(scn, S, [True, False], [201.0, 0.0])
  with pytest.raises(ValueError, match=r"\[0, T=200\]"):
    system.objective(scn, S, P, [True, True], [-1.0, 100.0])
  with pytest.raises(ValueError, match="N=2"):
    system.objective(scn, S, P, [True, True, False], 100.0)
  with pytest.raises(ValueError, match="boolean or 0/1"):
    system.objective(scn, S, P, [2, 0], 100.0)
  with pytest.raises(ValueError, match="capacity"):
    system.objective(scn, system.SystemParams(capacity=1), P, [True, True], 100.0)
  # A denied user's cut_point is ignored, even out of range.
  assert np.isfinite(system.objective(scn, S, P, [False, True], [999.0, 100.0]))


def test_bad_scenarios_and_params_are_refused():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="N must be an integer >= 1"):
    system.sample_scenario(rng, P, S, 0, 16)
  with pytest.raises(ValueError, match="exceeds max_users"):
    system.sample_scenario(rng, P, S, 21, 16)
  for g in (0, -4, float("inf")):
    with pytest.raises(ValueError, match="edge size G"):
      system.sample_scenario(rng, P, S, 4, g)
  with pytest.raises(ValueError, match="at least one user"):
    _scenario([], [], [])
  with pytest.raises(ValueError, match="alpha"):
    _scenario([-1.0], [0.2], [0.1])
  with pytest.raises(ValueError, match="transmission"):
    system.SystemParams(transmission="shannon")
  with pytest.raises(ValueError, match="min_cut_point"):
    system.SystemParams(min_cut_point=250)
  with pytest.raises(ValueError, match="capacity"):
    system.SystemParams(capacity=0)
  with pytest.raises(ValueError, match="slope a"):
    system.AccuracyProfile(a=0.0)


def test_scenario_generation_follows_the_code():
  rng = np.random.default_rng(3)
  counts = np.zeros(8)
  for g in (4.0, 16.0):
    for _ in range(200):
      scn = system.sample_scenario(rng, P, S, 12, g)
      assert np.all(np.diff(scn.device_type) >= 0)  # visiting order: strongest device first
      assert np.all(np.diff(scn.wait) <= 0)  # arrivals sorted, so residual waits decrease
      assert np.all((scn.wait > 0) & (scn.wait <= S.window))
      np.testing.assert_allclose(scn.tau, P.latency.device_tau[scn.device_type])
      lo = np.maximum(scn.delta(S.max_users) / 0.01, 0)
      hi = 0.05 * np.maximum(scn.delta(1) / 0.0002, 0)
      assert np.all((scn.alpha >= lo - 1e-9) & (scn.alpha <= hi + 1e-9))
      counts += np.bincount(scn.device_type, minlength=8)
  # Weaker devices are drawn more often (weights linspace(1, 2)).
  freq = counts / counts.sum()
  assert abs(freq[-1] / freq[0] - 2.0) < 0.2
  # Seeded: the same generator state gives the same scenario.
  a = system.sample_scenario(np.random.default_rng(7), P, S, 5, 8.0)
  b = system.sample_scenario(np.random.default_rng(7), P, S, 5, 8.0)
  np.testing.assert_array_equal(a.alpha, b.alpha)


def test_measured_profile_from_json(tmp_path):
  path = tmp_path / "profile.json"
  path.write_text(
    json.dumps(
      {
        "accuracy": {"a": 0.06, "b": 90.0},
        "latency": {"k": 4.0, "h": 2.0, "unit": "ms", "device_slowdowns": [10.0, 20.0]},
      }
    )
  )
  prof = system.load_profile(str(path), 200)
  assert prof.accuracy.a == 0.06 and prof.accuracy.b == 90.0
  # The preference bounds are derived as the code's constants were (a/4 and A's slope at T).
  assert prof.accuracy.alpha_lo_slope == pytest.approx(0.015)
  assert prof.accuracy.alpha_hi_slope == pytest.approx(float(prof.accuracy.slope(200)))
  assert prof.latency.edge(4) == pytest.approx((0.001, 0.0005))
  np.testing.assert_allclose(prof.latency.device_tau, [0.06, 0.12])
  np.testing.assert_allclose(prof.latency.device_probs, [1 / 3, 2 / 3])
  # Without device information, the paper's device heterogeneity relative to its edge GPU.
  only = system.Profile.from_dict({"latency": {"k": 0.004, "h": 0.002}}, 200)
  ratio = P.latency.device_tau / (P.latency.edge_k + P.latency.edge_h)
  np.testing.assert_allclose(only.latency.device_tau, ratio * 0.006)
  assert only.accuracy == P.accuracy  # accuracy not given: the paper's
  scn = system.sample_scenario(np.random.default_rng(0), prof, S, 6, 2.0)
  assert set(scn.device_type.tolist()) <= {0, 1}
  for bad, match in (
    ({"accuracy": {"a": 0.1}}, "'a' and 'b'"),
    ({"latency": {"k": 1.0}}, "'k' and 'h'"),
    ({"latency": {"k": 1, "h": 1, "unit": "us"}}, "unit"),
    ({"latency": {"k": 1, "h": 1, "devices": [[1, 1]], "device_slowdowns": [2]}}, "not both"),
    ({"latencies": {}}, "unknown top-level"),
    ({"accuracy": {"a": -0.1, "b": 50}}, "slope a"),
  ):
    with pytest.raises(ValueError, match=match):
      system.Profile.from_dict(bad, 200)
