"""Tests for adaptive.search_space, adaptive.inheritance and the U-Net options they rely on.

Models are built abstractly and filled with numpy weights (no initializer compiles); the jitted
programs are one forward per distinct network and one XLA cost analysis per FLOPs check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaptive import inheritance, search_space
from common.metrics.flops import count_flops
from common.models.unet import UNet

_MC = dict(
  channels=(16, 32), num_res_blocks=2, attention_resolutions=(4,), num_heads=4,
  num_head_channels=-1, use_scale_shift_norm=True, resblock_updown=True, norm_group_size=4,
)  # fmt: skip
_X = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
_T = np.array([3.0, 500.0], np.float32)


def _unet(overrides=None, **kw):
  m = dict(_MC, **(overrides or {}))
  args = dict(
    image_size=8, in_channels=1, out_channels=2, channels=m["channels"],
    num_res_blocks=m["num_res_blocks"], attention_resolutions=m["attention_resolutions"],
    num_heads=4, norm_group_size=m["norm_group_size"], resblock_updown=m["resblock_updown"],
    time_embed_channels=m.get("time_embed_channels", 0), base_channels=m.get("base_channels"),
  )  # fmt: skip
  args.update(kw)
  return nnx.eval_shape(lambda: UNet(**args, rngs=nnx.Rngs(0)))


def _filled(model, seed=0):
  # Random non-zero weights everywhere (the zero-initialised convs would hide slicing bugs).
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def base():
  return _filled(_unet())


def _forward(model):
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(_X, _T))(state))


def _pruned(base, structure, **kw):
  over = search_space.structure_to_model_config(_MC, structure)
  model = _filled(_unet(over))
  params = inheritance.inherit_weights(base, _MC, structure, image_size=8, **kw)
  return inheritance.load_params(model, params), params


def _p(model_or_params, *path):
  d = model_or_params
  if isinstance(d, nnx.Module):
    d = nnx.to_pure_dict(nnx.state(d, nnx.Param))
  for k in path:
    d = d[k]
  return np.asarray(d)


def test_norm_group_size_option():
  default, zero = _unet(norm_group_size=0), _unet(norm_group_size=0)
  assert default.input_blocks[1].layers[0].norm1.num_groups == 16  # gcd(32, 16)
  assert jax.tree.structure(nnx.state(default)) == jax.tree.structure(nnx.state(zero))
  grouped = _unet(norm_group_size=4)
  assert grouped.input_blocks[1].layers[0].norm1.num_groups == 4
  assert grouped.output_blocks[0].layers[0].norm1.num_groups == 16  # concat 32 + 32
  with pytest.raises(ValueError, match="not divisible by norm_group_size 5"):
    _unet(norm_group_size=5)
  # The pruning ties: the base's conditioning width and its 1x1 skip convs.
  tied = _unet(dict(channels=(16, 16)), time_embed_channels=16, base_channels=(16, 32))
  assert tied.input_blocks[4].layers[0].skip is not None
  assert _unet(dict(channels=(16, 16))).input_blocks[4].layers[0].skip is None
  assert tied.time_mlp1.kernel.shape == (16, 64)


@pytest.mark.parametrize(
  "structure",
  [
    search_space.Structure((1.0, 1.0), (2, 2), (True,)),
    search_space.Structure((0.5, 0.75), (1, 2), (False,)),
    search_space.Structure((0.25, 0.25), (1, 1), (False,)),
  ],
)
def test_analytic_flops_matches_xla(structure):
  over = search_space.structure_to_model_config(_MC, structure)
  graphdef, state = nnx.split(_unet(over))
  x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  xla = count_flops(lambda s, x, t: nnx.merge(graphdef, s)(x, t), state, x, t)
  ours = search_space.make_flops_fn(_MC, 8, 1, 2)(structure)
  assert abs(ours / xla - 1) < 0.05, (ours, xla)


def test_full_structure_reproduces_base(base):
  full = search_space.base_structure(_MC)
  assert search_space.structure_to_model_config(_MC, full)["channels"] == (16, 32)
  model, _ = _pruned(base, full)
  np.testing.assert_array_equal(_forward(model), _forward(base))


def test_inheritance_keeps_selected_channels(base):
  s = search_space.Structure((0.5, 0.75), (2, 2), (True,))
  model, params = _pruned(base, s)
  stem = _p(base, "input_blocks", 0, "layers", 0, "kernel")
  # The top level's stream: the stem, every level-0 conv2 and the down block produce it.
  producers = [stem] + [
    _p(base, "input_blocks", i, "layers", 0, "conv2", "kernel") for i in (1, 2, 3)
  ]
  l1 = sum(np.abs(k).reshape(-1, 16).sum(0) for k in producers)
  groups = np.sort(np.argsort(-l1.reshape(4, 4).sum(1), kind="stable")[:2])
  idx = (groups[:, None] * 4 + np.arange(4)).reshape(-1)
  np.testing.assert_array_equal(
    _p(params, "input_blocks", 0, "layers", 0, "kernel"), stem[..., idx]
  )
  np.testing.assert_array_equal(
    _p(params, "input_blocks", 1, "layers", 0, "norm1", "scale"),
    _p(base, "input_blocks", 1, "layers", 0, "norm1", "scale")[idx],
  )
  # Output filters are located by their (random, distinct) biases, then compared whole.
  enc = ("input_blocks", 1, "layers", 0, "conv1")
  h = _kept(_p(base, *enc, "bias"), _p(params, *enc, "bias"))
  assert len(h) == 8 and len(set(h) - set(range(16))) == 0
  np.testing.assert_array_equal(
    _p(params, *enc, "kernel"), _p(base, *enc, "kernel")[:, :, idx][..., h]
  )
  # The decoder's last block reads [h, stem skip]: the skip rows follow the stem's channels.
  dec = ("output_blocks", 5, "layers", 0, "conv1")
  d = _kept(_p(base, *dec, "bias"), _p(params, *dec, "bias"))
  np.testing.assert_array_equal(
    _p(params, *dec, "kernel")[:, :, 8:], _p(base, *dec, "kernel")[:, :, 16 + idx][..., d]
  )
  # The emb projection's scale and shift halves are sliced like conv1's output.
  ep = ("input_blocks", 1, "layers", 0, "emb_proj", "kernel")
  np.testing.assert_array_equal(
    _p(params, *ep), _p(base, *ep)[:, np.concatenate([h, 16 + np.array(h)])]
  )
  out = _forward(model)
  assert out.shape == (2, 8, 8, 2) and np.isfinite(out).all()
  other, _ = _pruned(base, s, selection="random", seed=1)
  again = inheritance.inherit_weights(base, _MC, s, image_size=8, selection="random", seed=1)
  assert not np.array_equal(_p(other, "out_norm", "scale"), _p(params, "out_norm", "scale"))
  np.testing.assert_array_equal(_p(other, "out_norm", "scale"), _p(again, "out_norm", "scale"))


def _kept(base_bias, bias):
  return [int(np.flatnonzero(base_bias == v)[0]) for v in bias]


def test_dropped_blocks_are_the_last(base):
  s = search_space.Structure((1.0, 1.0), (1, 2), (True,))
  _, params = _pruned(base, s)
  # Encoder level 0 keeps block 0; the down block follows it directly.
  for pruned_i, base_i in ((1, 1), (2, 3)):
    np.testing.assert_array_equal(
      _p(params, "input_blocks", pruned_i, "layers", 0, "conv1", "kernel"),
      _p(base, "input_blocks", base_i, "layers", 0, "conv1", "kernel"),
    )
  # Decoder level 0 (base blocks 3, 4, 5) keeps 3 (input from below) and 5 (stem skip).
  assert len(params["output_blocks"]) == 5
  for pruned_o, base_o in ((3, 3), (4, 5)):
    np.testing.assert_array_equal(
      _p(params, "output_blocks", pruned_o, "layers", 0, "conv1", "kernel"),
      _p(base, "output_blocks", base_o, "layers", 0, "conv1", "kernel"),
    )


def test_structure_validation_and_baselines():
  with pytest.raises(ValueError, match="Structure.widths"):
    search_space.structure_to_model_config(_MC, search_space.Structure((1.0, 1.5), (2, 2), (True,)))
  with pytest.raises(ValueError, match="Structure.blocks"):
    search_space.structure_to_model_config(_MC, search_space.Structure((1.0, 1.0), (3, 2), (True,)))
  with pytest.raises(ValueError, match="Structure.attention"):
    search_space.structure_to_model_config(_MC, search_space.Structure((1.0, 1.0), (2, 2), ()))
  with pytest.raises(ValueError, match="norm_group_size > 0"):
    inheritance.inherit_weights(
      {},
      dict(_MC, norm_group_size=0),
      search_space.Structure((0.5, 1.0), (2, 2), (True,)),
      image_size=8,
    )
  flops = search_space.make_flops_fn(_MC, 8, 1, 2)
  b = search_space.base_structure(_MC)
  u = search_space.uniform_width_structure(b, 0.5 * flops(b), flops)
  assert len(set(u.widths)) == 1 and u.widths[0] < 1
  rs = search_space.random_structures(b, 0.5 * flops(b), flops, 3, seed=0)
  assert rs and all(abs(flops(s) / (0.5 * flops(b)) - 1) <= 0.02 for s in rs)
  assert rs == search_space.random_structures(b, 0.5 * flops(b), flops, 3, seed=0)


def test_plain_conv_resampling_prunes_too():
  """IDDPM resamples with plain convs (resblock_updown=False, the adaptive presets' setting)."""
  mc = dict(_MC, resblock_updown=False)
  base = _filled(_unet(mc))
  full = search_space.base_structure(mc)
  params = inheritance.inherit_weights(base, mc, full, image_size=8)
  model = inheritance.load_params(_filled(_unet(mc), seed=1), params)
  np.testing.assert_array_equal(_forward(model), _forward(base))
  half = search_space.Structure(widths=(0.5, 0.5), blocks=(2, 1), attention=(True,))
  over = search_space.structure_to_model_config(mc, half)
  pruned = inheritance.load_params(
    _filled(_unet(dict(mc, **over))), inheritance.inherit_weights(base, mc, half, image_size=8)
  )
  kept = _p(base, "input_blocks", 3, "layers", 0, "conv", "kernel")
  assert _p(pruned, "input_blocks", 3, "layers", 0, "conv", "kernel").shape == (3, 3, 8, 8)
  assert kept.shape == (3, 3, 16, 16)
  assert np.isfinite(_forward(pruned)).all()
  graphdef, state = nnx.split(_unet(dict(mc, **over)))
  x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  xla = count_flops(lambda s, x, t: nnx.merge(graphdef, s)(x, t), state, x, t)
  assert abs(search_space.make_flops_fn(mc, 8, 1, 2)(half) / xla - 1) < 0.05


def test_rank_channels_keeps_the_function_and_puts_l1_choices_first(base):
  ranked_params = inheritance.rank_channels(base, _MC, image_size=8)
  ranked = inheritance.load_params(_filled(_unet()), ranked_params)
  np.testing.assert_allclose(_forward(ranked), _forward(base), rtol=1e-5, atol=1e-5)
  # It is a real permutation (the top level's stream is not already in L1 order) ...
  assert not np.array_equal(
    _p(ranked_params, "input_blocks", 0, "layers", 0, "kernel"),
    _p(base, "input_blocks", 0, "layers", 0, "kernel"),
  )
  # ... after which every width's L1 subnetwork is each space's first channels.
  s = search_space.Structure((0.5, 0.75), (2, 2), (True,))
  l1_model, _ = _pruned(base, s)
  prefix_model, _ = _pruned(ranked, s, selection="prefix")
  np.testing.assert_allclose(_forward(prefix_model), _forward(l1_model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "structure",
  [
    search_space.Structure((0.5, 0.5), (2, 2), (True,)),
    # Unequal widths break the level-1 identity residuals: constant 0/1 skip convs appear.
    search_space.Structure((0.75, 0.25), (1, 2), (False,)),
  ],
)
def test_gather_plan_gathers_the_prefix_subnetwork(base, structure):
  params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
  plan = inheritance.gather_plan(params, _MC, structure, image_size=8)
  gathered = inheritance.apply_plan(params, plan)
  sliced = inheritance.inherit_weights(params, _MC, structure, image_size=8, selection="prefix")
  assert jax.tree.structure(gathered) == jax.tree.structure(sliced)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, gathered), sliced)
  # Differentiable: a subnetwork loss's gradient lands on the supernet weights it uses only.
  grad = jax.grad(
    lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(inheritance.apply_plan(p, plan)))
  )(jax.tree.map(jnp.asarray, params))
  stem = np.asarray(grad["input_blocks"][0]["layers"][0]["kernel"])
  kept = int(round(structure.widths[0] * 16))
  assert (stem[..., :kept] == 1).all() and (stem[..., kept:] == 0).all()
