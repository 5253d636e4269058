"""Tests for common.models: the ADM/IDDPM U-Net and the model registry.

CPU cost is dominated by XLA compiles (one per initializer shape for a real init, one per
jitted forward), so most models here are built abstractly and filled with numpy weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.models import UNet, build_model, count_params, register, registered_models
from common.models.unet import timestep_embedding
from configs import ddpm

# Published sizes (Nichol & Dhariwal 2021, "Improved DDPM"; openai/improved-diffusion with
# learn_sigma): CIFAR-10 model 52.5M, ImageNet-64 model ~120M. IDDPM resamples with plain
# convs, i.e. resblock_updown=False here.
_PUBLISHED = {"cifar10": 52.5e6, "imagenet64": 120e6}
_IDDPM_COUNTS = {"cifar10": 52_546_438, "imagenet64": 121_063_942}
# The same networks with resblock_updown=True (ADM's resampling ResBlocks): ~8% more.
_ADM_COUNTS = {"cifar10": 57_094_662, "imagenet64": 129_384_070}

_SMALL = dict(
  image_size=8,
  in_channels=3,
  out_channels=6,
  channels=(24, 40),  # not multiples of 32: GroupNorm falls back to gcd(32, w) = 8 groups
  num_res_blocks=(1, 2),
  attention_resolutions=(4,),
  num_heads=4,
  dropout=0.5,
  num_classes=3,
)
_TINY = dict(
  image_size=8,
  in_channels=1,
  out_channels=2,
  channels=(16,),
  num_res_blocks=1,
  attention_resolutions=(8,),
  dropout=0.5,
  num_classes=2,
)


def _reference_param_count(
  *, image_size, in_channels, out_channels, channels, num_res_blocks, attention_resolutions,
  num_classes=0, resblock_updown=True, **_,
):  # fmt: skip
  """Independent count from improved-diffusion's / guided-diffusion's PyTorch layer shapes."""
  conv = lambda i, o, k: i * o * k * k + o
  lin = lambda i, o: i * o + o
  gn = lambda c: 2 * c
  emb = 4 * channels[0]
  nrb = [num_res_blocks] * len(channels) if isinstance(num_res_blocks, int) else num_res_blocks

  def res(i, o):
    skip = conv(i, o, 1) if i != o else 0
    return gn(i) + conv(i, o, 3) + lin(emb, 2 * o) + gn(o) + conv(o, o, 3) + skip

  def attn(c, px=None):  # px=None: the middle block, which always has attention
    if px is not None and px not in attention_resolutions:
      return 0
    return gn(c) + lin(c, 3 * c) + lin(c, c)

  resample = lambda c: res(c, c) if resblock_updown else conv(c, c, 3)
  n = lin(channels[0], emb) + lin(emb, emb) + conv(in_channels, channels[0], 3)
  n += (num_classes + 1) * emb if num_classes else 0
  skips, ch, px = [channels[0]], channels[0], image_size
  for level, width in enumerate(channels):
    for _ in range(nrb[level]):
      n += res(ch, width) + attn(width, px)
      ch = width
      skips.append(ch)
    if level != len(channels) - 1:
      n += resample(ch)
      skips.append(ch)
      px //= 2
  n += 2 * res(ch, ch) + attn(ch)
  for level in reversed(range(len(channels))):
    for i in range(nrb[level] + 1):
      n += res(ch + skips.pop(), channels[level]) + attn(channels[level], px)
      ch = channels[level]
      if level and i == nrb[level]:
        n += resample(ch)
        px *= 2
  return n + gn(ch) + conv(ch, out_channels, 3)


def _trace_init(make):
  """(graphdef, abstract params) of ``make()`` without allocating or running initializers."""
  box = {}

  def init():
    graphdef, params = nnx.split(make())
    box["graphdef"] = graphdef  # static, so it leaves the trace through the closure
    return params

  params = jax.eval_shape(init)
  return box["graphdef"], params


def _abstract(config, *, num_classes=0, in_channels=3):
  return _trace_init(
    lambda: build_model(config, in_channels=in_channels, num_classes=num_classes, rngs=nnx.Rngs(0))
  )


def _materialize(params, seed=0):
  """Random, non-zero parameters from numpy (no per-shape XLA compiles, no zero layers)."""
  rng = np.random.default_rng(seed)

  def fill(path, p):
    noise = rng.standard_normal(p.shape)
    if "'scale'" in jax.tree_util.keystr(path):  # GroupNorm gains stay near 1
      value = 1.0 + 0.1 * noise
    elif len(p.shape) >= 2:
      value = noise / np.sqrt(np.prod(p.shape[:-1]))
    else:
      value = 0.1 * noise
    return jnp.asarray(value, p.dtype)

  return jax.tree_util.tree_map_with_path(fill, params)


def _small_model(**override):
  graphdef, params = _trace_init(lambda: UNet(**dict(_SMALL, **override), rngs=nnx.Rngs(0)))
  return nnx.merge(graphdef, _materialize(params))


@pytest.fixture(scope="module")
def tiny():
  """A one-level class-conditional model (really initialised) and its jitted pure forward.

  One level keeps both the initializer shapes and the forward graph (each an XLA compile on
  CPU) small; resampling paths are exercised by the preset and _SMALL tests.
  """
  model = UNet(**_TINY, rngs=nnx.Rngs(0))
  # The trainer's pattern: params only, a pure jitted function, merge inside.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fwd = jax.jit(lambda p, x, t, y, k: nnx.merge(graphdef, p)(x, t, y, dropout_rng=k))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t = jnp.array([3, 700], jnp.int32)
  return model, rest, params, _materialize(params), fwd, x, t


def test_timestep_embedding_matches_formula():
  emb = timestep_embedding(jnp.array([0, 5.5]), 7)
  assert emb.shape == (2, 7) and emb.dtype == jnp.float32
  np.testing.assert_allclose(emb[0], [1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
  np.testing.assert_allclose(emb[1, :6], np.r_[np.cos(5.5 * freqs), np.sin(5.5 * freqs)], 1e-5)


@pytest.mark.parametrize("preset", ["cifar10", "imagenet64"])
def test_paper_scale_presets(preset):
  c = ddpm.get_config(preset)
  graphdef, params = _abstract(c)
  r = c.data.resolution
  x = jax.ShapeDtypeStruct((2, r, r, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  out = jax.eval_shape(lambda p, x, t: nnx.merge(graphdef, p)(x, t), params, x, t)
  assert out.shape == (2, r, r, 6) and out.dtype == jnp.float32

  kw = dict(
    image_size=r,
    in_channels=3,
    out_channels=6,
    channels=c.model.channels,
    num_res_blocks=c.model.num_res_blocks,
    attention_resolutions=c.model.attention_resolutions,
  )
  updown = c.model.resblock_updown
  expected = (_ADM_COUNTS if updown else _IDDPM_COUNTS)[preset]
  assert count_params(params) == expected == _reference_param_count(**kw, resblock_updown=updown)
  # IDDPM's own network (conv resampling): the reference count, validated against built
  # models here and in test_conv_resampling_variant, must land on the published size.
  for flag, counts in ((False, _IDDPM_COUNTS), (True, _ADM_COUNTS)):
    assert _reference_param_count(**kw, resblock_updown=flag) == counts[preset]
  assert abs(_IDDPM_COUNTS[preset] / _PUBLISHED[preset] - 1) < 0.02


@pytest.mark.parametrize("preset", ["celeba64", "ffhq64"])
def test_face_presets_are_the_imagenet64_network(preset):
  # Same inputs to build_model as imagenet64, hence the same shapes and count, without
  # paying for another abstract build of a 129M-parameter model.
  c, ref = ddpm.get_config(preset), ddpm.get_config("imagenet64")
  assert c.model.to_dict() == ref.model.to_dict()
  assert (c.data.resolution, c.diffusion.loss) == (ref.data.resolution, ref.diffusion.loss)


@pytest.mark.parametrize("preset,in_channels,num_classes", [("digits", 1, 10), ("shapes", 3, 4)])
def test_tiny_presets_forward(preset, in_channels, num_classes):
  c = ddpm.get_config(preset)
  graphdef, params = _abstract(c, num_classes=num_classes, in_channels=in_channels)
  assert ("label_emb" in params) == c.model.class_conditional
  r = c.data.resolution
  out = jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y))(
    _materialize(params), jnp.ones((2, r, r, in_channels)), jnp.array([0, 999]), jnp.array([0, 1])
  )
  assert out.shape == (2, r, r, in_channels) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.abs(out).max()) > 0


def test_real_init_params_only_and_zero_output(tiny):
  model, rest, params, _, fwd, x, t = tiny
  leaves = jax.tree.leaves(nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert leaves and all(type(v) is nnx.Param for v in leaves)
  assert all(v.get_value().dtype == jnp.float32 for v in leaves)
  assert not jax.tree.leaves(rest)
  out = fwd(params, x, t, jnp.array([0, 1]), None)
  assert out.shape == (2, 8, 8, 2) and out.dtype == jnp.float32
  # Zero-initialised output conv (IDDPM zero_module): the untrained model predicts exactly 0.
  assert float(jnp.abs(out).max()) == 0.0


def test_class_conditioning(tiny):
  *_, params, fwd, x, t = tiny
  a = fwd(params, x, t, jnp.array([0, 1]), None)
  b = fwd(params, x, t, jnp.array([1, 0]), None)
  assert float(jnp.abs(a - b).min()) > 0  # every pixel of both examples depends on the label
  null = fwd(params, x, t, jnp.full((2,), _TINY["num_classes"]), None)
  assert float(jnp.abs(a - null).max()) > 1e-3
  np.testing.assert_array_equal(fwd(params, x, t, None, None), null)


def test_dropout(tiny):
  *_, params, fwd, x, t = tiny
  y = jnp.array([0, 1])
  base = fwd(params, x, t, y, None)
  np.testing.assert_array_equal(fwd(params, x, t, y, None), base)  # no key: deterministic
  a = fwd(params, x, t, y, jax.random.key(7))
  np.testing.assert_array_equal(fwd(params, x, t, y, jax.random.key(7)), a)
  assert float(jnp.abs(a - base).max()) > 1e-3
  c = fwd(params, x, t, y, jax.random.key(8))
  assert float(jnp.abs(a - c).max()) > 1e-3


def test_bfloat16_compute_close_to_float32(tiny):
  *_, params, fwd, x, t = tiny
  graphdef16, params16 = _trace_init(lambda: UNet(**_TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  y = jnp.array([0, 1])
  ref = fwd(params, x, t, y, None)
  out = jax.jit(lambda p: nnx.merge(graphdef16, p)(x, t, y))(params)  # the same f32 params
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 0.05


def test_conv_resampling_variant():
  kw = dict(_SMALL, resblock_updown=False, num_classes=0, num_head_channels=8)
  graphdef, params = _trace_init(lambda: UNet(**kw, rngs=nnx.Rngs(0)))
  assert count_params(params) == _reference_param_count(**kw)
  assert count_params(_small_model()) == _reference_param_count(**_SMALL)
  assert not hasattr(nnx.merge(graphdef, params).input_blocks[2].layers[0], "resample")
  x, t = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jnp.array([1])  # ignored by an unconditional model
  out = jax.eval_shape(lambda p, x, t: nnx.merge(graphdef, p)(x, t, y), params, x, t)
  assert out.shape == (1, 8, 8, 6) and out.dtype == jnp.float32


@pytest.mark.parametrize(
  "override,match",
  [
    (dict(image_size=9), "not divisible by 2"),
    (dict(attention_resolutions=(2,)), "attention resolutions"),
    (dict(num_heads=7), "num_heads"),
    (dict(num_head_channels=16), "num_head_channels"),
    (dict(num_res_blocks=(1,)), "num_res_blocks"),
  ],
)
def test_bad_construction_raises(override, match):
  with pytest.raises(ValueError, match=match):
    _small_model(**override)


def test_registry():
  assert "unet" in registered_models()
  c = ddpm.get_config("digits")
  c.model.name = "no_such_net"
  with pytest.raises(ValueError, match="registered: .*'unet'"):
    build_model(c, in_channels=3, num_classes=0, rngs=nnx.Rngs(0))

  @register("test_models_tiny")
  def _tiny(config, *, in_channels, num_classes, rngs):
    return nnx.Linear(in_channels, config.data.resolution + num_classes, rngs=rngs)

  c.model.name = "test_models_tiny"
  model = build_model(c, in_channels=3, num_classes=2, rngs=nnx.Rngs(0))
  assert isinstance(model, nnx.Linear) and "test_models_tiny" in registered_models()
  n_out = c.data.resolution + 2
  assert count_params(model) == 3 * n_out + n_out == count_params(nnx.state(model))
  with pytest.raises(ValueError, match="already taken"):
    register("unet")(_tiny)


def test_build_model_reads_config():
  c = ddpm.get_config("digits")
  c.diffusion.loss = "simple"
  c.model.dtype = "bfloat16"
  model = nnx.merge(*_abstract(c, num_classes=10, in_channels=1))
  assert model.out_channels == 1 and model.dtype == jnp.bfloat16 and model.label_emb is None
  c.model.class_conditional = True
  c.model.dtype = "float16"
  with pytest.raises(ValueError, match="dtype"):
    _abstract(c, num_classes=10)
  c.model.dtype = "float32"
  c.diffusion.loss = "hybrid"
  model = nnx.merge(*_abstract(c, num_classes=10))
  assert model.out_channels == 6
  assert model.label_emb.embedding.get_value().shape == (11, 4 * c.model.channels[0])


def test_init_rngs_give_nnx_rngs_weights_bit_for_bit():
  """``InitRngs`` (what the methods build networks with, cheap under a trace) hands out the keys
  of ``nnx.Rngs(params=key)``: the same weights, eagerly and under jit, for a typed, a raw and an
  int key; any other stream is refused by name."""
  from common.models import InitRngs

  c = ddpm.get_config("digits")

  def init(rngs):
    model = build_model(c, in_channels=1, num_classes=10, rngs=rngs)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  for key in (jax.random.key(3), jax.random.PRNGKey(3), 3):
    want = init(nnx.Rngs(params=key))
    for got in (init(InitRngs(key)), jax.jit(lambda key=key: init(InitRngs(key)))()):
      assert jax.tree.structure(got) == jax.tree.structure(want)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
  with pytest.raises(AttributeError, match="only the 'params' stream, not 'dropout'"):
    InitRngs(0).dropout()
