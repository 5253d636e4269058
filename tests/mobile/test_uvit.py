"""The U-ViT baseline (``mobile/uvit.py``): shapes through the mobile method, the presets' stated
sizes, what its positional table and long skips do, a tiny run through the shared loop, and
config errors that name the field.

Shape checks are abstract (``jax.eval_shape``); the numerical tests compile at 8x8 with D <= 32.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common import data, models
from common.eval import load_params
from common.metrics.flops import count_flops
from common.train import loop
from common.train.validate import ConfigError
from configs import mobile as mobile_configs
from mobile import uvit
from mobile.method import Mobile
from mobile.uvit import UViT, UViTSpec

DIGITS = data.DatasetInfo("digits", 1497, 300, 8, 1, 10, tuple(str(i) for i in range(10)))

# The sizes stated next to the presets in configs/mobile.py (`python -m mobile.sizes`).
STATED_PARAMS = {
  "digits_uvit_params1": 482_958,
  "digits_uvit_flops1": 267_278,
  "digits_uvit_params2": 485_643,
  "digits_uvit_flops2": 286_847,
  "digits_uvit_tiny": 10_686,
  "celeba64_uvit": 44_292_228,
}
TFDIFF_PARAMS = {"digits_config1": 495_364, "digits_config2": 493_633}


def spec(**kw) -> UViTSpec:
  base = dict(image_size=8, in_channels=1, out_channels=1, patch_size=2, width=32, depth=3,
              num_heads=4)  # fmt: skip
  base.update(kw)
  return UViTSpec(**base)


def randomized(sp: UViTSpec, seed: int = 0, scale: float = 0.2):
  """(graphdef, state) with every parameter drawn from numpy (no eager init compiles)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: UViT(sp, rngs=nnx.Rngs(0))), nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  return graphdef, jax.tree.unflatten(treedef, leaves)


def noisy_batch(batch=2, resolution=8, channels=1):
  x = jax.random.normal(jax.random.key(1), (batch, resolution, resolution, channels))
  return x, jnp.arange(batch, dtype=jnp.int32) * 7


def method_spec(method: Mobile) -> UViTSpec:
  info = method.data_info
  return uvit.spec_from_config(
    method.config, in_channels=info.channels, num_classes=info.num_classes
  )


def preset(name="digits_uvit_tiny", **overrides):
  c = mobile_configs.get_config(name)
  c.mesh.data = 1
  c.update_from_flattened_dict(overrides)
  return c


# --- the network behind the DDPM method's interface --------------------------------------------


@pytest.mark.parametrize(
  "overrides,labels,channels",
  [
    ({}, None, 1),
    ({"model.class_conditional": True}, "labels", 1),
    ({"model.class_conditional": True}, None, 1),  # the null label
    ({"diffusion.loss": "hybrid"}, None, 2),  # learned variances
    ({"model.class_conditional": True, "diffusion.loss": "hybrid", "model.dtype": "bfloat16"},
     "labels", 2),
  ],
)  # fmt: skip
def test_output_shape_and_dtype_through_the_method(overrides, labels, channels):
  method = Mobile(preset(**overrides), DIGITS)
  params = jax.eval_shape(method.init_params, jax.random.key(0))
  x, t = noisy_batch(batch=3)
  y = jnp.array([0, 9, 10], jnp.int32) if labels else None
  out = jax.eval_shape(lambda p: method.apply(p, x, t, y), params)
  assert out.shape == (3, 8, 8, channels) and out.dtype == jnp.float32
  assert "uvit" in models.registered_models()


def test_missing_label_is_the_null_label():
  sp = spec(num_classes=10)
  graphdef, state = randomized(sp)
  x, t = noisy_batch()
  run = jax.jit(lambda y: nnx.merge(graphdef, state)(x, t, y))
  null, missing = run(jnp.array([10, 10], jnp.int32)), run(None)
  np.testing.assert_array_equal(null, missing)
  assert float(jnp.abs(run(jnp.array([3, 3], jnp.int32)) - null).max()) > 1e-3


# --- sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STATED_PARAMS))
def test_preset_parameter_count_is_the_stated_one(name):
  config = mobile_configs.get_config(name)
  info = DIGITS if name.startswith("digits") else data.DatasetInfo("celeba64", 1, 1, 64, 3, 0, ())
  method = Mobile(config, info)
  params = jax.eval_shape(method.init_params, jax.random.key(0))
  got = models.count_params(params)
  assert got == STATED_PARAMS[name]
  sp = uvit.spec_from_config(config, in_channels=info.channels, num_classes=info.num_classes)
  assert uvit.param_count(sp) == got
  # The parameter-matched presets are within 3% of the TFDiff configuration they stand against.
  if "params" in name:
    assert got == pytest.approx(TFDIFF_PARAMS["digits_config" + name[-1]], rel=0.03)


@pytest.mark.parametrize(
  "kw",
  [
    dict(num_classes=10, out_channels=2, qkv_bias=True, time_mlp=True),
    dict(patch_size=4, depth=5, long_skips=False, final_conv=False, pos_emb="none"),
    dict(patch_size=1, width=24, depth=1, num_heads=3, in_channels=3, out_channels=3),
  ],
)
def test_param_formula_equals_parameter_tree(kw):
  sp = spec(**kw)
  assert models.count_params(nnx.eval_shape(lambda: UViT(sp, rngs=nnx.Rngs(0)))) == (
    uvit.param_count(sp)
  )


def test_flops_matched_preset_is_within_5_percent_of_config_i():
  def per_call(name):
    method = Mobile(mobile_configs.get_config(name), DIGITS)
    return method.denoiser_call_flops(jax.eval_shape(method.init_params, jax.random.key(0)), 1)

  assert per_call("digits_uvit_flops1") == pytest.approx(per_call("digits_config1"), rel=0.05)


def test_sizes_binary_measures_a_preset_as_the_run_counts_it():
  from mobile import sizes

  r = sizes.measure("digits_uvit_tiny")
  assert r["model"] == "uvit" and r["params"] == STATED_PARAMS["digits_uvit_tiny"]
  # The figure eval records (the method's own count over the chain: DDIM-3, unguided).
  method = Mobile(mobile_configs.get_config("digits_uvit_tiny"), DIGITS)
  params = jax.eval_shape(method.init_params, jax.random.key(0))
  assert r["flops_per_sample"] == method.flops_per_sample(params) == 3 * r["flops_per_call"] > 0


# --- what the positional table and the long skips do --------------------------------------------


def _patch_permutation_gap(sp: UViTSpec) -> float:
  """max |f(P x) - P f(x)| / mean |f(x)| for a random permutation P of whole p x p patches."""
  graphdef, state = randomized(sp)
  x, t = noisy_batch()
  b, r, p = x.shape[0], sp.image_size, sp.patch_size
  g = r // p
  perm = jax.random.permutation(jax.random.key(2), g * g)

  def permute(a):
    c = a.shape[-1]
    patches = a.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p, p, c)
    patches = patches[:, perm].reshape(b, g, g, p, p, c)
    return patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, r, r, c)

  run = jax.jit(lambda xx: nnx.merge(graphdef, state)(xx, t))
  out, out_of_permuted = run(x), run(permute(x))
  return float(jnp.abs(out_of_permuted - permute(out)).max() / jnp.abs(out).mean())


def test_positional_table_is_what_tells_patches_apart():
  # Without the table (and the final 3x3 conv) every layer acts per patch or is attention over
  # tokens, so the network is exactly equivariant to patch permutations, as TFDiff's
  # pure-attention variant is to pixel permutations (test_model.py)...
  assert _patch_permutation_gap(spec(pos_emb="none", final_conv=False)) < 1e-4
  # ... and the learned table alone breaks that: U-ViT's spatial layout comes from it.
  assert _patch_permutation_gap(spec(final_conv=False)) > 0.1


def test_long_skips_carry_signal_from_in_to_out_blocks():
  sp = spec(depth=5)
  graphdef, state = randomized(sp)
  model = nnx.merge(graphdef, state)
  assert len(model.in_blocks) == len(model.out_blocks) == 2
  assert all(b.skip_linear is not None for b in model.out_blocks)
  assert all(b.skip_linear is None for b in [*model.in_blocks, model.mid_block])
  # Zero the rows of each skip linear that read the skip (its input is concat(x, skip)).
  d = sp.width
  params = nnx.to_pure_dict(state)
  cut = jax.tree.map(lambda a: a, params)
  for i in range(len(model.out_blocks)):
    skip_linear = cut["out_blocks"][i]["skip_linear"]
    skip_linear["kernel"] = skip_linear["kernel"].at[d:].set(0.0)
  x, t = noisy_batch()
  run = jax.jit(lambda st: nnx.merge(graphdef, st)(x, t))
  with_skips, without = run(params), run(cut)
  assert float(jnp.abs(with_skips - without).mean() / jnp.abs(with_skips).mean()) > 0.01
  # And the switch removes exactly the N/2 linears (2D -> D).
  off = spec(depth=5, long_skips=False)
  assert uvit.param_count(sp) - uvit.param_count(off) == 2 * (2 * d * d + d)


# --- the shared loop --------------------------------------------------------------------------------


def test_tiny_preset_trains_through_the_shared_loop(tmp_path):
  # Conditional with CFG dropout and guided sampling, learned variances: every route at once.
  config = preset(
    **{"model.class_conditional": True, "diffusion.cond_drop_prob": 0.1,
       "diffusion.guidance_scale": 2.0, "diffusion.loss": "hybrid", "total_steps": 3}
  )  # fmt: skip
  workdir = str(tmp_path / "run")
  loop.train(config, workdir, devices=jax.devices()[:1])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in records)
  config, method, params, step = load_params(workdir)
  assert step == 3 and isinstance(method, Mobile) and config.model.name == "uvit"
  sp = method_spec(method)
  assert sp.num_classes == 10 and sp.out_channels == 2
  # The unconditional tiny preset + an 11-row label table, a label row in the positional table,
  # and the decoder and final conv at 2 output channels: 176 + 16 + 68 + 28.
  assert (
    models.count_params(params) == uvit.param_count(sp) == STATED_PARAMS["digits_uvit_tiny"] + 288
  )
  # Every block is counted (no scan): the method's FLOPs equal the network's, twice under CFG.
  x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  t = y = jax.ShapeDtypeStruct((1,), jnp.int32)
  per_call = count_flops(lambda p, x, t, y: method.apply(p, x, t, y), params, x, t, y)
  assert method.flops_per_sample(params) == 2 * config.diffusion.sample_steps * per_call


# --- config errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name,overrides,field,words",
  [
    ("digits_uvit_tiny", {"model.patch_size": 3}, "model.patch_size", "data.resolution=8"),
    ("digits_uvit_tiny", {"model.depth": 4}, "model.depth", "N odd"),
    ("digits_uvit_tiny", {"model.width": 30, "model.num_heads": 4}, "model.num_heads",
     "model.width=30"),
    ("digits_uvit_tiny", {"model.pos_emb": "sincos"}, "model.pos_emb", "allowed"),
    ("digits_uvit_tiny", {"model.dropout": 0.1}, "model.dropout", "no dropout"),
    ("digits_config1", {"model.name": "uvit"}, "model.patch_size", "digits_uvit_"),
  ],
)  # fmt: skip
def test_bad_config_is_one_line_naming_the_field(name, overrides, field, words):
  with pytest.raises(ConfigError) as err:
    loop.setup(preset(name, **overrides), devices=jax.devices()[:1])
  msg = str(err.value)
  assert msg.startswith(f"config error: {field}=") and words in msg and "\n" not in msg


def test_m7_unet_arm_has_config_is_training_compute():
  """The U-Net arm (``digits_unet``): 466,153 params, and steps x FLOPs a call = Config I's to
  0.1% (the same batch), which is what makes M7's comparison one at equal training compute."""

  def measure(name):
    config = mobile_configs.get_config(name)
    method = Mobile(config, DIGITS)
    params = jax.eval_shape(method.init_params, jax.random.key(0))
    return config, models.count_params(params), method.denoiser_call_flops(params, 1)

  c1, _, f1 = measure("digits_config1")
  cu, n_unet, fu = measure("digits_unet")
  assert cu.model.name == "unet" and n_unet == 466_153 and cu.batch_size == c1.batch_size
  assert cu.total_steps * fu == pytest.approx(c1.total_steps * f1, rel=1e-3)
