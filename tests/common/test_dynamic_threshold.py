"""The x0_hat bound option ``diffusion.x0_clipping``: "static" (clip to [-1, 1], the default) and
"dynamic" (Imagen's dynamic thresholding, the official CollaFuse sampler's), in the core's
``clip_x0`` / ``p_mean_variance`` / sampler, the DDPM baseline, collab's two sides, validation
and resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import data
from common.diffusion import sampling
from common.diffusion.gaussian import GaussianDiffusion, clip_x0
from common.train import drift, loop, validate
from common.train.method import DDPM, x0_clipping_kwargs
from common.train.validate import ConfigError
from configs import ddpm
from tests.common.test_timestep_spacing import _perturbed, tiny_config


def imagen_reference(x0: np.ndarray, percentile: float) -> np.ndarray:
  """Imagen's dynamic thresholding (imagen-pytorch ``p_mean_variance``) in float64 NumPy:
  per sample s = max(quantile(|x0|, p) over all its values, 1); x0 = clip(x0, -s, s) / s."""
  x0 = np.asarray(x0, np.float64)
  s = np.quantile(np.abs(x0).reshape(len(x0), -1), percentile, axis=-1)
  s = np.maximum(s, 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
  return np.clip(x0, -s, s) / s


def _mixed_x0(seed=0):
  """[4, 8, 8, 3]: samples 0 and 2 far outside [-1, 1] (std 3), 1 and 3 well inside (|x| < 0.9),
  so both branches of max(s, 1) are taken."""
  x = np.random.default_rng(seed).normal(size=(4, 8, 8, 3)).astype(np.float32)
  x[0::2] *= 3.0
  x[1::2] = 0.9 * np.tanh(x[1::2])
  return x


# ------------------------------------------------------------------------------------------------
# The formula.


@pytest.mark.parametrize("percentile", [0.95, 0.5, 0.995, 1.0])
def test_dynamic_matches_imagens_formula(percentile):
  x = _mixed_x0()
  got = np.asarray(clip_x0(jnp.asarray(x), "dynamic", percentile))
  np.testing.assert_allclose(got, imagen_reference(x, percentile), rtol=1e-6, atol=1e-7)
  # An overshooting sample is rescaled, not saturated: only its values beyond the threshold (a
  # 1 - p share) reach +-1, where the static clip saturates a third of them (std 3).
  assert np.abs(got).max() <= 1.0
  n = x[0].size
  saturated = np.sum(np.abs(got[0]) >= 1.0 - 1e-6)
  assert 1 <= saturated <= np.ceil((1.0 - percentile) * n) + 1
  assert np.sum(np.abs(np.clip(x[0], -1.0, 1.0)) == 1.0) > n / 4


def test_dynamic_inside_the_range_is_exactly_static():
  # s = max(quantile, 1) = 1: clip to [-1, 1] and divide by 1, bit for bit the static clip.
  x = _mixed_x0()[1::2]
  dyn = np.asarray(clip_x0(jnp.asarray(x), "dynamic", 0.95))
  np.testing.assert_array_equal(dyn, np.asarray(clip_x0(jnp.asarray(x), "static")))
  np.testing.assert_array_equal(dyn, x)
  jitted = jax.jit(clip_x0, static_argnums=(1, 2))
  np.testing.assert_array_equal(jitted(jnp.asarray(x), "dynamic", 0.95), x)
  # A sample whose 95th percentile is inside but whose few outliers are not: still the static
  # clip (s = 1), the outliers saturated.
  y = x.copy()
  y[:, 0, 0, 0] = 5.0
  np.testing.assert_array_equal(
    np.asarray(clip_x0(jnp.asarray(y), "dynamic", 0.95)), np.clip(y, -1.0, 1.0)
  )


def test_p_mean_variance_bounds_x0_and_keeps_eps_consistent():
  d = GaussianDiffusion.create("cosine", 50)
  x0 = _mixed_x0(1)
  t = jnp.asarray([49, 30, 10, 0], jnp.int32)
  eps = jnp.asarray(np.random.default_rng(2).normal(size=x0.shape), jnp.float32)
  x_t = d.q_sample(jnp.asarray(x0), t, eps)
  out = d.eps_from_x0(x_t, t, jnp.asarray(x0))  # a denoiser that predicts about x0
  p = d.p_mean_variance(out, x_t, t, x0_clipping="dynamic")
  raw = np.asarray(d.x0_from_eps(x_t, t, out))
  np.testing.assert_allclose(p["pred_x0"], imagen_reference(raw, 0.95), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
    p["pred_eps"], d.eps_from_x0(x_t, t, p["pred_x0"]), rtol=1e-5, atol=1e-5
  )
  mean, _, _ = d.q_posterior_mean_variance(p["pred_x0"], x_t, t)
  np.testing.assert_allclose(p["mean"], mean, rtol=1e-6, atol=1e-6)
  # The default is the static clip it always was.
  static = d.p_mean_variance(out, x_t, t)
  np.testing.assert_array_equal(static["pred_x0"], jnp.clip(d.x0_from_eps(x_t, t, out), -1, 1))


# ------------------------------------------------------------------------------------------------
# The sampler.


def _x0_sampler(x0_fn, **kwargs):
  """A 10-step DDPM chain over an x0-predicting "network" ``x0_fn(x)``; [2, 4, 4, 1] samples."""
  d = GaussianDiffusion.create("cosine", 50, parameterization="x0")
  fn = lambda x, t, y: x0_fn(x) + 0.01 * t[:, None, None, None].astype(jnp.float32)
  return np.asarray(
    sampling.sample(d, fn, (2, 4, 4, 1), jax.random.key(3), num_steps=10, sampler="ddpm", **kwargs)
  )


def test_sampler_differs_only_where_x0_leaves_the_range():
  wide = lambda x: 3.0 * jnp.tanh(x) + 0.5  # x0_hat beyond [-1, 1]
  static, dynamic = _x0_sampler(wide), _x0_sampler(wide, x0_clipping="dynamic")
  assert np.isfinite(dynamic).all() and np.abs(static - dynamic).max() > 1e-2
  np.testing.assert_array_equal(static, _x0_sampler(wide, x0_clipping="static"))
  narrow = lambda x: 0.5 * jnp.tanh(x)  # |x0_hat| < 1 at every step: s = 1 throughout
  # Equal up to float rounding only: inside the jitted chain XLA fuses the division by s = 1
  # with the step's arithmetic differently (1 ulp apart); clip_x0 itself is exact (above).
  np.testing.assert_allclose(
    _x0_sampler(narrow), _x0_sampler(narrow, x0_clipping="dynamic"), rtol=0, atol=1e-6
  )
  # Without clip_denoised neither bound applies.
  np.testing.assert_array_equal(
    _x0_sampler(wide, clip_denoised=False),
    _x0_sampler(wide, clip_denoised=False, x0_clipping="dynamic"),
  )


def test_sampler_refuses_a_bad_clipping():
  with pytest.raises(ValueError, match=r"unknown x0_clipping 'imagen'; allowed: static, dynamic"):
    _x0_sampler(jnp.tanh, x0_clipping="imagen")
  with pytest.raises(ValueError, match=r"dynamic_threshold_percentile must be in \(0, 1\]"):
    _x0_sampler(jnp.tanh, x0_clipping="dynamic", dynamic_threshold_percentile=95)


def test_ddpm_baseline_samples_with_the_configured_clipping():
  info = data.get_info(tiny_config().data)
  params = _perturbed(jax.jit(DDPM(tiny_config(), info).init_params)(jax.random.key(0)))
  rng, out = jax.random.key(1), {}
  for mode in ("static", "dynamic"):
    m = DDPM(tiny_config(**{"diffusion.x0_clipping": mode}), info)
    out[mode] = m.sample(params, rng, 2)
    assert m.sampling_description()["x0_clipping"] == mode
  assert np.isfinite(out["dynamic"]).all()
  assert np.abs(out["static"] - out["dynamic"]).max() > 1e-3
  m = DDPM(tiny_config(**{"diffusion.x0_clipping": "dynamic"}), info)
  assert m.sampling_description()["dynamic_threshold_percentile"] == 0.95
  assert "dynamic_threshold_percentile" not in DDPM(tiny_config(), info).sampling_description()


def test_collab_server_and_client_honour_the_clipping(monkeypatch):
  from collab import method as collab_method
  from tests.collab.test_collab import tiny

  calls, real = [], sampling.sample_chain
  monkeypatch.setattr(
    sampling, "sample_chain", lambda *a, **k: calls.append(k) or real(*a, **k)
  )  # fmt: skip
  out = {}
  for mode in ("static", "dynamic"):
    config = tiny(**{"diffusion.x0_clipping": mode, "diffusion.sample_steps": 10})
    m = collab_method.CollaFuse(config, data.get_info(config.data))
    params = _perturbed(jax.jit(m.init_params)(jax.random.key(0)))
    calls.clear()
    rng, y = jax.random.key(3), jnp.asarray([1, 2], jnp.int32)
    x_cut = m.server_handoff(params["server"], rng, (2, 8, 8, 1), y)
    client = jax.jit(lambda c: jax.tree.map(lambda a: a[1], c))(params["clients"])
    out[mode] = (np.asarray(x_cut), np.asarray(m.client_finish(client, x_cut, rng, y)))
    # One call per side, each with the configured bound.
    assert [k["x0_clipping"] for k in calls] == [mode, mode]
    assert all(k["dynamic_threshold_percentile"] == 0.95 for k in calls)
    assert m.sampling_description()["x0_clipping"] == mode
  for static, dynamic in zip(out["static"], out["dynamic"], strict=True):
    assert np.isfinite(dynamic).all() and np.abs(static - dynamic).max() > 1e-4


def test_hybrid_and_mobile_samplers_pass_the_clipping_on(monkeypatch):
  """The hybrid chain (edge and device segments) and mobile's other-resolution sampler and
  export chain hand the configured bound to the core, as the DDPM and collab samplers do."""
  from configs import hybrid as hybrid_configs
  from hybrid.models import Programs
  from mobile import export, resolution

  calls, real_chain = [], sampling.sample_chain
  monkeypatch.setattr(
    sampling, "sample_chain", lambda *a, **k: calls.append(k) or real_chain(*a, **k)
  )
  config = hybrid_configs.get_config("tiny")
  config.diffusion.x0_clipping = "dynamic"
  d = GaussianDiffusion.create("linear", config.diffusion.num_timesteps)
  programs = Programs(config, d, lambda p, x, t: 3.0 * x)
  x = jnp.ones((2, 4, 4, 1))
  programs.chain(
    None, x, jnp.asarray([5, 5]), jnp.asarray([2, 2]), jax.random.split(jax.random.key(0), 2)
  )
  assert calls and calls[-1]["x0_clipping"] == "dynamic"

  seen, real_sample = [], sampling.sample
  monkeypatch.setattr(sampling, "sample", lambda *a, **k: seen.append(k) or real_sample(*a, **k))
  config = tiny_config(**{"diffusion.x0_clipping": "dynamic"})
  m = DDPM(config, data.get_info(config.data))
  params = jax.jit(m.init_params)(jax.random.key(0))
  resolution.sample_at(m, params, jax.random.key(1), 2, 8)
  export.sampler_fn(m, params)(jnp.zeros((1, 8, 8, 1)))
  assert [k["x0_clipping"] for k in seen] == ["dynamic", "dynamic"]


# ------------------------------------------------------------------------------------------------
# Config: validation and resume.


@pytest.mark.parametrize(
  "overrides,match",
  [
    (
      {"diffusion.x0_clipping": "imagen"},
      r"^config error: diffusion.x0_clipping='imagen': allowed: static, dynamic$",
    ),
    (
      {"diffusion.dynamic_threshold_percentile": 95.0},
      r"^config error: diffusion.dynamic_threshold_percentile=95.0: must be in \(0, 1\]",
    ),
    (
      {"diffusion.dynamic_threshold_percentile": 0.0},
      r"^config error: diffusion.dynamic_threshold_percentile=0.0: must be in \(0, 1\]",
    ),
  ],
)
def test_bad_clipping_is_a_one_line_config_error(tmp_path, overrides, match):
  config = ddpm.base_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=match) as err:
    validate.validate_sampler(config)
  assert "\n" not in str(err.value)
  # The binaries (the DDPM baseline's, collab's) refuse it before anything is written.
  from tests.collab.test_collab import tiny

  for make in (tiny_config, tiny):
    with pytest.raises(ConfigError, match=match):
      loop.train(make(**overrides), str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not os.path.exists(tmp_path / "run")


def test_a_run_saved_before_the_fields_resumes_with_static_clipping(tmp_path):
  """A ``config.json`` saved before ``diffusion.x0_clipping`` existed reads as static clipping at
  0.95, the only bound there was: a resume with the defaults is no change, one asking for
  dynamic thresholding is refused unless allowed."""
  config = tiny_config()
  saved = json.loads(config.to_json_best_effort(sort_keys=True))
  del saved["diffusion"]["x0_clipping"], saved["diffusion"]["dynamic_threshold_percentile"]
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / drift.CONFIG_FILE).write_text(json.dumps(saved))
  assert drift.check_resume(str(workdir), config) == {}
  # The old config itself still validates and samples as static.
  old = ddpm.base_config()
  del old.diffusion["x0_clipping"], old.diffusion["dynamic_threshold_percentile"]
  validate.validate_sampler(old)
  assert x0_clipping_kwargs(old) == {"x0_clipping": "static", "dynamic_threshold_percentile": 0.95}
  dynamic = tiny_config(**{"diffusion.x0_clipping": "dynamic"})
  with pytest.raises(drift.ConfigDriftError, match=r"diffusion.x0_clipping: 'static' -> 'dynamic'"):
    drift.check_resume(str(workdir), dynamic)
  drift.allow(["diffusion.x0_clipping"])
  try:
    changed = drift.check_resume(str(workdir), dynamic)
  finally:
    drift.allow([])
  assert changed == {
    "diffusion.x0_clipping": {"old": "static", "new": "dynamic", "how": "--allow_config_change"}
  }
