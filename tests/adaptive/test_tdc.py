"""The TDC method: per-group batches and timesteps, routed sampling, FLOPs, held-out losses, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive import heldout
from adaptive import method as tdc_method
from common import data
from common.train.validate import ConfigError
from configs import adaptive as adaptive_config


def tiny(**overrides):
  c = adaptive_config.get_config("digits")
  c.model.channels = (8, 16)
  c.model.num_res_blocks = 1
  c.model.attention_resolutions = ()
  c.diffusion.num_timesteps = 20
  c.diffusion.sample_steps = 5
  c.batch_size = 4
  c.adaptive.cuts = [8]
  c.adaptive.group_models = [{}, {"channels": [4, 8]}]
  c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return c


def make(config):
  return tdc_method.TDC(config, data.get_info(config.data))


def test_each_group_trains_on_its_own_batch_part_and_timesteps():
  m = make(tiny())
  assert [g.timestep_range() for g in m.members] == [(0, 8), (8, 20)]
  assert m.images_per_step() == 8
  # Each call one program: run op by op, this test compiled ~1,000 small programs (30 s).
  params = jax.jit(m.init_params)(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)), jnp.float32)
  batch = {"image": x, "label": jnp.zeros((8,), jnp.int32)}
  loss_fn = jax.jit(lambda p, b: m.loss_fn(p, b, jax.random.key(1), 0))

  @jax.jit
  def grads(b):
    return jax.grad(lambda p: loss_fn(p, b)[0])(params)

  g0 = grads(batch)
  changed = dict(batch, image=batch["image"].at[4:].set(0.0))  # group 1's half only
  g1 = grads(changed)
  for a, b in zip(jax.tree.leaves(g0["group0"]), jax.tree.leaves(g1["group0"]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(g0["group1"]), jax.tree.leaves(g1["group1"]), strict=True)
  )
  _, metrics = loss_fn(params, batch)
  assert {"loss/group0", "loss/group1", "vlb/group1"} <= set(metrics)


def test_structures_differ_per_group_and_flops_follow_the_sampler_steps():
  m = make(tiny())
  params = jax.jit(m.init_params)(jax.random.key(0))
  w0 = params["group0"]["out_conv"]["kernel"].shape[-2]
  w1 = params["group1"]["out_conv"]["kernel"].shape[-2]
  assert (w0, w1) == (8, 4)
  ts = m.sampler_timesteps()
  assert len(ts) == 5 and ts[-1] == 0
  per_step = m.flops_per_step(params)
  assert per_step[0] > 2 * per_step[1]
  expected = sum(per_step[0] if t < 8 else per_step[1] for t in ts)
  assert m.flops_per_sample(params) == pytest.approx(expected)
  costs = m.cost_description(params)
  assert costs["group_sampling_steps"] == [int((ts < 8).sum()), int((ts >= 8).sum())]
  images = m.sample(params, jax.random.key(2), 3)
  assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all()
  # Classifier-free guidance runs each network twice a step, and is counted once.
  cond = make(tiny(model__class_conditional=True))
  guided = make(tiny(model__class_conditional=True, diffusion__guidance_scale=2.0))
  cond_params = jax.jit(cond.init_params)(jax.random.key(0))
  assert guided.flops_per_sample(cond_params) == pytest.approx(
    2 * cond.flops_per_sample(cond_params)
  )


def test_heldout_losses_are_paired_and_a_single_model_scores_the_same_per_group():
  m = make(tiny(adaptive__group_models=[]))
  params = jax.jit(m.init_params)(jax.random.key(0))

  # Zero-initialised output convs make every fresh network predict 0: perturb one (one program).
  @jax.jit
  def perturbed(tree):
    leaves, treedef = jax.tree.flatten(tree)
    noise = [0.1 * jax.random.normal(jax.random.key(i), a.shape) for i, a in enumerate(leaves)]
    return jax.tree.unflatten(treedef, [a + n for a, n in zip(leaves, noise, strict=True)])

  params["group1"] = perturbed(params["group1"])
  x0, _ = data.load_split(m.config.data, "test")
  draws = heldout.fixed_draws(m.groups, x0, per_group=6, seed=3)
  again = heldout.fixed_draws(m.groups, x0, per_group=6, seed=3)
  for a, b in zip(draws.noise, again.noise, strict=True):
    np.testing.assert_array_equal(a, b)
  assert draws.t[0].max() < 8 <= draws.t[1].min()
  fn = heldout.make_terms_fn(m.diffusion, m.members[0].apply)
  same = heldout.heldout_losses(
    m.diffusion, m.groups, [(fn, params["group0"])] * 2, x0, draws, batch_size=4
  )
  routed = heldout.heldout_losses(
    m.diffusion,
    m.groups,
    [(fn, params["group0"]), (fn, params["group1"])],
    x0,
    draws,
    batch_size=4,
  )
  assert same["groups"][0] == routed["groups"][0]  # same network, same draws
  assert same["groups"][1]["l_simple"] != routed["groups"][1]["l_simple"]
  sizes = np.array([8, 12])
  total = np.dot(sizes, [g["l_simple"] for g in same["groups"]]) / 20
  assert same["l_simple"] == pytest.approx(total)
  assert same["prior_bpd"] > 0 and same["vlb_bpd"] > same["prior_bpd"]


def test_bad_group_config_is_refused():
  info = data.get_info(tiny().data)
  with pytest.raises(ConfigError, match="group_models"):
    tdc_method.TDC(tiny(adaptive__group_models=[{}]), info)
  with pytest.raises(ConfigError, match="cuts"):
    tdc_method.TDC(tiny(adaptive__cuts=[25]), info)
  with pytest.raises(ConfigError, match="not a model"):
    tdc_method.TDC(tiny(adaptive__group_models=[{}, {"widths": [4, 8]}]), info)


def test_tdc_samples_through_its_group_chain_as_the_routed_sampler_did():
  """TDC's ``sample`` runs one segment per group over the sampler's grid; the pre-chain path (the
  routed denoiser in one segment) gives the same samples, bit for bit."""
  from common.diffusion import sampling
  from tests.hybrid.test_hybrid_models import random_params

  config = tiny(**{"diffusion.sample_steps": 7})
  m = tdc_method.TDC(config, data.get_info(config.data))
  params = random_params(m, 4)
  rng = jax.random.PRNGKey(2)
  got = m.sample(params, rng, 3)
  d, res = config.diffusion, m.data_info.resolution
  want = sampling.sample(
    m.diffusion, m.denoise_fn(params), (3, res, res, m.data_info.channels), rng,
    num_steps=d.sample_steps, sampler=d.sampler, eta=d.ddim_eta, clip_denoised=d.clip_denoised,
  )  # fmt: skip
  np.testing.assert_array_equal(got, np.asarray(want))
  levels = sampling.make_levels(d.num_timesteps, d.sample_steps)
  assert len(m.sampling_chain(params, levels)) == m.groups.num_groups > 1
