"""Tests for common.models.norm_act: GroupNorm + scale-shift + SiLU as one op, whose hand-written
backward (XLA:CPU) must give autodiff's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.models import norm_act


def _norm(width: int, groups: int, seed: int) -> nnx.GroupNorm:
  norm = nnx.GroupNorm(width, num_groups=groups, epsilon=1e-5, rngs=nnx.Rngs(0))
  r = np.random.default_rng(seed)
  norm.scale[...] = jnp.asarray(1.0 + 0.2 * r.standard_normal(width), jnp.float32)
  norm.bias[...] = jnp.asarray(0.2 * r.standard_normal(width), jnp.float32)
  return norm


def _inputs(shape, seed: int, film: bool):
  r = np.random.default_rng(seed)
  x = jnp.asarray(1.5 * r.standard_normal(shape) + 0.3, jnp.float32)
  if not film:
    return x, None, None
  b, c = shape[0], shape[-1]
  scale = jnp.asarray(0.3 * r.standard_normal((b, 1, 1, c)), jnp.float32)
  shift = jnp.asarray(0.3 * r.standard_normal((b, 1, 1, c)), jnp.float32)
  return x, scale, shift


def _unfused(norm, x, scale, shift, act):
  """The composition the U-Net computed before: nnx.GroupNorm, then FiLM, then SiLU."""
  h = norm(x)
  if scale is not None:
    h = h * (1.0 + scale) + shift
  return nnx.silu(h) if act else h


@pytest.mark.parametrize(
  "shape, groups, film, act",
  [
    ((3, 4, 4, 16), 4, True, True),  # the ResBlock's norm2 with scale-shift
    ((2, 8, 8, 12), 3, False, True),  # norm1 / out_norm
    ((2, 4, 4, 8), 8, False, False),  # the attention block's norm, one channel per group
    ((2, 2, 2, 6), 1, True, False),
  ],
)
def test_value_and_gradients_match_the_unfused_composition(monkeypatch, shape, groups, film, act):
  norm = _norm(shape[-1], groups, seed=1)
  x, scale, shift = _inputs(shape, seed=2, film=film)
  w = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
  gd, params = nnx.split(norm)

  def loss(fn, params, x, scale, shift):
    return jnp.sum(fn(nnx.merge(gd, params), x, scale, shift) * w)

  def fused(n, x, scale, shift):
    return norm_act.group_norm_act(n, x, scale, shift, act=act)

  def unfused(n, x, scale, shift):
    return _unfused(n, x, scale, shift, act)

  argnums = (0, 1, 2, 3) if film else (0, 1)
  monkeypatch.setenv("SEGDIFF_FUSED_NORM", "1")
  assert norm_act.hand_written_backward()  # the tests run on the CPU
  got_v, got_g = jax.value_and_grad(lambda *a: loss(fused, *a), argnums)(params, x, scale, shift)
  want_v, want_g = jax.value_and_grad(lambda *a: loss(unfused, *a), argnums)(
    params, x, scale, shift
  )
  np.testing.assert_allclose(got_v, want_v, rtol=1e-6)
  np.testing.assert_allclose(
    norm_act.group_norm_act(norm, x, scale, shift, act=act), _unfused(norm, x, scale, shift, act),
    rtol=0, atol=1e-6,
  )  # fmt: skip
  for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    scale_of = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale_of)

  # The opt-out takes autodiff's own backward, which gives the same gradients.
  monkeypatch.setenv("SEGDIFF_FUSED_NORM", "0")
  assert not norm_act.hand_written_backward()
  plain_g = jax.grad(lambda *a: loss(fused, *a), argnums)(params, x, scale, shift)
  for got, want in zip(jax.tree.leaves(plain_g), jax.tree.leaves(want_g), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_bfloat16_input_gives_a_bfloat16_gradient():
  norm = _norm(8, 2, seed=4)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 4, 8)), jnp.bfloat16)
  out = norm_act.group_norm_act(norm, x)
  assert out.dtype == jnp.float32  # statistics and output in float32, as IDDPM's GroupNorm32
  g = jax.grad(lambda x: jnp.sum(norm_act.group_norm_act(norm, x) ** 2))(x)
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_wrong_width_is_refused():
  with pytest.raises(AssertionError):
    norm_act.group_norm_act(_norm(8, 2, seed=0), jnp.zeros((1, 2, 2, 6)))


def test_benchmark_times_both_backwards_in_one_process():
  from tests.common.test_train import run_benchmark

  out = run_benchmark(
    "fused_norm.py",
    "--config=configs/ddpm.py:digits",
    "--config.model.channels=(8,16)",
    "--config.model.num_res_blocks=1",
    "--config.model.attention_resolutions=()",
    "--config.batch_size=4",
    "--rounds=2",
    "--op_shapes=2x4x8",
  )
  assert "step ratio hand-written / autodiff = " in out, out
  assert "op [2,4,4,8] fwd+bwd: autodiff" in out, out


@pytest.mark.parametrize("film", [True, False])
def test_gradients_inside_shard_map_with_unsplit_weights(film):
  """Under shard_map (collab's clients) x is split and the weights are not: the weights' gradients
  are summed over the split, as autodiff of the unfused norm does."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((1,), ("data",))
  norm = _norm(8, 2, seed=6)
  x, scale, shift = _inputs((2, 4, 4, 8), seed=7, film=film)
  gd, params = nnx.split(norm)

  def loss(params, x, scale, shift):
    n = nnx.merge(gd, params)
    return jnp.sum(norm_act.group_norm_act(n, x, scale, shift) ** 2)

  def split_loss(params, x, scale, shift):
    def local(params, x, scale, shift):
      return jax.lax.psum(loss(params, x, scale, shift), "data")

    film_spec = P("data") if film else None
    return jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P("data"), film_spec, film_spec), out_specs=P()
    )(params, x, scale, shift)

  x, scale, shift = (
    None if a is None else jax.device_put(a, NamedSharding(mesh, P("data")))
    for a in (x, scale, shift)
  )
  want = jax.grad(loss, argnums=(0, 1))(params, x, scale, shift)
  got = jax.jit(jax.grad(split_loss, argnums=(0, 1)))(params, x, scale, shift)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
