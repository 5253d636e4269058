"""Tests for cdc.adr: the anchor selectors, the Gaussian summary, and their input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdc import adr


def _clustered(seed=0, d=8):
  """A pool of 400 frames in 6 clusters of unequal size (as frame features of a device are)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(6, d)) * 4
  sizes = (200, 100, 50, 25, 15, 10)
  pool = np.concatenate(
    [c + 0.5 * rng.normal(size=(n, d)) for c, n in zip(centres, sizes, strict=True)]
  )
  return rng.permutation(pool).astype(np.float32)


@pytest.mark.parametrize("method", adr.SELECTORS)
def test_each_selector_returns_k_distinct_frames_and_normalised_weights(method):
  pool = _clustered()
  for k in (8,):
    a = adr.select(pool, k, method, seed=3)
    assert a.indices.shape == (k,) and a.indices.dtype == np.int32
    assert len(np.unique(a.indices)) == k
    assert a.indices.min() >= 0 and a.indices.max() < len(pool)
    assert np.all(a.weights >= 0) and abs(a.weights.sum() - 1.0) < 1e-5
  # All frames identical (a static camera): still K distinct positions.
  dup = np.ones((12, 8), np.float32)
  assert sorted(adr.select(dup, 12, method).indices.tolist()) == list(range(12))


def test_assignment_weights_are_the_nearest_anchor_shares():
  pool = np.array([[0.0], [0.1], [0.2], [5.0], [10.0]], np.float32)
  idx = jnp.array([0, 3], jnp.int32)
  np.testing.assert_allclose(adr.assignment_weights(jnp.asarray(pool), idx), [0.6, 0.4])
  uni = adr.select(pool, 2, "k_center", weighting="uniform")
  np.testing.assert_allclose(uni.weights, [0.5, 0.5])


def _coverage_radius(pool, indices) -> float:
  """max over the pool of the distance to the nearest anchor (what k-center minimises), in
  float64 on the host."""
  pool = np.asarray(pool, np.float64)
  anchors = pool[np.asarray(indices)]
  d2 = (pool * pool).sum(1)[:, None] + (anchors * anchors).sum(1)[None] - 2.0 * pool @ anchors.T
  return float(np.sqrt(max(np.max(np.min(d2, axis=1)), 0.0)))


def test_k_center_coverage_radius_is_no_worse_than_random():
  pool = _clustered(seed=0)
  for k in (4, 8, 16):
    kc = _coverage_radius(pool, adr.select(pool, k, "k_center").indices)
    rnd = [_coverage_radius(pool, adr.select(pool, k, "random", seed=s).indices) for s in range(5)]
    assert kc <= rnd[0], (k, kc, rnd[0])
    assert kc <= min(rnd), (k, kc, rnd)
  # Farthest-point traversal: the first two anchors are the mean-nearest point and the point
  # farthest from it.
  a = adr.select(pool, 2, "k_center").indices
  first = np.argmin(((pool - pool.mean(0)) ** 2).sum(1))
  assert a[0] == first and a[1] == np.argmax(((pool - pool[first]) ** 2).sum(1))


def test_mmd_greedy_and_k_medoids_match_the_pool_better_than_random():
  pool = _clustered(seed=1)
  s2 = adr.median_bandwidth(jnp.asarray(pool))
  mmd2 = jax.jit(adr.mmd2)

  def mmd(a):
    return float(mmd2(pool[a.indices], pool, a.weights, None, s2))

  rnd = np.mean([mmd(adr.select(pool, 8, "random", seed=s, weighting="uniform")) for s in range(5)])
  assert mmd(adr.select(pool, 8, "mmd_greedy", weighting="uniform")) < rnd
  assert mmd(adr.select(pool, 8, "k_medoids")) < rnd


def test_k_medoids_medoids_are_cell_minimisers():
  pool = _clustered(seed=2, d=2)
  a = adr.select(pool, 5, "k_medoids", kmedoids_iters=20)
  med = pool[a.indices]
  cell = np.argmin(((pool[:, None] - med[None]) ** 2).sum(-1), axis=1)
  dist = np.sqrt(((pool[:, None] - pool[None]) ** 2).sum(-1))
  for k in range(5):
    members = np.flatnonzero(cell == k)
    cost = dist[np.ix_(members, members)].sum(1)
    assert cost[members.tolist().index(a.indices[k])] <= cost.min() + 1e-3


def test_selectors_are_deterministic_and_seeded():
  pool = _clustered()
  for m in adr.SELECTORS:
    np.testing.assert_array_equal(
      adr.select(pool, 8, m, seed=1).indices, adr.select(pool, 8, m, seed=1).indices
    )
  assert not np.array_equal(
    adr.select(pool, 8, "random", seed=1).indices, adr.select(pool, 8, "random", seed=2).indices
  )


def test_uniform_is_evenly_spaced_in_stream_order():
  np.testing.assert_array_equal(
    adr.select(np.zeros((10, 2)) + np.arange(10)[:, None], 4, "uniform").indices, [0, 3, 6, 9]
  )


def test_gaussian_summary_and_cloud_samples():
  pool = _clustered(seed=3)
  one = adr.gaussian_summary(pool, 1)
  np.testing.assert_allclose(one.means[0], pool.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(one.stds[0], pool.std(0), rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(one.weights, [1.0])
  mix = adr.gaussian_summary(pool, 6, seed=0)
  assert mix.means.shape == (6, 8) and abs(mix.weights.sum() - 1) < 1e-6
  feats, w = adr.sample_summary_jax(
    jnp.asarray(mix.means), jnp.asarray(mix.stds), jnp.asarray(mix.weights), 100, jax.random.key(0)
  )
  assert feats.shape == (100, 8) and np.allclose(w, 0.01)
  # Stratified components: each gets round(100 w_g) +- 1 draws.
  comp = np.argmin(((np.asarray(feats)[:, None] - mix.means[None]) ** 2).sum(-1), 1)
  counts = np.bincount(comp, minlength=6)
  assert np.all(np.abs(counts - 100 * mix.weights) <= 1.5), (counts, mix.weights)


@pytest.mark.parametrize(
  "pool,k,dim,match",
  [
    (np.zeros((0, 8)), 4, None, "pool is empty"),
    (np.zeros((10, 8)), 11, None, "K = 11 anchors requested from a pool of only M = 10"),
    (np.zeros((10, 8)), 4, 16, "width 8 but the frame encoder's width is 16"),
    (np.zeros((10,)), 4, None, r"must be \[M, d\]"),
    (np.zeros((10, 8)), 0, None, "K must be an int >= 1"),
    (np.full((10, 8), np.nan), 4, None, "non-finite"),
  ],
)
def test_bad_input_gives_a_clear_error(pool, k, dim, match):
  with pytest.raises(ValueError, match=match):
    adr.select(pool, k, "k_center", feature_dim=dim)
  with pytest.raises(ValueError, match=match):
    adr.gaussian_summary(pool, k, feature_dim=dim)


def test_unknown_selector():
  with pytest.raises(ValueError, match="unknown; allowed"):
    adr.select(np.zeros((4, 2)), 2, "farthest")
