"""Tests for common.diffusion: schedules, forward/posterior maths, losses and segmented sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.diffusion import likelihood, sampling, schedules
from common.diffusion.gaussian import GaussianDiffusion
from common.diffusion.sampling import Segment

# ------------------------------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize("t_count", [1000, 250, 4000])
def test_linear_betas_closed_form(t_count):
  betas = schedules.get_betas("linear", t_count)
  scale = 1000.0 / t_count
  assert betas.dtype == np.float64 and betas.shape == (t_count,)
  np.testing.assert_allclose(betas[0], scale * 1e-4, rtol=1e-12)
  np.testing.assert_allclose(betas[-1], scale * 0.02, rtol=1e-12)
  np.testing.assert_allclose(np.diff(betas), scale * (0.02 - 1e-4) / (t_count - 1), rtol=1e-9)


@pytest.mark.parametrize("t_count", [1000, 100, 4000])
def test_cosine_betas_closed_form(t_count):
  betas = schedules.get_betas("cosine", t_count)
  s = 0.008
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  k = np.arange(t_count + 1)
  abar = schedules.alpha_bar_levels(betas)
  clipped = betas >= 0.999
  # Only the final beta may hit the 0.999 clip; every level before it is exactly f(k/T) / f(0).
  assert not clipped[:-1].any()
  np.testing.assert_allclose(abar[:-1], f(k[:-1] / t_count) / f(0.0), rtol=1e-10, atol=1e-14)
  assert betas[-1] == pytest.approx(0.999)


@pytest.mark.parametrize("name,t_count", [("linear", 21), ("linear", 1000), ("cosine", 1), ("cosine", 10), ("cosine", 1000)])  # fmt: skip
def test_schedule_invariants(name, t_count):
  betas = schedules.get_betas(name, t_count)
  assert np.all(betas > 0) and np.all(betas < 1)
  abar = schedules.alpha_bar_levels(betas)
  assert abar[0] == 1.0 and np.all(np.diff(abar) < 0) and abar[-1] > 0
  ac = schedules.alphas_cumprod(betas)
  snr = schedules.snr(ac)
  assert np.all(np.diff(snr) < 0)
  np.testing.assert_allclose(schedules.log_snr(ac), np.log(snr), rtol=1e-9, atol=1e-9)


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match="quadratic.*linear, cosine"):
    schedules.get_betas("quadratic", 10)
  with pytest.raises(ValueError, match="0"):
    schedules.get_betas("cosine", 0)
  with pytest.raises(ValueError, match="> 20"):
    schedules.get_betas("linear", 20)
  with pytest.raises(ValueError, match="'foo'"):
    GaussianDiffusion.create("linear", 10, parameterization="foo")
  with pytest.raises(ValueError, match="learn_sigma"):
    GaussianDiffusion.create("linear", 10, loss="hybrid", learn_sigma=False)
  assert GaussianDiffusion.create("linear", 40, loss="hybrid").learn_sigma


# ------------------------------------------------------------------------------------------------
# Forward process and posterior.


def _bayes_posterior(abar_k, abar_kp, x0, xk):
  """q(x_k' | x_k, x0) by Gaussian conditioning: prior N(sqrt(abar') x0, 1 - abar') on x_k',
  likelihood x_k | x_k' ~ N(sqrt(a) x_k', 1 - a) with a = abar / abar'."""
  a = abar_k / abar_kp
  prec = 1.0 / (1.0 - abar_kp) + a / (1.0 - a)
  var = 1.0 / prec
  mean = var * (np.sqrt(abar_kp) * x0 / (1.0 - abar_kp) + np.sqrt(a) * xk / (1.0 - a))
  return mean, var


def test_posterior_matches_closed_form():
  t_count = 50
  d = GaussianDiffusion.create("linear", t_count)
  abar = schedules.alpha_bar_levels(schedules.get_betas("linear", t_count))
  rng = np.random.default_rng(0)
  t = np.array([0, 1, 17, t_count - 1], np.int32)
  x0 = rng.normal(size=(4, 2, 2, 3))
  xt = rng.normal(size=(4, 2, 2, 3))
  mean, var, log_var = d.q_posterior_mean_variance(
    jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t)
  )
  assert mean.shape == var.shape == log_var.shape == x0.shape
  for i, ti in enumerate(t):
    if ti == 0:
      # Level 0 is determined by x0: zero variance, mean x0, log variance clipped to t = 1's value.
      np.testing.assert_allclose(mean[i], x0[i], atol=1e-5)
      np.testing.assert_allclose(var[i], 0.0, atol=1e-12)
      _, v1 = _bayes_posterior(abar[2], abar[1], 0.0, 0.0)
      np.testing.assert_allclose(log_var[i], np.log(v1), rtol=1e-5)
      continue
    m_ref, v_ref = _bayes_posterior(abar[ti + 1], abar[ti], x0[i], xt[i])
    np.testing.assert_allclose(mean[i], m_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var[i], v_ref, rtol=1e-5)
    np.testing.assert_allclose(log_var[i], np.log(v_ref), rtol=1e-5)


def test_respaced_posterior_matches_full_chain_when_adjacent_and_bayes_otherwise():
  t_count = 40
  d = GaussianDiffusion.create("cosine", t_count)
  c = sampling.step_coefficients(d, np.arange(t_count, -1, -1))
  # Step i leaves level T - i, i.e. full-chain timestep t = T - 1 - i.
  np.testing.assert_allclose(c["coef1"][::-1], d.posterior_mean_coef1, rtol=1e-5)
  np.testing.assert_allclose(c["coef2"][::-1], d.posterior_mean_coef2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(c["post_var"][::-1], d.posterior_variance, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(c["post_log_var"][::-1], d.posterior_log_variance_clipped, rtol=1e-5)
  np.testing.assert_allclose(c["log_beta"][::-1], d.log_betas, rtol=1e-5)

  abar = d.np_alpha_bar_levels()
  levels = np.array([40, 31, 9, 3])
  c = sampling.step_coefficients(d, levels)
  x0, xk = 0.7, -1.3
  for i in range(3):
    m_ref, v_ref = _bayes_posterior(abar[levels[i]], abar[levels[i + 1]], x0, xk)
    np.testing.assert_allclose(c["coef1"][i] * x0 + c["coef2"][i] * xk, m_ref, rtol=1e-10)
    np.testing.assert_allclose(c["post_var"][i], v_ref, rtol=1e-10)


def test_q_sample_statistics():
  t_count = 100
  d = GaussianDiffusion.create("cosine", t_count)
  abar = d.np_alpha_bar_levels()
  n = 20000
  x0 = jnp.broadcast_to(jnp.array([0.8, -0.5], jnp.float32), (n, 1, 1, 2))
  for tt in (20, 70):
    x = d.q_sample(
      x0, jnp.full((n,), tt, jnp.int32), jax.random.normal(jax.random.key(tt), x0.shape)
    )
    a = abar[tt + 1]
    np.testing.assert_allclose(np.mean(x, axis=0).ravel(), np.sqrt(a) * np.array([0.8, -0.5]),
                               atol=0.03)  # fmt: skip
    np.testing.assert_allclose(np.var(x, axis=0).ravel(), 1 - a, rtol=0.05)


def test_parameterization_round_trips():
  d = GaussianDiffusion.create("linear", 1000)
  k1, k2 = jax.random.split(jax.random.key(1))
  x0 = jax.random.uniform(k1, (6, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 100, 500, 900, 999], jnp.int32)
  x_t = d.q_sample(x0, t, eps)
  np.testing.assert_allclose(d.eps_from_x0(x_t, t, x0), eps, atol=2e-4)
  np.testing.assert_allclose(d.x0_from_eps(x_t, t, eps), x0, atol=2e-3)
  v = d.v_from_eps_x0(eps, x0, t)
  np.testing.assert_allclose(d.x0_from_v(x_t, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(d.eps_from_v(x_t, t, v), eps, atol=1e-5)
  for param, out in (("eps", eps), ("x0", x0), ("v", v)):
    dp = GaussianDiffusion.create("linear", 1000, parameterization=param)
    x0_hat, eps_hat, var = dp.model_output_to_x0_eps(out, x_t, t)
    assert var is None
    np.testing.assert_allclose(x0_hat, x0, atol=2e-3)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4)


# ------------------------------------------------------------------------------------------------
# Reverse process, losses.


def test_learned_variance_interpolates_between_beta_and_posterior():
  d = GaussianDiffusion.create("cosine", 50, learn_sigma=True)
  x_t = jnp.ones((3, 2, 2, 1))
  t = jnp.array([0, 10, 49], jnp.int32)
  for v, table in ((1.0, d.log_betas), (-1.0, d.posterior_log_variance_clipped)):
    out = jnp.concatenate([jnp.zeros_like(x_t), jnp.full_like(x_t, v)], axis=-1)
    p = d.p_mean_variance(out, x_t, t)
    np.testing.assert_allclose(p["log_variance"][:, 0, 0, 0], table[t], rtol=1e-6)
  out = jnp.concatenate([jnp.zeros_like(x_t), jnp.zeros_like(x_t)], axis=-1)
  p = d.p_mean_variance(out, x_t, t)
  mid = 0.5 * (d.log_betas[t] + d.posterior_log_variance_clipped[t])
  np.testing.assert_allclose(p["log_variance"][:, 0, 0, 0], mid, rtol=1e-6)


def test_discretized_likelihood_is_normalized():
  bins = jnp.linspace(-1.0, 1.0, 256)[:, None]
  means = jnp.full_like(bins, 0.3)
  for log_scale in (-4.0, -1.0, 0.5):
    ll = likelihood.discretized_gaussian_log_likelihood(bins, means, jnp.full_like(bins, log_scale))
    assert float(jnp.sum(jnp.exp(ll))) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
  "param,expected", [("eps", lambda s, g: min(s, g) / s), ("x0", min), ("v", lambda s, g: min(s, g) / (s + 1))]
)  # fmt: skip
def test_min_snr_weights(param, expected):
  gamma = 5.0
  d = GaussianDiffusion.create("linear", 1000, parameterization=param, min_snr_gamma=gamma)
  t = jnp.array([0, 100, 300, 600, 999], jnp.int32)
  snr = schedules.snr(schedules.alphas_cumprod(schedules.get_betas("linear", 1000)))[np.asarray(t)]
  assert snr[0] > gamma > snr[-1]  # both branches of the min are exercised
  np.testing.assert_allclose(d.snr(t), snr, rtol=1e-5)
  np.testing.assert_allclose(d.log_snr(t), np.log(snr), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d.loss_weight(t), [expected(s, gamma) for s in snr], rtol=1e-5)
  assert np.all(
    np.asarray(GaussianDiffusion.create("linear", 1000, parameterization=param).loss_weight(t)) == 1
  )


def test_hybrid_loss_finite_and_vlb_only_trains_variance():
  t_count = 100
  d = GaussianDiffusion.create("cosine", t_count, loss="hybrid")
  k1, k2 = jax.random.split(jax.random.key(2))
  x0 = jnp.round(jax.random.uniform(k1, (4, 4, 4, 2), minval=-1, maxval=1) * 127.5) / 127.5
  noise = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 50, 99], jnp.int32)

  def apply_fn(params, x_t, t, y):
    del t, y
    return jnp.concatenate([params["a"] * x_t, jnp.tanh(params["b"]) * jnp.ones_like(x_t)], -1)

  params = {"a": jnp.float32(0.3), "b": jnp.float32(0.2)}
  terms = jax.jit(lambda p: d.training_losses(lambda *a: apply_fn(p, *a), x0, t, noise))(params)
  for k in ("loss", "mse", "vlb"):
    assert terms[k].shape == (4,) and terms[k].dtype == jnp.float32
    assert np.all(np.isfinite(terms[k]))
  np.testing.assert_allclose(
    terms["loss"], terms["mse"] + 0.001 * t_count * terms["vlb"], rtol=1e-6
  )

  def term(p, name):
    return d.training_losses(lambda *a: apply_fn(p, *a), x0, t, noise)[name].mean()

  grad = jax.jit(jax.grad(term), static_argnums=1)
  g_vlb, g_mse = grad(params, "vlb"), grad(params, "mse")
  assert float(g_vlb["a"]) == 0.0 and float(g_vlb["b"]) != 0.0
  assert float(g_mse["b"]) == 0.0 and float(g_mse["a"]) != 0.0


def test_sample_timesteps_range():
  d = GaussianDiffusion.create("linear", 100)
  t = d.sample_timesteps(jax.random.key(0), 4096, 30, 40)
  assert t.shape == (4096,) and t.dtype == jnp.int32
  assert int(t.min()) == 30 and int(t.max()) == 39
  t = d.sample_timesteps(jax.random.key(1), 4096)
  assert int(t.min()) == 0 and int(t.max()) == 99
  with pytest.raises(ValueError):
    d.sample_timesteps(jax.random.key(0), 4, 50, 200)


# ------------------------------------------------------------------------------------------------
# Sampling.


def test_space_timesteps_matches_iddpm():
  assert sampling.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  assert len(sampling.space_timesteps(300, [10, 15, 20])) == 45
  assert sampling.space_timesteps(10, [3]) == [0, 4, 9]  # 4.5 rounds to even, as in IDDPM
  assert sampling.space_timesteps(100, 100) == list(range(100))
  assert sampling.space_timesteps(100, "1,2") == [0, 50, 99]
  with pytest.raises(ValueError):
    sampling.space_timesteps(10, [20])


def test_make_levels():
  np.testing.assert_array_equal(sampling.make_levels(10, 10), np.arange(10, -1, -1))
  np.testing.assert_array_equal(sampling.make_levels(100, 10)[[0, 1, -2, -1]], [100, 89, 1, 0])
  np.testing.assert_array_equal(sampling.make_levels(20, 5, 20, 10), [20, 18, 16, 14, 12, 10])
  # One step is one step from the segment's top (collab's client with a one-step share).
  np.testing.assert_array_equal(sampling.make_levels(1000, 1, 200, 0), [200, 0])
  np.testing.assert_array_equal(sampling.make_levels(50, 2), [50, 1, 0])
  whole = sampling.make_levels(100, 10)
  split = np.concatenate(
    [sampling.make_levels(100, 4, 100, 56), sampling.make_levels(100, 6, 56)[1:]]
  )
  np.testing.assert_array_equal(whole, split)
  with pytest.raises(ValueError):
    sampling.make_levels(10, 11)


def _toy_denoiser(x, t, y):
  """A smooth, t-dependent fake eps-model so chains are non-trivial."""
  del y
  return 0.5 * jnp.tanh(x) + 0.01 * t[:, None, None, None].astype(jnp.float32)


SHAPE = (2, 4, 4, 1)


def test_ddim_deterministic_ddpm_stochastic():
  d = GaussianDiffusion.create("linear", 50)
  x_T = jax.random.normal(jax.random.key(9), SHAPE)
  ddim = lambda seed: sampling.sample(
    d, _toy_denoiser, SHAPE, jax.random.key(seed), num_steps=10, sampler="ddim", x_T=x_T
  )
  np.testing.assert_array_equal(ddim(0), ddim(1))
  # One compiled program for the DDPM calls: threefry is slow to compile on CPU.
  ddpm = sampling.make_segment_sampler(d, _toy_denoiser, levels=sampling.make_levels(50, 10))
  assert not np.allclose(ddpm(x_T, jax.random.key(0)), ddpm(x_T, jax.random.key(1)))
  # Same key, same result: the noise is a function of (rng, level) only.
  np.testing.assert_array_equal(ddpm(x_T, jax.random.key(3)), ddpm(x_T, jax.random.key(3)))


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0)])
def test_segmented_equals_unsplit(sampler, eta):
  t_count = 100
  d = GaussianDiffusion.create("cosine", t_count)
  rng = jax.random.key(4)
  kw = dict(sampler=sampler, eta=eta)
  ref = sampling.sample(d, _toy_denoiser, SHAPE, rng, num_steps=10, **kw)
  one = sampling.sample_segmented(
    d, [Segment(_toy_denoiser, t_count, 0)], SHAPE, rng, steps_per_segment=[10], **kw
  )
  np.testing.assert_array_equal(one, ref)
  # make_levels(100, 10) = 100, 89, ..., 1, 0; split at 56 which is on that grid.
  segs = [Segment(_toy_denoiser, t_count, 56), Segment(_toy_denoiser, 56, 0)]
  two, bounds = sampling.sample_segmented(
    d, segs, SHAPE, rng, steps_per_segment=[4, 6], return_boundaries=True, **kw
  )
  assert len(bounds) == 1 and bounds[0].shape == SHAPE
  np.testing.assert_allclose(two, ref, atol=1e-6)
  if sampler == "ddpm":
    return  # the rest would only add slow threefry compiles
  # Resuming from the handed-over latent reproduces the tail of the chain.
  tail = sampling.sample_segmented(
    d, segs[1:], SHAPE, rng, steps_per_segment=[6], x_start=bounds[0], **kw
  )
  np.testing.assert_allclose(tail, ref, atol=1e-6)
  # The jitted single-segment helper computes the same thing.
  run = sampling.make_segment_sampler(d, _toy_denoiser, levels=sampling.make_levels(100, 10), **kw)
  np.testing.assert_allclose(run(sampling.initial_noise(rng, SHAPE), rng), ref, atol=1e-5)


def test_segmented_validation():
  d = GaussianDiffusion.create("linear", 40)
  rng = jax.random.key(0)
  with pytest.raises(ValueError, match="contiguous"):
    sampling.sample_segmented(
      d, [Segment(_toy_denoiser, 40, 10), Segment(_toy_denoiser, 9, 0)], SHAPE, rng,
      steps_per_segment=[2, 2],
    )  # fmt: skip
  with pytest.raises(ValueError, match="x_start"):
    sampling.sample_segmented(d, [Segment(_toy_denoiser, 15, 0)], SHAPE, rng, steps_per_segment=[3])
  with pytest.raises(ValueError):
    Segment(_toy_denoiser, 3, 3)


def test_chain_per_row_boundaries_row_keys_and_handoff():
  """The chain runner's per-row bounds (hybrid's splits) equal running each row alone; with row
  keys a row's result does not depend on its batch; the hand-off sees each boundary."""
  t_count = 12
  d = GaussianDiffusion.create("cosine", t_count)
  shape = (4, 4, 4, 1)
  grid = np.arange(t_count, -1, -1)
  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(jax.random.key(8), shape)
  ends = np.array([0, 5, t_count, 3], np.int32)
  start = np.full_like(ends, t_count)
  got = sampling.sample_chain(
    d, [Segment(_toy_denoiser, start, ends)], x, keys, levels=grid, sampler="ddpm"
  )
  for i, end in enumerate(ends):
    if end == t_count:  # a row with nothing to do is left as it came
      np.testing.assert_array_equal(got[i], x[i])
      continue
    alone = sampling.sample_chain(
      d, [Segment(_toy_denoiser, t_count, int(end))], x[i : i + 1], keys[i : i + 1],
      levels=grid, sampler="ddpm",
    )  # fmt: skip
    np.testing.assert_allclose(got[i], alone[0], atol=1e-6)
  # A hand-off between two sides sees the boundary latent and what it returns goes on.
  seen = []

  def handoff(latent, before, after):
    seen.append((before.side, after.side, latent.shape))
    return latent * 0.0

  segs = [Segment(_toy_denoiser, t_count, 4, "server"), Segment(_toy_denoiser, 4, 0, "client")]
  out, bounds = sampling.sample_chain(
    d, segs, x, jax.random.key(1), levels=grid, sampler="ddim", handoff=handoff,
    return_boundaries=True,
  )  # fmt: skip
  assert seen == [("server", "client", shape)] and len(bounds) == 1
  restart = sampling.sample_chain(
    d, segs[1:], jnp.zeros(shape), jax.random.key(1), levels=grid, sampler="ddim"
  )
  np.testing.assert_array_equal(out, restart)
  with pytest.raises(ValueError, match="levels of the grid"):
    sampling.sample_chain(
      d, [Segment(_toy_denoiser, t_count, 6)], x, keys, levels=sampling.make_levels(t_count, 4)
    )


@pytest.mark.parametrize(
  "param,sampler,num_steps,eta",
  [("eps", "ddpm", 100, 0.0), ("eps", "ddpm", 13, 0.0), ("eps", "ddim", 100, 0.0), ("eps", "ddim", 7, 1.0), ("v", "ddim", 20, 0.0), ("x0", "ddpm", 20, 0.0)],
)  # fmt: skip
def test_oracle_denoiser_recovers_point_mass(param, sampler, num_steps, eta):
  t_count = 100
  d = GaussianDiffusion.create("cosine", t_count, parameterization=param)
  x_star = jnp.linspace(-0.9, 0.9, 16).reshape(1, 4, 4, 1)

  def oracle(x, t, y):
    del y
    x0 = jnp.broadcast_to(x_star, x.shape)
    eps = d.eps_from_x0(x, t, x0)
    return {"eps": eps, "x0": x0, "v": d.v_from_eps_x0(eps, x0, t)}[param]

  out = sampling.sample(
    d, oracle, (3, 4, 4, 1), jax.random.key(5), num_steps=num_steps, sampler=sampler, eta=eta
  )
  np.testing.assert_allclose(out, jnp.broadcast_to(x_star, out.shape), atol=1e-3)


def test_ddpm_step_matches_p_mean_variance_with_learned_sigma():
  d = GaussianDiffusion.create("cosine", 30, loss="hybrid")
  k = 17
  x = jax.random.normal(jax.random.key(6), SHAPE)

  def denoise(x, t, y):
    del y
    return jnp.concatenate([0.5 * jnp.tanh(x), jnp.tanh(x + 0.1 * t[:, None, None, None])], -1)

  rng = jax.random.key(7)
  got = sampling.sample_segment(d, Segment(denoise, k, k - 1), x, rng, levels=[k, k - 1])
  t = jnp.full((SHAPE[0],), k - 1, jnp.int32)
  p = d.p_mean_variance(denoise(x, t, None), x, t)
  noise = jax.random.normal(jax.random.fold_in(rng, k), SHAPE)
  np.testing.assert_allclose(got, p["mean"] + jnp.exp(0.5 * p["log_variance"]) * noise, atol=1e-5)


def test_classifier_free_guidance_combines_in_eps_space():
  d = GaussianDiffusion.create("linear", 40, parameterization="v")
  null, scale = 10, 3.0
  calls = []

  def denoise(x, t, y):
    calls.append(x.shape[0])
    bias = jnp.where(y == null, -0.2, 0.1 * y.astype(jnp.float32))[:, None, None, None]
    return 0.3 * x + bias  # a v-prediction

  def combined(x, t, y):
    # The guided eps, re-expressed as the v-prediction a plain model would have to output.
    to_eps = lambda out: d.model_output_to_x0_eps(out, x, t)[1]
    eps = to_eps(denoise(x, t, jnp.full_like(y, null))) + scale * (
      to_eps(denoise(x, t, y)) - to_eps(denoise(x, t, jnp.full_like(y, null)))
    )
    return d.v_from_eps_x0(eps, d.x0_from_eps(x, t, eps), t)

  y = jnp.array([1, 3], jnp.int32)
  kw = dict(num_steps=8, sampler="ddim", y=y)
  guided = sampling.sample(
    d, denoise, SHAPE, jax.random.key(8), guidance_scale=scale, null_label=null, **kw
  )
  assert calls and all(n == 2 * SHAPE[0] for n in calls)  # one call on the doubled batch
  plain = sampling.sample(d, combined, SHAPE, jax.random.key(8), **kw)
  np.testing.assert_allclose(guided, plain, atol=1e-4)
  with pytest.raises(ValueError, match="null_label"):
    sampling.sample(d, denoise, SHAPE, jax.random.key(8), guidance_scale=scale, **kw)


def test_diffusion_is_a_pytree_usable_under_jit():
  d = GaussianDiffusion.create("cosine", 20, parameterization="v", min_snr_gamma=5.0)
  leaves = jax.tree_util.tree_leaves(d)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)

  @jax.jit
  def f(diff, x0, t, noise):
    return diff.training_losses(lambda x, t, y: 0.1 * x, x0, t, noise)["loss"]

  x0 = jnp.zeros(SHAPE)
  out = f(d, x0, jnp.array([0, 19], jnp.int32), jnp.ones(SHAPE))
  assert out.shape == (2,) and np.all(np.isfinite(out)) and math.isfinite(float(out.sum()))
