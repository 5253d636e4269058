"""The sampling grid option ``diffusion.timestep_spacing``: uniform (IDDPM's "N") and ddim (the
DDIM paper's, IDDPM's "ddimN"), in the core, the DDPM baseline, collab's split chain and eval."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import compare, data
from common import eval as eval_lib
from common.diffusion import sampling
from common.diffusion.gaussian import GaussianDiffusion
from common.diffusion.sampling import Segment
from common.train import loop, validate
from common.train.method import DDPM
from common.train.validate import ConfigError
from configs import ddpm
from tests.common import test_train

# IDDPM's respace.space_timesteps output, written out (improved_diffusion/respace.py run by hand).
# space_timesteps(1000, [50]): one section of 1000, frac_stride = 999 / 49, round(i * stride).
IDDPM_1000_50 = [
  0, 20, 41, 61, 82, 102, 122, 143, 163, 183, 204, 224, 245, 265, 285, 306, 326, 347, 367, 387,
  408, 428, 449, 469, 489, 510, 530, 550, 571, 591, 612, 632, 652, 673, 693, 714, 734, 754, 775,
  795, 816, 836, 856, 877, 897, 917, 938, 958, 979, 999,
]  # fmt: skip
# space_timesteps(1000, "ddim50"): range(0, 1000, 20).
IDDPM_1000_DDIM50 = [
  0, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 220, 240, 260, 280, 300, 320, 340, 360, 380,
  400, 420, 440, 460, 480, 500, 520, 540, 560, 580, 600, 620, 640, 660, 680, 700, 720, 740, 760,
  780, 800, 820, 840, 860, 880, 900, 920, 940, 960, 980,
]  # fmt: skip
# space_timesteps(100, "ddim10"): range(0, 100, 10).
IDDPM_100_DDIM10 = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]


def _levels(timesteps):
  """A sampler's level grid from IDDPM's kept timesteps: 1 + t descending, then level 0."""
  return [t + 1 for t in reversed(timesteps)] + [0]


# ------------------------------------------------------------------------------------------------
# The core: make_levels on each spacing.


@pytest.mark.parametrize(
  "t_count,steps,expected", [(1000, 50, IDDPM_1000_DDIM50), (100, 10, IDDPM_100_DDIM10)]
)
def test_ddim_full_chain_is_iddpm_ddimN(t_count, steps, expected):
  levels = sampling.make_levels(t_count, steps, spacing="ddim")
  assert levels.dtype == np.int32 and len(levels) == steps + 1
  np.testing.assert_array_equal(levels, _levels(expected))
  # The last model call is at t = 0 and the first on pure noise at the grid's top, not T - 1.
  assert levels[-2:].tolist() == [1, 0] and levels[0] == expected[-1] + 1 < t_count
  assert sampling.space_timesteps(t_count, f"ddim{steps}") == expected


def test_ddim_without_a_stride_is_an_error():
  # len(range(0, 1000, s)) is 53 for s = 19 and 50 for s = 20: nothing gives 51.
  with pytest.raises(ValueError, match="51"):
    sampling.make_levels(1000, 51, spacing="ddim")
  with pytest.raises(ValueError, match="spacing"):
    sampling.make_levels(1000, 50, spacing="linear")
  config = ddpm.base_config()
  config.diffusion.update(num_timesteps=1000, sample_steps=51, timestep_spacing="ddim")
  with pytest.raises(ConfigError) as err:
    validate.validate_sampler(config)
  message = str(err.value)
  assert message.startswith("config error: diffusion.sample_steps=51: ") and "\n" not in message
  assert message.endswith("nearest that have one: 50, 53")
  config.diffusion.sample_steps = 53
  validate.validate_sampler(config)  # a stride of 19


def test_uniform_is_unchanged():
  assert sampling.space_timesteps(1000, [50]) == IDDPM_1000_50
  expected = _levels(IDDPM_1000_50)
  assert expected[:4] == [1000, 980, 959, 939]  # t = T - 1 included
  np.testing.assert_array_equal(sampling.make_levels(1000, 50), expected)
  np.testing.assert_array_equal(sampling.make_levels(1000, 50, spacing="uniform"), expected)
  # sample() is the one-segment chain it always was, bit for bit.
  d = GaussianDiffusion.create("linear", 50)
  fn = lambda x, t, y: 0.5 * jnp.tanh(x) + 0.01 * t[:, None, None, None].astype(jnp.float32)
  shape, key = (2, 4, 4, 1), jax.random.key(4)
  new = sampling.sample(d, fn, shape, key, num_steps=10, sampler="ddpm")
  old = sampling.sample_segmented(
    d, [Segment(fn, 50, 0)], shape, key, steps_per_segment=[10], sampler="ddpm"
  )
  np.testing.assert_array_equal(new, old)


def test_ddim_segments_split_the_whole_chains_grid():
  whole = sampling.make_levels(100, 10, spacing="ddim")  # 91, 81, ..., 11, 1, 0
  server = sampling.make_levels(100, 10, 100, 41, spacing="ddim")  # from the top (T) to 41
  client = sampling.make_levels(100, 10, 41, 0, spacing="ddim")
  assert server.tolist() == [91, 81, 71, 61, 51, 41] and client.tolist() == [41, 31, 21, 11, 1, 0]
  np.testing.assert_array_equal(np.concatenate([server, client[1:]]), whole)
  with pytest.raises(ValueError, match="k_end=40 is not a level"):
    sampling.make_levels(100, 10, 100, 40, spacing="ddim")
  with pytest.raises(ValueError, match="no step"):  # nothing between T and the grid's top
    sampling.make_levels(100, 10, 100, 91, spacing="ddim")


# ------------------------------------------------------------------------------------------------
# The DDPM baseline and the shared binaries.


def tiny_config(**overrides):
  """digits 8x8, a one-level U-Net, T = 100 and 10 sampler steps (both grids exist)."""
  return test_train.tiny_config(
    **{
      "model.channels": (16,),
      "model.attention_resolutions": (),
      "diffusion.num_timesteps": 100,
      "diffusion.sample_steps": 10,
      "batch_size": 8,
      "total_steps": 1,
      "ckpt_every_steps": 1,
      "num_sample_images": 2,
      "optimizer.warmup_steps": 0,
      "mesh.data": 1,
      **overrides,
    }
  )


@jax.jit  # one program, not a handful of small ones per leaf shape
def _perturbed(params):
  # The output layer starts at zero; a non-trivial network makes the grids' results differ.
  return jax.tree.map(lambda a: a + 0.01 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), params)


def test_ddpm_samples_on_each_spacing():
  info = data.get_info(tiny_config().data)
  params = _perturbed(jax.jit(DDPM(tiny_config(), info).init_params)(jax.random.key(0)))
  rng, out = jax.random.key(1), {}
  for spacing in ("uniform", "ddim"):
    m = DDPM(tiny_config(**{"diffusion.timestep_spacing": spacing}), info)
    out[spacing] = m.sample(params, rng, 2)
    assert m.sampling_description()["timestep_spacing"] == spacing
    # The method's chain is the core's full chain on that grid.
    plain = sampling.sample(
      m.diffusion, m.denoise_fn(params), out[spacing].shape, rng, num_steps=10, spacing=spacing,
      sampler="ddim", eta=0.0,
    )  # fmt: skip
    np.testing.assert_allclose(out[spacing], np.asarray(plain), atol=1e-5)
  assert all(np.isfinite(v).all() for v in out.values())
  assert np.abs(out["uniform"] - out["ddim"]).max() > 1e-3


@pytest.mark.parametrize(
  "overrides,match",
  [
    (
      {"diffusion.timestep_spacing": "ddpm"},
      r"^config error: diffusion.timestep_spacing='ddpm': allowed: uniform, ddim$",
    ),
    (
      {"diffusion.timestep_spacing": "ddim", "diffusion.sample_steps": 11},
      r"^config error: diffusion.sample_steps=11: diffusion.timestep_spacing=ddim: no stride s "
      r"gives exactly 11 steps in range\(0, 100, s\)",
    ),
  ],
)
def test_bad_spacing_is_a_one_line_config_error(tmp_path, overrides, match):
  with pytest.raises(ConfigError, match=match):
    loop.train(tiny_config(**overrides), str(tmp_path / "run"), devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "run")


def test_eval_scores_a_run_on_either_grid_and_records_it(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train(tiny_config(), workdir, devices=jax.devices()[:1])
  load = dict(use_ema=True, step=-1, sampler="", sample_steps=0)
  # Without the flag the run's own grid; with it the other one.
  own = eval_lib._load_for_eval(workdir, timestep_spacing="", **load)
  assert own.method.sampling_description()["timestep_spacing"] == "uniform"
  kw = dict(num_samples=8, batch_size=8, ref_stats_dir=str(tmp_path / "ref"), ref_max_examples=64)
  result = eval_lib.evaluate(workdir, timestep_spacing="ddim", **kw)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    assert json.load(f)["timestep_spacing"] == result["timestep_spacing"] == "ddim"
  assert np.isfinite(result["fid"])
  with pytest.raises(ConfigError, match=r"^config error: diffusion.sample_steps=11"):
    eval_lib.evaluate(workdir, timestep_spacing="ddim", sample_steps=11, **kw)
  # The report's generative table names the grid of every figure.
  paths = compare.write_report(compare.load_runs([workdir]), str(tmp_path / "report"))
  md = open(paths["md"]).read()
  assert "| timestep_spacing |" in md and "| ddim |" in md


# ------------------------------------------------------------------------------------------------
# A segmented chain: collab's server (T -> cut) and client (cut -> 0).


def collab_config(**overrides):
  from tests.collab.test_collab import tiny

  # stride 2: levels 19, 17, ..., 3, 1, 0
  return tiny(
    **{
      "collab.cut_point": 7,
      "diffusion.sample_steps": 10,
      "diffusion.timestep_spacing": "ddim",
      **overrides,
    }
  )


def test_collab_ddim_segments_concatenate_to_the_whole_chains_grid(monkeypatch):
  from collab import method as collab_method

  config = collab_config(**{"collab.server_noising": "full"})
  m = collab_method.CollaFuse(config, data.get_info(config.data))
  whole = sampling.make_levels(20, 10, spacing="ddim")
  assert whole.tolist() == [19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 0]
  assert m.steps_split() == (6, 4)
  grids = []
  real = sampling.sample_chain
  monkeypatch.setattr(
    sampling,
    "sample_chain",
    lambda *a, levels, **k: grids.append(levels) or real(*a, levels=levels, **k),
  )
  params = _perturbed(jax.jit(m.init_params)(jax.random.key(0)))
  shared = {  # every client gets exactly the server's network
    "server": params["server"],
    "clients": jax.jit(
      lambda server, clients: jax.tree.map(
        lambda s, c: jnp.broadcast_to(s, c.shape), server, clients
      )
    )(params["server"], params["clients"]),
  }
  rng, y = jax.random.key(3), jnp.asarray([1, 2], jnp.int32)
  split = m.sample_client(shared, 1, rng, 2, y)
  server_grid, client_grid = (np.asarray(g) for g in grids)
  assert server_grid.tolist() == [19, 17, 15, 13, 11, 9, 7]
  assert client_grid.tolist() == [7, 5, 3, 1, 0]
  np.testing.assert_array_equal(np.concatenate([server_grid, client_grid[1:]]), whole)
  # With one network on both sides the split chain is the unsplit DDIM chain.
  x_T = jax.random.normal(jax.random.fold_in(rng, 1 << 20), (2, 8, 8, 1))
  fn = lambda x, t, yy: m.apply(shared["server"], x, t, yy)
  plain = real(
    m.diffusion, [Segment(fn, 19, 0)], x_T, rng, levels=whole, sampler="ddpm", y=y,
  )  # fmt: skip
  np.testing.assert_allclose(split, np.asarray(plain), atol=1e-5)


def test_collab_cut_off_the_ddim_grid_is_a_config_error():
  from collab import method as collab_method

  config = collab_config(**{"collab.cut_point": 8})
  with pytest.raises(ConfigError) as err:
    collab_method.CollaFuse(config, data.get_info(config.data))
  message = str(err.value)
  assert message.startswith("config error: diffusion.timestep_spacing='ddim': collab.cut_point=8")
  assert "nearest: 7, 9" in message and "\n" not in message
  # The uniform grid spaces each side's own steps: any cut point works there.
  collab_method.CollaFuse(
    collab_config(**{"collab.cut_point": 8, "diffusion.timestep_spacing": "uniform"}),
    data.get_info(config.data),
  )


def test_tdc_groups_split_the_ddim_grid_where_a_steps_group_changes():
  # adaptive's chain is one segment per timestep group over the sampler's one grid: on the DDIM
  # grid its boundaries are grid levels by construction (t = 60 and 25 lie between grid steps: the
  # boundary is the first level whose step is in the next group), and it routes DDIM's timesteps.
  from adaptive import routing
  from adaptive.grouping import Groups

  config = tiny_config(**{"diffusion.timestep_spacing": "ddim"})
  np.testing.assert_array_equal(routing.sampler_timesteps(config), IDDPM_100_DDIM10[::-1])
  levels = sampling.make_levels(100, 10, spacing="ddim")
  fns = [lambda x, t, y: x] * 3
  segments = routing.group_segments(Groups((25, 60), 100), fns, levels)
  assert [(s.k_start, s.k_end, s.side) for s in segments] == [
    (91, 51, "group2"), (51, 21, "group1"), (21, 0, "group0"),
  ]  # fmt: skip


def test_a_run_saved_before_the_field_resumes_on_its_grid():
  """A config saved before ``diffusion.timestep_spacing`` existed reads as ``uniform``, the only
  grid there was: a resume with the default is no change, one asking for ``ddim`` is."""
  from common.train import drift

  saved = {"diffusion": {"sample_steps": 50}}
  assert (
    drift.differences(saved, {"diffusion": {"sample_steps": 50, "timestep_spacing": "uniform"}})
    == {}
  )
  changed = drift.differences(
    saved, {"diffusion": {"sample_steps": 50, "timestep_spacing": "ddim"}}
  )
  assert changed == {"diffusion.timestep_spacing": {"old": "uniform", "new": "ddim"}}
