"""Tests for adaptive.grouping and adaptive.routing: SNR groups, FLOPs budgets, routed sampling."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive import grouping, routing
from adaptive.grouping import Groups
from common.diffusion import sampling, schedules
from common.diffusion.gaussian import GaussianDiffusion


def _cosine(t_count):
  return GaussianDiffusion.create("cosine", t_count)


# ------------------------------------------------------------------------------------------------
# SNR_dB and the spec's cut-point table.


def test_snr_db_matches_spec_values():
  db = grouping.snr_db(_cosine(4000))
  assert db.shape == (4000,) and db.dtype == np.float64
  assert np.all(np.diff(db) < 0)
  # Spec section 2 quotes 1-based t: t=1 can only be our index 0 (index 1 is 47.0 dB) and t=4000
  # our index 3999. Its "13.5 at t=500" is truncated, not rounded (index 499 is 13.56), hence the
  # 0.07 dB tolerance rather than round(., 1).
  assert round(db[0], 1) == 50.1 and round(db[-1], 1) == -98.2
  quoted = {500: 13.5, 1000: 7.4, 2000: -0.1, 3000: -7.7, 3500: -14.1}
  for t1, value in quoted.items():
    assert abs(db[t1 - 1] - value) < 0.07, t1
  ac = schedules.alphas_cumprod(schedules.get_betas("cosine", 4000))
  np.testing.assert_allclose(db, 10 * np.log10(ac / (1 - ac)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
  "t_count,n,cuts,sizes",
  [
    (4000, 4, (754, 1984, 3213), (754, 1230, 1229, 787)),
    (4000, 5, (600, 1413, 2555, 3368), (600, 813, 1142, 813, 632)),
    (1000, 4, (188, 496, 803), (188, 308, 307, 197)),
    (1000, 5, (150, 353, 638, 842), (150, 203, 285, 204, 158)),
  ],
)
def test_snr_equal_db_reproduces_spec_table(t_count, n, cuts, sizes):
  diffusion = _cosine(t_count)
  g = grouping.make_groups(diffusion, n, "snr_equal_db")
  assert g.cuts == cuts
  assert tuple(g.sizes) == sizes
  assert g.intervals[0] == (0, cuts[0] - 1)
  assert g.intervals[-1] == (cuts[-1], t_count - 1)
  # The cut semantics: cut c is the first 0-based t of the next group, i.e. the first t whose
  # SNR_dB is below the bin edge; everything before it is at or above the edge.
  db = grouping.snr_db(diffusion)
  edges = np.linspace(20, -20, n + 1)[1:-1]
  for c, e in zip(cuts, edges, strict=True):
    assert db[c - 1] >= e > db[c]
  ranges = g.snr_range(diffusion)
  assert ranges.shape == (n, 2)
  assert np.all(ranges[:, 0] >= ranges[:, 1]) and np.all(ranges[:-1, 1] > ranges[1:, 0])


def test_snr_equal_db_unclipped_is_degenerate_as_spec_says():
  diffusion = _cosine(4000)
  full = {"clip_lo": None, "clip_hi": None}
  assert tuple(grouping.make_groups(diffusion, 4, **full).sizes) == (534, 3305, 158, 3)
  assert grouping.make_groups(diffusion, 5, **full).sizes.max() == 2932


def test_snr_equal_db_custom_clip_moves_cuts():
  diffusion = _cosine(1000)
  narrow = grouping.make_groups(diffusion, 2, clip_lo=-5.0, clip_hi=15.0)
  db = grouping.snr_db(diffusion)
  (c,) = narrow.cuts
  assert db[c - 1] >= 5.0 > db[c]


# ------------------------------------------------------------------------------------------------
# The Groups type.


def _jitted_group(groups, t):
  """The group the routed denoiser (``routing.routed_denoise_fn``, under jit) runs at timestep t."""
  fns = [lambda x, t, y, g=g: jnp.full_like(x, g) for g in range(groups.num_groups)]
  fn = jax.jit(routing.routed_denoise_fn(groups, fns))
  return int(fn(jnp.zeros((1, 1, 1, 1)), jnp.full((1,), t, jnp.int32), None)[0, 0, 0, 0])


def test_group_of_host_and_jitted_routing_agree_and_cover_intervals():
  g = Groups((3, 7, 8), 12)
  assert g.num_groups == 4
  assert g.intervals == [(0, 2), (3, 6), (7, 7), (8, 11)]
  np.testing.assert_array_equal(g.boundaries, [0, 3, 7, 8, 12])
  t = np.arange(12)
  expected = np.array([0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3])
  np.testing.assert_array_equal(g.group_of(t), expected)
  np.testing.assert_array_equal(g.group_of(t.reshape(3, 4)), expected.reshape(3, 4))
  assert g.group_of(7) == 2
  assert [_jitted_group(g, int(s)) for s in t] == expected.tolist()
  assert g.level_range(1) == (7, 3)
  one = Groups((), 5)
  np.testing.assert_array_equal(one.group_of(np.arange(5)), np.zeros(5))
  assert [_jitted_group(one, s) for s in range(5)] == [0] * 5


def test_groups_validation():
  with pytest.raises(ValueError, match="strictly increasing"):
    Groups((3, 3), 10)
  with pytest.raises(ValueError, match="strictly increasing"):
    Groups((0, 4), 10)
  with pytest.raises(ValueError, match="strictly increasing"):
    Groups((4, 10), 10)
  with pytest.raises(ValueError, match="num_timesteps"):
    Groups((), 0)
  g = Groups((4,), 10)
  with pytest.raises(ValueError, match=r"\[0, T=10\)"):
    g.group_of([3, 10])
  with pytest.raises(ValueError, match=r"\[0, T=10\)"):
    g.group_of(-1)
  with pytest.raises(ValueError, match="contiguous"):
    Groups.from_assignment(np.array([0, 0, 2, 2]))
  with pytest.raises(ValueError, match="contiguous"):
    Groups.from_assignment(np.array([0, 1, 0]))
  assert Groups.from_assignment(np.array([0, 0, 1, 2, 2])) == Groups((2, 3), 5)
  with pytest.raises(ValueError, match="T=10.*T=20"):
    g.snr_range(_cosine(20))


# ------------------------------------------------------------------------------------------------
# The other grouping methods.


@pytest.mark.parametrize(
  "t_count,n,sizes", [(1000, 4, [250] * 4), (10, 3, [4, 3, 3]), (7, 7, [1] * 7)]
)
def test_uniform_t_sizes(t_count, n, sizes):
  g = grouping.make_groups(_cosine(t_count), n, "uniform_t")
  assert g.sizes.tolist() == sizes


def _brute_force_min(x_or_features, t_count, n, cost):
  best = np.inf
  for cuts in itertools.combinations(range(1, t_count), n - 1):
    b = (0, *cuts, t_count)
    best = min(best, sum(cost(x_or_features, b[i], b[i + 1]) for i in range(n)))
  return best


def _abs_cost(x, lo, hi_excl):
  # Independent of the module's prefix-sum formula: a literal per-element sum.
  c = lo + (hi_excl - lo) // 2
  return sum(abs(x[t] - x[c]) for t in range(lo, hi_excl))


def _cos_cost(f, lo, hi_excl):
  c = lo + (hi_excl - lo) // 2
  u = f / np.linalg.norm(f, axis=1, keepdims=True)
  return sum(1.0 - float(u[t] @ u[c]) for t in range(lo, hi_excl))


def _partition_cost(groups, x, cost):
  b = groups.boundaries
  return sum(cost(x, int(b[i]), int(b[i + 1])) for i in range(groups.num_groups))


@pytest.mark.parametrize("t_count,n", [(9, 3), (11, 4), (8, 1), (6, 6)])
def test_task_affinity_dp_is_optimal_log_snr(t_count, n):
  diffusion = _cosine(t_count)
  g = grouping.make_groups(diffusion, n, "task_affinity_dp")
  assert g.num_groups == n and np.all(g.sizes >= 1) and g.sizes.sum() == t_count
  x = schedules.log_snr(diffusion.np_alpha_bar_levels()[1:])
  got = _partition_cost(g, x, _abs_cost)
  assert got == pytest.approx(_brute_force_min(x, t_count, n, _abs_cost), rel=1e-12, abs=1e-12)


def test_task_affinity_dp_timestep_cost_is_optimal():
  diffusion = _cosine(10)
  g = grouping.make_groups(diffusion, 3, "task_affinity_dp", cost="timestep")
  x = np.arange(10.0)
  assert _partition_cost(g, x, _abs_cost) == pytest.approx(
    _brute_force_min(x, 10, 3, _abs_cost), abs=1e-12
  )


def test_task_affinity_dp_features_recovers_blocks_and_is_optimal():
  t_count = 12
  rng = np.random.default_rng(0)
  # Three blocks of timesteps whose "gradients" point along three orthogonal directions.
  block = np.repeat([0, 1, 2], [5, 3, 4])
  feats = np.eye(3)[block] + 0.05 * rng.normal(size=(t_count, 3))
  g = grouping.make_groups(_cosine(t_count), 3, "task_affinity_dp", features=feats)
  assert g.cuts == (5, 8)
  noisy = rng.normal(size=(9, 4))
  g2 = grouping.make_groups(_cosine(9), 3, "task_affinity_dp", features=noisy)
  assert _partition_cost(g2, noisy, _cos_cost) == pytest.approx(
    _brute_force_min(noisy, 9, 3, _cos_cost), rel=1e-9
  )


def test_random_partition_reproducible_and_valid():
  diffusion = _cosine(50)
  a = grouping.make_groups(diffusion, 5, "random", seed=3)
  b = grouping.make_groups(diffusion, 5, "random", seed=3)
  assert a == b
  draws = {grouping.make_groups(diffusion, 5, "random", seed=s).cuts for s in range(10)}
  assert len(draws) > 5
  for s in range(20):
    g = grouping.make_groups(_cosine(6), 6 if s % 2 else 3, "random", seed=s)
    assert np.all(g.sizes >= 1) and g.sizes.sum() == 6


# ------------------------------------------------------------------------------------------------
# FLOPs budgets.


def test_flops_budgets_formula_and_direction():
  hi = grouping.flops_budgets(10.0, 5, 0.5)
  np.testing.assert_allclose(hi, [10.0, 9.0, 8.0, 7.0, 6.0])
  lo = grouping.flops_budgets(10.0, 5, 0.5, full_model_end="low_snr")
  np.testing.assert_allclose(lo, hi[::-1])
  zero = grouping.flops_budgets(10.0, 5, 0.5, rank_from=0)
  np.testing.assert_allclose(zero, [9.0, 8.0, 7.0, 6.0, 5.0])
  assert grouping.flops_budgets(3.0, 1, 0.2) == [3.0]


def _ratio(groups, budgets, base_flops, timesteps=None):
  """Sampling FLOPs over the base model's at the given timesteps (all T when None)."""
  t = np.arange(groups.num_timesteps) if timesteps is None else timesteps
  return routing.sampling_flops(groups, budgets, base_flops=base_flops, timesteps=t).ratio


@pytest.mark.parametrize(
  "n,k,ratio",
  [
    (4, 0.3, 0.738),
    (4, 0.5, 0.812),
    (4, 0.7, 0.888),
    (5, 0.3, 0.720),
    (5, 0.5, 0.800),
    (5, 0.7, 0.880),
  ],
)
def test_mean_ratio_equal_use_matches_spec_table(n, k, ratio):
  # Every group used equally often: T = N, one timestep per group.
  g = grouping.make_groups(_cosine(n), n, "uniform_t")
  got = _ratio(g, grouping.flops_budgets(1.0, n, k), 1.0)
  assert abs(got - ratio) <= 0.0005 + 1e-12


def test_mean_ratio_rank_from_zero_and_size_weighted():
  g5 = grouping.make_groups(_cosine(5), 5, "uniform_t")
  assert _ratio(g5, grouping.flops_budgets(2.0, 5, 0.5, rank_from=0), 2.0) == pytest.approx(0.70)
  # Spec 3.3: weighted by the clipped-dB T=4000 group sizes, N=4 -> 0.811 and N=5 -> 0.798 with
  # the full model at high SNR; the reversed direction gives 0.814 and 0.802.
  diffusion = _cosine(4000)
  for n, high, low in [(4, 0.811, 0.814), (5, 0.798, 0.802)]:
    g = grouping.make_groups(diffusion, n)
    for end, want in [("high_snr", high), ("low_snr", low)]:
      got = _ratio(g, grouping.flops_budgets(1.0, n, 0.5, end), 1.0)
      assert round(got, 3) == want, (n, end)
  g = Groups((2,), 10)
  assert _ratio(g, [4.0, 2.0], 4.0, timesteps=[0, 1, 5]) == pytest.approx((1 + 1 + 0.5) / 3)


# ------------------------------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_raise_naming_the_argument():
  d = _cosine(10)
  with pytest.raises(ValueError, match="num_groups=0"):
    grouping.make_groups(d, 0)
  with pytest.raises(ValueError, match="num_groups=11"):
    grouping.make_groups(d, 11, "uniform_t")
  with pytest.raises(ValueError, match="num_groups=2.5"):
    grouping.make_groups(d, 2.5)
  with pytest.raises(ValueError, match="method='snr_bins'"):
    grouping.make_groups(d, 2, "snr_bins")
  with pytest.raises(ValueError, match="clip_lo=5.0, clip_hi=5.0"):
    grouping.make_groups(d, 2, clip_lo=5.0, clip_hi=5.0)
  with pytest.raises(ValueError, match="clip_lo=10.0, clip_hi=-10.0"):
    grouping.make_groups(d, 2, clip_lo=10.0, clip_hi=-10.0)
  # T=10 spans few dB steps per bin: 8 equal bins in [-20, 20] leave one empty.
  with pytest.raises(ValueError, match="bin .* holds no timestep"):
    grouping.make_groups(d, 8)
  with pytest.raises(ValueError, match="unknown option.*'seed'"):
    grouping.make_groups(d, 2, "uniform_t", seed=1)
  with pytest.raises(ValueError, match="cost='l2'"):
    grouping.make_groups(d, 2, "task_affinity_dp", cost="l2")
  with pytest.raises(ValueError, match="features"):
    grouping.make_groups(d, 2, "task_affinity_dp", cost="cosine")
  with pytest.raises(ValueError, match="features"):
    grouping.make_groups(d, 2, "task_affinity_dp", cost="log_snr", features=np.ones((10, 2)))
  with pytest.raises(ValueError, match=r"T=10, D\]"):
    grouping.make_groups(d, 2, "task_affinity_dp", features=np.ones((9, 2)))
  for bad_k in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=f"k={bad_k}"):
      grouping.flops_budgets(1.0, 4, bad_k)
  with pytest.raises(ValueError, match="num_groups=0"):
    grouping.flops_budgets(1.0, 0, 0.5)
  with pytest.raises(ValueError, match="full_model_end='middle'"):
    grouping.flops_budgets(1.0, 4, 0.5, full_model_end="middle")
  with pytest.raises(ValueError, match="rank_from=2"):
    grouping.flops_budgets(1.0, 4, 0.5, rank_from=2)
  with pytest.raises(ValueError, match="base_flops=0"):
    grouping.flops_budgets(0, 4, 0.5)
  g = Groups((5,), 10)
  with pytest.raises(ValueError, match="one denoise_fn per group"):
    routing.routed_denoise_fn(g, [lambda x, t, y: x])
  with pytest.raises(ValueError, match="one denoise_fn per group"):
    routing.group_segments(g, [lambda x, t, y: x] * 3, [10, 0])
  with pytest.raises(ValueError, match="exactly one of levels or timesteps"):
    routing.sampling_flops(g, [1.0, 1.0], base_flops=1.0)
  with pytest.raises(ValueError, match="exactly one of levels or timesteps"):
    routing.sampling_flops(g, [1.0, 1.0], base_flops=1.0, levels=[10, 0], timesteps=[9])
  with pytest.raises(ValueError, match="strictly decreasing"):
    routing.sampling_flops(g, [1.0, 1.0], base_flops=1.0, levels=[0, 10])
  with pytest.raises(ValueError, match="need 2 flops_per_group"):
    routing.sampling_flops(g, [1.0], base_flops=1.0, timesteps=[1])
  with pytest.raises(ValueError, match="base_flops=0"):
    routing.sampling_flops(g, [1.0, 1.0], base_flops=0, timesteps=[1])
  with pytest.raises(ValueError, match="non-empty 1-D"):
    routing.sampling_flops(g, [1.0, 1.0], base_flops=1.0, timesteps=[])


# ------------------------------------------------------------------------------------------------
# Routing.


def _recording_fns(num_groups, calls):
  """Denoisers that log (group, t[0]) when they run and output a group-specific constant eps."""

  def make(g):
    def fn(x, t, y):
      jax.debug.callback(lambda tt, g=g: calls.append((g, int(tt[0]))), t)
      return jnp.full_like(x, 0.1 * (g + 1))

    return fn

  return [make(g) for g in range(num_groups)]


@pytest.mark.parametrize("num_steps,guided", [(10, False), (7, True)])
def test_routed_sample_calls_the_group_of_each_respaced_step(num_steps, guided):
  t_count = 100
  diffusion = _cosine(t_count)
  groups = grouping.make_groups(diffusion, 3)
  calls = []
  fn = routing.routed_denoise_fn(groups, _recording_fns(3, calls))
  kwargs = {}
  if guided:
    kwargs = dict(y=jnp.array([1, 2], jnp.int32), guidance_scale=2.0, null_label=0)
  out = sampling.sample(
    diffusion, fn, (2, 4, 4, 1), jax.random.key(0), num_steps=num_steps, sampler="ddim", **kwargs
  )
  jax.block_until_ready(out)
  levels = sampling.make_levels(t_count, num_steps)
  expected_t = [int(k) - 1 for k in levels[:-1]]
  # Exactly one network per step, and it is the group of the original (un-respaced) t.
  assert sorted(t for _, t in calls) == sorted(expected_t)
  assert sorted(calls) == sorted((int(groups.group_of(t)), t) for t in expected_t)
  assert {g for g, _ in calls} == {0, 1, 2}, "the grid should visit every group"


def test_routed_matches_per_step_reference_and_full_chain_segments():
  t_count = 24
  diffusion = _cosine(t_count)
  groups = Groups((5, 14), t_count)
  consts = [0.3, -0.2, 0.5]
  fns = [lambda x, t, y, c=c: jnp.full_like(x, c) + 0.01 * x for c in consts]
  fn = routing.routed_denoise_fn(groups, fns)
  x = jnp.ones((2, 2, 2, 1))
  for t in (0, 4, 5, 13, 14, 23):
    got = jax.jit(fn)(x, jnp.full((2,), t, jnp.int32), None)
    np.testing.assert_allclose(got, consts[int(groups.group_of(t))] + 0.01 * x)
  rng = jax.random.key(1)
  for num_steps in (t_count, 7):
    # The chain of group segments over one (respaced) grid is the routed one-segment chain.
    levels = sampling.make_levels(t_count, num_steps)
    routed = sampling.sample(diffusion, fn, (2, 2, 2, 1), rng, num_steps=num_steps)
    segments = routing.group_segments(groups, fns, levels)
    x_t = sampling.initial_noise(rng, (2, 2, 2, 1))
    chain = sampling.sample_chain(diffusion, segments, x_t, rng, levels=levels)
    np.testing.assert_array_equal(np.asarray(routed), np.asarray(chain))
    step_groups = [int(groups.group_of(int(k) - 1)) for k in levels[:-1]]
    for s in segments:  # each segment takes exactly the steps of its group
      inside = [
        g for k, g in zip(levels[:-1], step_groups, strict=True) if s.k_end < k <= s.k_start
      ]
      assert set(inside) == {int(s.side[len("group") :])}
  full = routing.group_segments(groups, fns, sampling.make_levels(t_count, t_count))
  assert [(s.k_start, s.k_end) for s in full] == [(24, 14), (14, 5), (5, 0)]


def test_sampling_flops_on_respaced_grid():
  t_count = 100
  groups = Groups((20, 60), t_count)
  budgets = [10.0, 7.0, 4.0]
  levels = sampling.make_levels(t_count, 10)
  res = routing.sampling_flops(groups, budgets, base_flops=10.0, levels=levels)
  t = levels[:-1].astype(int) - 1
  counts = [int(np.sum((t >= lo) & (t <= hi))) for lo, hi in groups.intervals]
  assert res.steps_per_group == tuple(counts) and sum(counts) == 10
  assert res.total == pytest.approx(sum(c * b for c, b in zip(counts, budgets, strict=True)))
  assert res.base == pytest.approx(100.0)
  assert res.ratio == pytest.approx(res.total / 100.0)
  same = routing.sampling_flops(
    groups, budgets, base_flops=10.0, timesteps=sampling.space_timesteps(t_count, [10])
  )
  assert same == res
  # The respaced ratio is the mean of budgets[group(t)] / F over the same timesteps.
  assert res.ratio == pytest.approx(np.mean(np.asarray(budgets)[groups.group_of(t)]) / 10.0)
