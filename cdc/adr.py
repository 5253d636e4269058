"""AnchorFrame Distribution Reasoner (ADR), CDC-MMPG-style: K anchor frames that summarise a pool.

The device holds a pool of M frame features (its recent unlabeled frames through the frozen frame
encoder) and uploads only K << M of them, with one weight per anchor: the fraction of the pool whose
nearest anchor it is, so that the cloud sees a weighted empirical distribution. The paper's rule
is unknown (spec section 3); these are the spec's candidates (section 5), each a config option:

* ``k_center``   greedy farthest-point traversal (minimises the coverage radius within a factor 2)
* ``k_medoids``  k-means++ seeding, then Voronoi iteration (each medoid moves to the member of its
                 cell with the least total distance to the cell)
* ``mmd_greedy`` greedy minimisation of MMD^2(pool, uniform anchors) under an RBF kernel with the
                 median-heuristic bandwidth (kernel herding without replacement)
* ``uniform``    evenly spaced positions of the pool in stream order (uniform in time)
* ``random``     K distinct positions drawn uniformly

and the "distribution" reading of the paper's name, ``gaussian_summary``: a diagonal Gaussian (or
a small mixture fitted by k-means) sent as (means, stds, weights), from which the cloud draws K
pseudo-features (``sample_summary``).

Everything runs in JAX under ``jit``/``vmap`` (meta-training puts the selector in the loop) and
uses no gradient. ``select`` validates its input on the host first; the ``*_jax`` functions
assume valid input.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

SELECTORS = ("k_center", "k_medoids", "mmd_greedy", "uniform", "random")
WEIGHTINGS = ("assignment", "uniform")


@dataclasses.dataclass(frozen=True)
class Anchors:
  """K distinct pool positions and their weights.

  Attributes:
    indices: int32 [K], distinct, into the pool.
    weights: float32 [K], non-negative, summing to 1.
  """

  indices: np.ndarray
  weights: np.ndarray


@dataclasses.dataclass(frozen=True)
class GaussianSummary:
  """A diagonal Gaussian mixture fitted to the pool: ``means``, ``stds`` float32 [G, d],
  ``weights`` float32 [G] (summing to 1)."""

  means: np.ndarray
  stds: np.ndarray
  weights: np.ndarray


def check_pool(pool, k: int, feature_dim: int | None = None, name: str = "ADR") -> np.ndarray:
  """Validates a pool for selecting ``k`` anchors; returns it as float32 [M, d].

  Raises:
    ValueError: an empty pool, a pool that is not [M, d], features of the wrong width, k < 1,
      k > M, or non-finite features; the message says which and names the sizes.
  """
  pool = np.asarray(pool)
  if pool.ndim != 2:
    raise ValueError(f"{name}: the pool must be [M, d] frame features, got shape {pool.shape}")
  m, d = pool.shape
  if m == 0:
    raise ValueError(f"{name}: the pool is empty (M = 0 frames); nothing to select anchors from")
  if feature_dim is not None and d != feature_dim:
    raise ValueError(
      f"{name}: pool features have width {d} but the frame encoder's width is {feature_dim}"
    )
  if not isinstance(k, int | np.integer) or k < 1:
    raise ValueError(f"{name}: the number of anchors K must be an int >= 1, got {k!r}")
  if k > m:
    raise ValueError(f"{name}: K = {k} anchors requested from a pool of only M = {m} frames")
  if not np.all(np.isfinite(pool)):
    raise ValueError(f"{name}: the pool has non-finite features")
  return pool.astype(np.float32)


def sq_dists(x: jax.Array, y: jax.Array) -> jax.Array:
  """Squared Euclidean distances float32 [N, P] between x [N, d] and y [P, d], clipped at 0."""
  xx = jnp.sum(x * x, -1)[:, None]
  yy = jnp.sum(y * y, -1)[None, :]
  return jnp.maximum(xx + yy - 2.0 * x @ y.T, 0.0)


def median_bandwidth(pool: jax.Array) -> jax.Array:
  """The median heuristic: sigma^2 = median of the pool's pairwise squared distances (> 0)."""
  d2 = sq_dists(pool, pool)
  return jnp.maximum(jnp.median(d2), 1e-6)


def rbf(x: jax.Array, y: jax.Array, sigma2: jax.Array) -> jax.Array:
  """RBF kernel matrix [N, P]: exp(-|x - y|^2 / (2 sigma2))."""
  return jnp.exp(-sq_dists(x, y) / (2.0 * sigma2))


def mmd2(
  x: jax.Array, y: jax.Array, wx: jax.Array | None, wy: jax.Array | None, sigma2: jax.Array
) -> jax.Array:
  """Biased (V-statistic) MMD^2 between weighted samples x [N, d] and y [P, d] (RBF kernel).

  ``wx``, ``wy``: weights [N], [P] summing to 1 (None = uniform). Returns a float32 scalar >= 0.
  """
  wx = jnp.full(x.shape[0], 1.0 / x.shape[0]) if wx is None else wx
  wy = jnp.full(y.shape[0], 1.0 / y.shape[0]) if wy is None else wy
  kxx = wx @ rbf(x, x, sigma2) @ wx
  kyy = wy @ rbf(y, y, sigma2) @ wy
  kxy = wx @ rbf(x, y, sigma2) @ wy
  return jnp.maximum(kxx + kyy - 2.0 * kxy, 0.0)


def assignment_weights(pool: jax.Array, indices: jax.Array) -> jax.Array:
  """float32 [K]: the fraction of the pool whose nearest anchor is each anchor."""
  nearest = jnp.argmin(sq_dists(pool, pool[indices]), axis=1)
  counts = jnp.zeros(indices.shape[0], jnp.float32).at[nearest].add(1.0)
  return counts / pool.shape[0]


# -------------------------------------------------------------------------------------------------
# Selectors, [M, d] -> int32 [K]. K is static; all are jit- and vmap-compatible.


def _traverse(pool: jax.Array, k: int, first: jax.Array, choose) -> jax.Array:
  """int32 [K]: ``first``, then K-1 positions, each ``choose(i, mind, taken)`` given every
  point's squared distance to its nearest pick so far ([M]) and the picks so far (bool [M])."""
  m = pool.shape[0]

  def body(i, carry):
    idx, mind, taken = carry
    j = choose(i, mind, taken)
    mind = jnp.minimum(mind, sq_dists(pool, pool[j][None])[:, 0])
    return idx.at[i].set(j), mind, taken.at[j].set(True)

  idx = jnp.zeros(k, jnp.int32).at[0].set(first)
  mind = sq_dists(pool, pool[first][None])[:, 0]
  taken = jnp.zeros(m, bool).at[first].set(True)
  idx, _, _ = jax.lax.fori_loop(1, k, body, (idx, mind, taken))
  return idx


def k_center_jax(pool: jax.Array, k: int, first: jax.Array) -> jax.Array:
  """Greedy farthest-point traversal from pool position ``first``."""

  def farthest(i, mind, taken):
    del i
    # Taken points have distance 0 already; masking them keeps indices distinct with duplicates.
    return jnp.argmax(jnp.where(taken, -1.0, mind))

  return _traverse(pool, k, first, farthest)


def kmeanspp_jax(pool: jax.Array, k: int, key: jax.Array) -> jax.Array:
  """k-means++ seeding: distinct positions, each drawn with probability ~ squared distance."""
  m = pool.shape[0]
  key0, key = jax.random.split(key)
  first = jax.random.randint(key0, (), 0, m)

  def draw(i, mind, taken):
    p = jnp.where(taken, 0.0, mind)
    # All remaining points may coincide with taken ones (duplicates): fall back to uniform.
    p = jnp.where(jnp.sum(p) > 0, p, jnp.where(taken, 0.0, 1.0))
    return jax.random.choice(jax.random.fold_in(key, i), m, p=p / jnp.sum(p))

  return _traverse(pool, k, first, draw)


def k_medoids_jax(pool: jax.Array, k: int, key: jax.Array, iters: int = 10) -> jax.Array:
  """k-means++ seeds refined by ``iters`` Voronoi iterations of k-medoids."""
  dist = jnp.sqrt(sq_dists(pool, pool))
  arange_k = jnp.arange(k)

  def body(_, med):
    assign = jnp.argmin(dist[:, med], axis=1)
    # A medoid always belongs to its own cell (ties with duplicates could move it): the cells
    # stay non-empty and disjoint, so the new medoids, one member per cell, stay distinct.
    assign = assign.at[med].set(arange_k)
    member = jax.nn.one_hot(assign, k, dtype=pool.dtype)  # [M, K]
    cost = dist @ member  # [M, K]: total distance of candidate j to cell k
    return jnp.argmin(jnp.where(member > 0, cost, jnp.inf), axis=0).astype(jnp.int32)

  return jax.lax.fori_loop(0, iters, body, kmeanspp_jax(pool, k, key))


def mmd_greedy_jax(pool: jax.Array, k: int, sigma2: jax.Array | None = None) -> jax.Array:
  """Greedy anchors minimising MMD^2 between the pool and the uniform measure on the anchors."""
  m = pool.shape[0]
  sigma2 = median_bandwidth(pool) if sigma2 is None else sigma2
  kern = rbf(pool, pool, sigma2)
  mean_emb = jnp.mean(kern, axis=0)  # [M]: <mu_pool, phi(j)>
  diag = jnp.diagonal(kern)

  def body(n, carry):
    idx, a_sum, b_sum, cross, taken = carry
    # MMD^2(pool, S + {j}) up to a constant, for every candidate j at once.
    nf = n.astype(jnp.float32) + 1.0
    obj = -2.0 * (a_sum + mean_emb) / nf + (b_sum + 2.0 * cross + diag) / (nf * nf)
    j = jnp.argmin(jnp.where(taken, jnp.inf, obj))
    return (
      idx.at[n].set(j),
      a_sum + mean_emb[j],
      b_sum + 2.0 * cross[j] + diag[j],
      cross + kern[:, j],
      taken.at[j].set(True),
    )

  init = (jnp.zeros(k, jnp.int32), 0.0, 0.0, jnp.zeros(m, jnp.float32), jnp.zeros(m, bool))
  idx, *_ = jax.lax.fori_loop(0, k, body, init)
  return idx


def uniform_jax(m: int, k: int) -> jax.Array:
  """Evenly spaced stream positions (spacing (M-1)/(K-1) >= 1, so rounding keeps them distinct)."""
  return jnp.asarray(np.rint(np.linspace(0, m - 1, k)).astype(np.int32))


def random_jax(m: int, k: int, key: jax.Array) -> jax.Array:
  """K distinct positions drawn uniformly without replacement."""
  return jax.random.choice(key, m, (k,), replace=False).astype(jnp.int32)


def select_jax(
  pool: jax.Array,
  k: int,
  method: str,
  key: jax.Array,
  *,
  weighting: str = "assignment",
  kmedoids_iters: int = 10,
  kcenter_start: str = "mean",
) -> tuple[jax.Array, jax.Array]:
  """Anchors of one pool, traceable (``k``, ``method`` and the options static).

  Args:
    pool: float32 [M, d].
    k: number of anchors, 1 <= k <= M (not checked here: see ``select``).
    method: one of ``SELECTORS``.
    key: PRNG key (used by ``random``, ``k_medoids`` and ``kcenter_start="random"``).
    weighting: ``assignment`` (pool fraction nearest each anchor) or ``uniform`` (1/K).
    kmedoids_iters: Voronoi iterations of k-medoids.
    kcenter_start: ``mean`` (the point nearest the pool mean: deterministic) or ``random``.

  Returns:
    (indices int32 [K], weights float32 [K]).
  """
  m = pool.shape[0]
  if method == "k_center":
    if kcenter_start == "mean":
      first = jnp.argmin(sq_dists(pool, jnp.mean(pool, 0, keepdims=True))[:, 0])
    elif kcenter_start == "random":
      first = jax.random.randint(key, (), 0, m)
    else:
      raise ValueError(f"kcenter_start={kcenter_start!r}; allowed: mean, random")
    idx = k_center_jax(pool, k, first.astype(jnp.int32))
  elif method == "k_medoids":
    idx = k_medoids_jax(pool, k, key, kmedoids_iters)
  elif method == "mmd_greedy":
    idx = mmd_greedy_jax(pool, k)
  elif method == "uniform":
    idx = uniform_jax(m, k)
  elif method == "random":
    idx = random_jax(m, k, key)
  else:
    raise ValueError(f"ADR selector {method!r} unknown; allowed: {SELECTORS}")
  if weighting == "assignment":
    w = assignment_weights(pool, idx)
  elif weighting == "uniform":
    w = jnp.full(k, 1.0 / k, jnp.float32)
  else:
    raise ValueError(f"ADR weighting {weighting!r} unknown; allowed: {WEIGHTINGS}")
  return idx, w


@functools.partial(jax.jit, static_argnames=("k", "method", "weighting", "iters", "start"))
def _select_jit(pool, key, *, k, method, weighting, iters, start):
  return select_jax(
    pool, k, method, key, weighting=weighting, kmedoids_iters=iters, kcenter_start=start
  )


def select(
  pool,
  k: int,
  method: str,
  *,
  seed: int = 0,
  feature_dim: int | None = None,
  weighting: str = "assignment",
  kmedoids_iters: int = 10,
  kcenter_start: str = "mean",
) -> Anchors:
  """Selects K anchors of a pool of frame features, after validating it.

  Args:
    pool: float [M, d] frame features.
    k: number of anchors.
    method: one of ``SELECTORS``.
    seed: for the randomised selectors.
    feature_dim: the expected width d (None: not checked).
    weighting, kmedoids_iters, kcenter_start: see ``select_jax``.

  Returns:
    ``Anchors`` with K distinct indices and weights summing to 1.

  Raises:
    ValueError: see ``check_pool``; an unknown method or weighting.
  """
  if method not in SELECTORS:
    raise ValueError(f"ADR selector {method!r} unknown; allowed: {SELECTORS}")
  pool = check_pool(pool, k, feature_dim)
  idx, w = _select_jit(
    jnp.asarray(pool),
    jax.random.key(seed),
    k=int(k),
    method=method,
    weighting=weighting,
    iters=kmedoids_iters,
    start=kcenter_start,
  )
  return Anchors(np.asarray(idx), np.asarray(w))


# -------------------------------------------------------------------------------------------------
# The Gaussian-summary variant.


def gaussian_summary_jax(
  pool: jax.Array, num_components: int, key: jax.Array, iters: int = 10, min_std: float = 1e-3
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A diagonal Gaussian mixture by k-means (hard assignments); G = 1 is the pool's mean/std.

  Returns:
    means, stds float32 [G, d]; weights float32 [G] (cell fractions; an empty cell gets 0).
  """
  chex.assert_rank(pool, 2)
  g = num_components
  centres = pool[kmeanspp_jax(pool, g, key)]

  def assign(c):
    return jax.nn.one_hot(jnp.argmin(sq_dists(pool, c), axis=1), g, dtype=pool.dtype)  # [M, G]

  def body(_, c):
    member = assign(c)
    n = jnp.sum(member, 0)
    new = (member.T @ pool) / jnp.maximum(n, 1.0)[:, None]
    return jnp.where(n[:, None] > 0, new, c)

  centres = jax.lax.fori_loop(0, iters, body, centres) if g > 1 else jnp.mean(pool, 0)[None]
  member = assign(centres)
  n = jnp.sum(member, 0)
  means = (member.T @ pool) / jnp.maximum(n, 1.0)[:, None]
  var = (member.T @ (pool * pool)) / jnp.maximum(n, 1.0)[:, None] - means * means
  stds = jnp.sqrt(jnp.maximum(var, min_std * min_std))
  return means, stds, n / pool.shape[0]


def gaussian_summary(pool, num_components: int = 1, *, seed: int = 0, feature_dim=None):
  """Validated ``gaussian_summary_jax`` of a pool; returns a ``GaussianSummary``.

  Raises:
    ValueError: see ``check_pool`` (with ``num_components`` in the role of K).
  """
  pool = check_pool(pool, num_components, feature_dim, name="ADR gaussian_summary")
  means, stds, w = jax.jit(gaussian_summary_jax, static_argnums=1)(
    jnp.asarray(pool), int(num_components), jax.random.key(seed)
  )
  return GaussianSummary(np.asarray(means), np.asarray(stds), np.asarray(w))


def sample_summary_jax(
  means: jax.Array, stds: jax.Array, weights: jax.Array, k: int, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """K pseudo-features from a mixture, drawn in the cloud: the components are assigned by
  stratified quantiles of ``weights`` (so each gets about K w_g draws), then mu + sigma eps.

  Returns:
    features float32 [K, d]; weights float32 [K] (1/K each).
  """
  chex.assert_equal_shape([means, stds])
  cdf = jnp.cumsum(weights) / jnp.sum(weights)
  comp = jnp.searchsorted(cdf, (jnp.arange(k) + 0.5) / k)
  comp = jnp.minimum(comp, means.shape[0] - 1)
  eps = jax.random.normal(key, (k, means.shape[1]), means.dtype)
  return means[comp] + stds[comp] * eps, jnp.full(k, 1.0 / k, jnp.float32)
