"""Tests for common.metrics: FID maths, KID, improved precision/recall, FLOPs/params/latency."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import metrics
from common.metrics import fid, flops, kid
from common.metrics import precision_recall as pr


def _random_spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.5 * np.eye(d))


def _sqrt_psd(s):
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference_fd(mu1, s1, mu2, s2):
  # Tr sqrtm(s1 s2) = sum sqrt(eig(sqrt(s1) s2 sqrt(s1))): same spectrum, but symmetric PSD.
  r = _sqrt_psd(s1)
  w = np.linalg.eigvalsh(r @ s2 @ r)
  tr_covmean = np.sum(np.sqrt(np.clip(w, 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------- FID


def test_compute_statistics_matches_numpy_float64_and_rejects_one_sample():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 6)).astype(np.float32)
  mu, sigma = fid.compute_statistics(x)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  assert mu.shape == (6,) and sigma.shape == (6, 6)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-12)
  centred = x64 - x64.mean(0)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)  # ddof=1
  with pytest.raises(ValueError, match="at least 2"):
    fid.compute_statistics(x[:1])
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    fid.compute_statistics(x[0])


def test_frechet_distance_self_is_zero():
  rng = np.random.default_rng(1)
  mu, sigma = fid.compute_statistics(rng.normal(size=(2000, 8)))
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_diagonal_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
  v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert isinstance(got, float)


def test_frechet_distance_general_spd_closed_form_and_symmetry():
  rng = np.random.default_rng(2)
  d = 10
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
  expected = _reference_fd(mu1, s1, mu2, s2)
  assert expected > 1.0  # a non-trivial case, so a relative tolerance is meaningful
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(fid.frechet_distance(mu2, s2, mu1, s1), got, rtol=1e-9)


def test_frechet_distance_matches_reference_on_random_features():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(500, 16))
  b = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
  s_a, s_b = fid.compute_statistics(a), fid.compute_statistics(b)
  np.testing.assert_allclose(fid.frechet_distance(*s_a, *s_b), _reference_fd(*s_a, *s_b), rtol=1e-6)


def test_frechet_distance_near_singular_is_finite():
  rng = np.random.default_rng(4)
  # N < D: both covariances have rank <= 9 in 32 dimensions.
  s_a = fid.compute_statistics(rng.normal(size=(10, 32)))
  s_b = fid.compute_statistics(rng.normal(size=(10, 32)) + 1.0)
  value = fid.frechet_distance(*s_a, *s_b)
  assert np.isfinite(value)
  assert value > 32 * 0.5  # the means differ by 1 in each of 32 dims (noisy, N=10)


def test_frechet_distance_rejects_bad_shapes():
  with pytest.raises(ValueError, match="sigma1"):
    fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="mismatch"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="mu2"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros((3, 1)), np.eye(3))


def test_stats_accumulator_equals_compute_statistics():
  rng = np.random.default_rng(5)
  # A large common offset is where naive sum-of-squares accumulation loses precision.
  x = (rng.normal(size=(1037, 12)) + 1e4).astype(np.float32)
  acc = fid.StatsAccumulator()
  for start, size in [(0, 1), (1, 0), (1, 500), (501, 36), (537, 500)]:
    acc.update(x[start : start + size])
  assert acc.count == 1037
  mu, sigma = acc.statistics()
  ref_mu, ref_sigma = fid.compute_statistics(x)
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-8, atol=1e-10)
  with pytest.raises(ValueError, match="D=12"):
    acc.update(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="at least 2"):
    fid.StatsAccumulator().statistics()


def test_save_load_statistics_roundtrip(tmp_path):
  rng = np.random.default_rng(6)
  mu, sigma = fid.compute_statistics(rng.normal(size=(20, 4)))
  path = tmp_path / "stats.npz"
  fid.save_statistics(path, mu, sigma, dataset="digits", resolution=16, num_samples=20)
  mu2, sigma2, meta = fid.load_statistics(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  assert meta == {"dataset": "digits", "resolution": 16, "num_samples": 20}
  with pytest.raises(ValueError, match="reserved"):
    fid.save_statistics(path, mu, sigma, mu=1)


# ---------------------------------------------------------------------------------------- KID


def test_kid_same_distribution_near_zero_and_shift_positive():
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
  mean, std = kid.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
  assert std > 0
  assert abs(mean) < 3 * std or abs(mean) < 1e-3
  shifted_mean, shifted_std = kid.kernel_inception_distance(
    a, b + 1.0, num_subsets=20, subset_size=200
  )
  assert shifted_mean > 10 * max(abs(mean), 3 * std)
  assert shifted_mean > 3 * shifted_std


def test_kid_matches_direct_unbiased_mmd_and_is_deterministic():
  rng = np.random.default_rng(8)
  a, b = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 0.5
  # subset_size >= N uses every sample, so each subset is the full sets (just permuted).
  mean, std = kid.kernel_inception_distance(a, b, num_subsets=3, subset_size=1000)
  k = lambda x, y: (x @ y.T / 5 + 1) ** 3
  m = 30
  kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
  expected = (
    (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    - 2 * kxy.mean()
  )
  np.testing.assert_allclose(mean, expected, rtol=1e-10)
  assert std < 1e-10 * abs(expected)
  kw = dict(num_subsets=5, subset_size=10)
  assert kid.kernel_inception_distance(a, b, seed=1, **kw) == kid.kernel_inception_distance(
    a, b, seed=1, **kw
  )
  assert kid.kernel_inception_distance(a, b, seed=1, **kw) != kid.kernel_inception_distance(
    a, b, seed=2, **kw
  )


# ----------------------------------------------------------------------- precision and recall


def test_precision_recall_identical_sets():
  x = np.random.default_rng(9).normal(size=(200, 8))
  assert pr.precision_recall(x, x.copy(), k=3, batch_size=64) == (1.0, 1.0)


def test_precision_recall_disjoint_clouds():
  rng = np.random.default_rng(10)
  real = rng.normal(size=(150, 8))
  fake = rng.normal(size=(120, 8)) + 100.0
  assert pr.precision_recall(real, fake, batch_size=50) == (0.0, 0.0)


def test_precision_recall_mode_dropping():
  rng = np.random.default_rng(11)
  centres = np.eye(4) * 50.0  # 4 well-separated modes
  real = np.concatenate([c + rng.normal(size=(300, 4)) for c in centres])
  # The generator covers only the first 2 modes, but those faithfully.
  fake = np.concatenate([c + rng.normal(size=(300, 4)) for c in centres[:2]])
  precision, recall = pr.precision_recall(real, fake, k=3, batch_size=128)
  assert precision > 0.9
  assert 0.4 < recall <= 0.5 + 1e-9


def test_precision_recall_chunking_invariant_and_validation():
  rng = np.random.default_rng(12)
  real, fake = rng.normal(size=(97, 4)), rng.normal(size=(61, 4)) * 1.3
  results = {pr.precision_recall(real, fake, batch_size=b) for b in (1, 7, 1000)}
  assert len(results) == 1
  ((p, r),) = results
  assert 0 < p < 1 and 0 < r < 1
  with pytest.raises(ValueError, match="more than k"):
    pr.precision_recall(real[:3], fake, k=3)
  assert metrics.improved_precision_recall is pr.precision_recall


# ------------------------------------------------------------------------------------- flops


def test_count_flops_matmul_exact():
  a = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  b = jax.ShapeDtypeStruct((32, 16), jnp.float32)
  assert flops.count_flops(jnp.matmul, a, b) == 2 * 64 * 16 * 32


def test_count_flops_scales_with_batch():
  w1, w2 = jnp.ones((32, 64)), jnp.ones((64, 8))

  def mlp(x, w1, w2):
    return jnp.tanh(x @ w1) @ w2

  small = flops.count_flops(mlp, jnp.ones((16, 32)), w1, w2)
  large = flops.count_flops(mlp, jnp.ones((32, 32)), w1, w2)
  assert small >= 2 * 16 * (32 * 64 + 64 * 8)
  np.testing.assert_allclose(large, 2 * small, rtol=1e-6)

  def conv(x, k):
    return jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  k = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)
  c1 = flops.count_flops(conv, jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32), k)
  c2 = flops.count_flops(conv, jax.ShapeDtypeStruct((4, 8, 8, 4), jnp.float32), k)
  assert c1 > 0
  np.testing.assert_allclose(c2, 2 * c1, rtol=1e-6)


def test_flop_counts_are_remembered_by_program(tmp_path, monkeypatch):
  """A program counted once is read back (not compiled nor analysed again); another program, or
  the lowered (unoptimised) count of the same one, gets its own entry."""
  memo = str(tmp_path / flops.MEMO_SUBDIR)
  monkeypatch.setattr(flops, "memo_dir", lambda: memo)
  a, b = jnp.ones((8, 4)), jnp.ones((4, 2))
  assert flops.count_flops(jnp.matmul, a, b) == 2 * 8 * 4 * 2
  lowered = jax.jit(jnp.matmul).lower(a, b)
  assert flops.lowered_flops(lowered) == 2 * 8 * 4 * 2
  assert len(os.listdir(memo)) == 2

  def refuse(*_, **__):
    raise AssertionError("counted again")

  monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", refuse)
  assert flops.count_flops(jnp.matmul, a, b) == 2 * 8 * 4 * 2
  assert flops.lowered_flops(jax.jit(jnp.matmul).lower(a, b)) == 2 * 8 * 4 * 2
  with pytest.raises(AssertionError, match="counted again"):
    flops.count_flops(jnp.matmul, a, jnp.ones((4, 3)))
  # Without a cache directory nothing is remembered.
  monkeypatch.setattr(flops, "memo_dir", lambda: None)
  with pytest.raises(AssertionError, match="counted again"):
    flops.count_flops(jnp.matmul, a, b)


def test_a_written_out_count_is_remembered_under_the_step_and_the_loaded_source(
  tmp_path, monkeypatch
):
  """``unrolled_flops``: the count of a loop's written-out form is read back for the same step
  without lowering that form again; another step, or a change to the source of a module loaded
  from the repo, counts it anew."""
  memo = str(tmp_path / flops.MEMO_SUBDIR)
  monkeypatch.setattr(flops, "memo_dir", lambda: memo)
  # A stand-in repository with one loaded module, whose source the test can change.
  repo = tmp_path / "repo"
  (repo / "pkg").mkdir(parents=True)
  (repo / "pkg" / "__init__.py").write_text("")
  (repo / "pkg" / "stepdef.py").write_text("TRIPS = 3\n")
  monkeypatch.setattr(flops, "REPO_ROOT", str(repo))
  monkeypatch.syspath_prepend(str(repo))
  import pkg.stepdef  # noqa: F401

  def looped(x, w):
    return jax.lax.fori_loop(0, 3, lambda _, y: y @ w, x)

  def written_out(x, w):
    for _ in range(3):
      x = x @ w
    return x

  x, w = jnp.ones((2, 4)), jnp.ones((4, 4))
  step = jax.jit(looped).lower(x, w)
  lowerings = []

  def lower_written_out():
    lowerings.append(1)
    return jax.jit(written_out).lower(x, w)

  want = 3 * 2 * 2 * 4 * 4
  assert flops.lowered_flops(step) < want / 2  # XLA counts the loop's body once
  assert flops.unrolled_flops(step, lower_written_out) == want and len(lowerings) == 1
  assert flops.unrolled_flops(jax.jit(looped).lower(x, w), lower_written_out) == want
  assert len(lowerings) == 1
  # Another step (other shapes) is its own entry.
  x2 = jnp.ones((3, 4))
  other = flops.unrolled_flops(
    jax.jit(looped).lower(x2, w), lambda: jax.jit(written_out).lower(x2, w)
  )
  assert other == 3 * 2 * 3 * 4 * 4
  # The same step after a change to the repo's loaded source is counted again.
  before = flops.loaded_source_digest()
  (repo / "pkg" / "stepdef.py").write_text("TRIPS = 4\n")
  assert flops.loaded_source_digest() != before
  assert flops.unrolled_flops(step, lower_written_out) == want and len(lowerings) == 2


def test_flop_memo_lives_in_the_local_compile_cache():
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", "/some/cache")
    assert flops.memo_dir() == os.path.join("/some/cache", flops.MEMO_SUBDIR)
    jax.config.update("jax_compilation_cache_dir", "gs://bucket/cache")
    assert flops.memo_dir() is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_count_params_and_latency():
  tree = {
    "dense": {"kernel": jnp.zeros((3, 4)), "bias": np.zeros(4)},
    "abstract": jax.ShapeDtypeStruct((2, 5, 7), jnp.bfloat16),
    "scale": jnp.ones(()),
  }
  assert flops.count_params(tree) == 12 + 4 + 70 + 1
  assert flops.count_params({}) == 0
  latency = flops.measure_latency(lambda x: (x @ x).sum(), jnp.ones((32, 32)), repeats=3)
  assert isinstance(latency, float) and latency > 0


def test_package_reexports():
  assert metrics.frechet_distance is fid.frechet_distance
  assert metrics.kernel_inception_distance is kid.kernel_inception_distance
  assert metrics.count_flops is flops.count_flops
  assert metrics.precision_recall is pr


def test_frechet_distance_retries_with_eps_when_sqrtm_not_finite(monkeypatch):
  real_sqrtm = fid.scipy.linalg.sqrtm
  calls = []

  def flaky_sqrtm(a):
    calls.append(a)
    # Fail the first call only, as scipy does for some exactly singular products.
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(fid.scipy.linalg, "sqrtm", flaky_sqrtm)
  s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 4.0])
  value = fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-6)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
  np.testing.assert_allclose(value, 1.0 + 4.0, atol=1e-2)  # ridge moves it by ~sqrt(eps)


def test_frechet_distance_raises_on_large_imaginary_part(monkeypatch):
  monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: np.eye(a.shape[0]) * (1 + 0.5j))
  with pytest.raises(ValueError, match="imaginary component 0.5"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))


def _unet_forward_flops(channels, resolution):
  """XLA's FLOP count of one U-Net forward at batch 4; attention only in the middle block."""
  from flax import nnx

  from common.models import UNet

  model = nnx.eval_shape(
    lambda: UNet(
      image_size=resolution,
      in_channels=1,
      out_channels=1,
      channels=channels,
      num_res_blocks=1,
      attention_resolutions=(),
      rngs=nnx.Rngs(0),
    )
  )
  graphdef, params = nnx.split(model, nnx.Param)
  forward = lambda p, x, t: nnx.merge(graphdef, p)(x, t)
  x = jax.ShapeDtypeStruct((4, resolution, resolution, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((4,), jnp.int32)
  return flops.count_flops(forward, params, x, t)


def test_count_flops_of_the_unet_is_stable_and_scales_with_width_and_resolution():
  base = _unet_forward_flops((16, 32), 8)
  assert base > 0
  assert _unet_forward_flops((16, 32), 8) == base  # stable: same program, same count
  # Conv FLOPs grow with the pixel count (4x the pixels, 4x the FLOPs); the middle block's
  # self-attention is quadratic in the pixel count, so the whole grows a little faster.
  assert 4.0 < _unet_forward_flops((16, 32), 16) / base < 4.8
  # ... and with width squared: 2x the width, ~4x the FLOPs (norms and biases grow only 2x).
  assert 3.2 < _unet_forward_flops((32, 64), 8) / base < 4.1


# ----------------------------------------------------------------------------- reference cache


def _fake_net(barrier=None):
  """A cheap feature network; with ``barrier``, every call waits for the barrier."""
  from common.metrics import reference

  def features(x):
    if barrier is not None:
      barrier.wait(timeout=30)
    return np.asarray(x, np.float32).reshape(len(x), -1)[:, :16]

  return reference.FeatureNetwork("fake", "0" * 64, "", features)


def _digits_config():
  import ml_collections

  return ml_collections.ConfigDict(dict(name="digits", resolution=8, data_dir="", num_examples=0))


def test_reference_statistics_computed_twice_at_once_leave_one_valid_file(tmp_path, monkeypatch):
  import threading

  from common.metrics import reference

  # Both evaluations enter np.savez together and both finish writing before either moves its
  # file into place: with a shared temporary name (the old ``path + ".tmp.npz"``) the second
  # ``os.replace`` found no file (FileNotFoundError); with unique names both succeed.
  both, savez = threading.Barrier(2), np.savez

  def savez_together(*args, **kwargs):
    both.wait(timeout=30)
    savez(*args, **kwargs)
    both.wait(timeout=30)

  monkeypatch.setattr(np, "savez", savez_together)
  results, errors = [], []

  def compute():
    try:
      cfg = _digits_config()
      results.append(
        reference.reference_features(cfg, "test", _fake_net(), cache_dir=str(tmp_path))
      )
    except BaseException as e:  # noqa: BLE001 -- reported below
      errors.append(e)

  threads = [threading.Thread(target=compute) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  monkeypatch.undo()
  assert not errors, errors
  assert len(results) == 2 and results[0][2] == results[1][2]
  path = results[0][2]
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no temporary file left
  with np.load(path, allow_pickle=False) as f:
    np.testing.assert_array_equal(f["features"], results[0][0])
    np.testing.assert_array_equal(f["labels"], results[1][1])
    assert int(f["count"]) == 300 and f["mu"].shape == (16,)
  # A later evaluation reads the cache (this net would time out if it computed).
  feats, _, again = reference.reference_features(
    _digits_config(), "test", _fake_net(threading.Barrier(2)), cache_dir=str(tmp_path)
  )
  assert again == path
  np.testing.assert_array_equal(feats, results[0][0])


def test_damaged_reference_cache_is_recomputed(tmp_path):
  from common.metrics import reference

  feats, _, path = reference.reference_features(
    _digits_config(), "test", _fake_net(), cache_dir=str(tmp_path)
  )
  with open(path, "r+b") as f:  # a torn file, as a crash of an older version could leave
    f.truncate(100)
  again, _, same = reference.reference_features(
    _digits_config(), "test", _fake_net(), cache_dir=str(tmp_path)
  )
  assert same == path and sorted(os.listdir(tmp_path)) == [os.path.basename(path)]
  np.testing.assert_array_equal(again, feats)
  with np.load(path) as f:
    np.testing.assert_array_equal(f["features"], feats)
