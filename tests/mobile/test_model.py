"""TFDiff: the closed-form formulas against the real network, scan vs unrolled stacks, where the
spatial information comes from (permutation equivariance), shapes at odd D and N, and resolution
independence.

XLA compiles dominate the CPU cost, so shape checks use ``nnx.eval_shape`` / ``jax.eval_shape``
and only the numerical tests compile, at 8x8 or 16x16 with D <= 64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from common.metrics.flops import count_flops
from common.models import count_params
from common.models import stacked as stacked_lib
from mobile import formulas
from mobile.layers import depthwise3x3
from mobile.model import TFDiff
from mobile.spec import SpecError, TFDiffSpec


def spec(**kw) -> TFDiffSpec:
  base = dict(image_size=8, in_channels=1, out_channels=1, width=32, depth=2, num_heads=4)
  base.update(kw)
  return TFDiffSpec(**base)


def randomized(sp: TFDiffSpec, seed: int = 0, scale: float = 0.2):
  """(graphdef, state) of a TFDiff with every parameter random.

  The zero-initialised adaLN gates and head of a fresh model make its output exactly 0, which
  would make every equality below trivial. Built abstractly and filled from numpy: an eager init
  compiles one XLA program per parameter shape.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: TFDiff(sp, rngs=nnx.Rngs(0))), nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  return graphdef, jax.tree.unflatten(treedef, leaves)


def inputs(sp: TFDiffSpec, batch: int = 2, resolution: int | None = None, seed: int = 1):
  r = resolution or sp.image_size
  x = jax.random.normal(jax.random.key(seed), (batch, r, r, sp.in_channels))
  t = jnp.arange(batch, dtype=jnp.int32) * 37
  y = jnp.arange(batch, dtype=jnp.int32) % sp.num_classes if sp.num_classes else None
  return x, t, y


# --- M1: formulas ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kw",
  [
    dict(stride=2, width=64, depth=6, num_heads=4),  # digits Config I
    dict(stride=1, width=64, depth=6, num_heads=4),  # digits Config II
    dict(stride=2, width=96, depth=5, num_heads=3, num_classes=10, in_channels=3, out_channels=6),
    dict(stride=4, width=48, depth=3, num_heads=6, image_size=16, cond_dim=40),
    dict(stride=2, width=32, depth=4, num_heads=2, upsample="convT", long_skips=True),
    dict(stride=2, width=32, depth=3, num_heads=4, upsample="resize_conv", attention="linear"),
    dict(stride=1, width=32, depth=3, num_heads=2, share_core_weights=True, pos_emb="learned"),
    dict(stride=1, width=24, depth=2, num_heads=3, conditioning="add", stem_extra_conv=True),
    dict(stride=1, width=32, depth=2, stem_kernel=1, head_kernel=1, ffn_dwconv=False),
    dict(stride=2, width=512, depth=12, num_heads=8, image_size=64, in_channels=3, out_channels=3),
  ],
)
def test_param_formula_equals_parameter_tree(kw):
  sp = spec(**kw)
  model = nnx.eval_shape(lambda: TFDiff(sp, rngs=nnx.Rngs(0)))
  assert count_params(model) == formulas.param_count(sp)


def test_spec_table_values_and_config_i_ii_differ_only_in_the_head():
  # Spec §2.3's illustrative row: 64x64x3, D=512, N=12 -> 57.9 M params, 51.8 GMACs at s=2.
  one = spec(image_size=64, in_channels=3, out_channels=3, width=512, depth=12, num_heads=8)
  two = spec(image_size=64, in_channels=3, out_channels=3, width=512, depth=12, num_heads=8,
             stride=1)  # fmt: skip
  assert formulas.param_count(one) / 1e6 == pytest.approx(57.9, abs=0.1)
  assert formulas.macs(one)["total"] / 1e9 == pytest.approx(51.8, abs=0.1)
  assert formulas.param_count(one) - formulas.param_count(two) == (
    formulas.head_params(one) - formulas.head_params(two)
  )
  # s 2 -> 1: the L x L attention MACs grow 16x.
  assert formulas.macs(two)["attention"] == 16 * formulas.macs(one)["attention"]


@pytest.mark.parametrize(
  "kw",
  [
    dict(stride=2, width=64, depth=3, num_heads=4, image_size=16),
    dict(stride=1, width=64, depth=2, num_heads=2),
    dict(stride=2, width=96, depth=2, num_heads=3, num_classes=10, image_size=16, in_channels=3,
         out_channels=3),
  ],
)  # fmt: skip
def test_flops_formula_within_10_percent_of_xla(kw):
  sp = spec(**kw)
  graphdef, state = randomized(sp)
  x, t, y = inputs(sp, batch=1)
  # Unrolled: XLA's cost analysis counts the body of the scan over the blocks once.
  fn = lambda st, x, t, y: nnx.merge(graphdef, st)(x, t, y, layer_loop="unroll")
  xla = count_flops(fn, state, x, t, y)
  assert xla == pytest.approx(formulas.flops(sp), rel=0.10), (xla, formulas.flops(sp))


def test_macs_grow_exactly_linearly_in_depth():
  per_block = [formulas.macs(spec(depth=n, stride=1))["total"] for n in (2, 4, 6, 8)]
  assert len(set(np.diff(per_block))) == 1


# --- M5: one block reused -------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kw",
  [
    dict(stride=2, width=32, depth=3, num_heads=4, num_classes=3),
    dict(stride=1, width=24, depth=4, num_heads=2, long_skips=True, share_core_weights=True),
  ],
)
def test_scan_equals_unrolled(kw):
  sp = spec(**kw)
  graphdef, state = randomized(sp)
  x, t, y = inputs(sp)
  run = jax.jit(
    lambda st, mode: nnx.merge(graphdef, st)(x, t, y, layer_loop=mode), static_argnums=1
  )
  scanned, unrolled = run(state, "scan"), run(state, "unroll")
  assert float(jnp.abs(scanned).mean()) > 0.1  # not the trivial zero output
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)


def test_a_scan_picking_weights_by_product_gives_the_sliced_scan_bit_for_bit(monkeypatch):
  # On the CPU the scan picks each block's weights by a one-hot product (XLA:CPU fuses a slice
  # into every elementwise consumer); the product must be exact, in the output and gradients.
  sp = spec(stride=2, width=32, depth=3, num_heads=4, num_classes=3)
  graphdef, state = randomized(sp)
  x, t, y = inputs(sp)

  results, programs = {}, {}
  for by_product in (True, False):
    monkeypatch.setattr(stacked_lib, "select_by_product", lambda b=by_product: b)

    def loss(st):  # a new function each time: traced afresh, not read from jit's cache
      return jnp.mean(jnp.square(nnx.merge(graphdef, st)(x, t, y, layer_loop="scan")))

    step = jax.jit(jax.value_and_grad(loss))
    programs[by_product] = step.lower(state).as_text()
    results[by_product] = step(state)
  assert programs[True] != programs[False]  # two programs, not one read twice
  (v1, g1), (v0, g0) = results[True], results[False]
  assert float(v1) == float(v0) and float(v1) > 0
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_program_size_does_not_grow_with_depth():
  def hlo_chars(depth, mode):
    sp = spec(depth=depth)
    model = nnx.eval_shape(lambda: TFDiff(sp, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    x, t, _ = inputs(sp)
    fn = lambda st, x, t: nnx.merge(graphdef, st)(x, t, layer_loop=mode)
    return len(jax.jit(fn).lower(state, x, t).as_text())

  scan2, scan12 = hlo_chars(2, "scan"), hlo_chars(12, "scan")
  unroll2, unroll12 = hlo_chars(2, "unroll"), hlo_chars(12, "unroll")
  assert scan12 < 1.02 * scan2, (scan2, scan12)
  assert unroll12 > 3 * unroll2, (unroll2, unroll12)


# --- M3: where spatial information comes from ------------------------------------------------------


def _permutation_gap(sp: TFDiffSpec) -> float:
  """max |f(P x) - P f(x)| / mean |f(x)| for a fixed random permutation P of the pixels."""
  graphdef, state = randomized(sp)
  x, t, _ = inputs(sp)
  b, h, w, c = x.shape
  perm = jax.random.permutation(jax.random.key(2), h * w)

  def permute(a):
    return a.reshape(b, h * w, -1)[:, perm].reshape(b, h, w, -1)

  run = jax.jit(lambda xx: nnx.merge(graphdef, state)(xx, t))
  out, out_of_permuted = run(x), run(permute(x))
  return float(jnp.abs(out_of_permuted - permute(out)).max() / jnp.abs(out).mean())


def test_pure_attention_variant_is_permutation_equivariant_and_the_default_is_not():
  pure = spec(stride=1, stem_kernel=1, head_kernel=1, ffn_dwconv=False)
  assert _permutation_gap(pure) < 1e-4
  # Any one convolution with a 3x3 window breaks it: the stem alone, or the in-block DW conv.
  assert _permutation_gap(spec(stride=1)) > 0.1
  assert _permutation_gap(spec(stride=1, stem_kernel=1, head_kernel=1)) > 0.1


# --- shapes and resolution independence ------------------------------------------------------------


@pytest.mark.parametrize(
  "width,depth,heads,resolution",
  [(21, 3, 3, 8), (15, 5, 5, 16), (33, 1, 11, 12), (45, 7, 9, 24)],
)
def test_config_i_output_shape_equals_input_shape_for_odd_width_and_depth(
  width, depth, heads, resolution
):
  sp = spec(stride=2, width=width, depth=depth, num_heads=heads, in_channels=3, out_channels=3,
            image_size=resolution)  # fmt: skip
  model = nnx.eval_shape(lambda: TFDiff(sp, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model, nnx.Param)
  x, t, _ = inputs(sp)
  out = jax.eval_shape(lambda st: nnx.merge(graphdef, st)(x, t), state)
  assert out.shape == x.shape and out.dtype == jnp.float32


def test_same_parameters_run_on_a_larger_input():
  sp = spec(stride=2, width=32, depth=2)
  graphdef, state = randomized(sp)
  x, t, _ = inputs(sp, resolution=24)
  out = jax.jit(lambda xx: nnx.merge(graphdef, state)(xx, t))(x)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  # The FLOPs formula follows the input size: L = (24/2)^2 here.
  assert formulas.macs(sp, 24)["attention"] == sp.depth * 2 * 144**2 * 32
  # A learned positional table is what would stop this (the ablation only).
  table = spec(stride=2, width=32, depth=2, pos_emb="learned")
  graphdef, state = randomized(table)
  with pytest.raises(ValueError, match="positional table"):
    jax.eval_shape(lambda st: nnx.merge(graphdef, st)(x, t), state)


@pytest.mark.parametrize(
  "kw,field",
  [
    (dict(width=30, num_heads=4), "model.num_heads"),
    (dict(image_size=8, stride=3), "data.resolution"),
    (dict(stem_kernel=2), "model.stem_kernel"),
    (dict(upsample="bilinear"), "model.upsample"),
    (dict(long_skips=True, depth=3), "model.depth"),
  ],
)
def test_bad_spec_names_the_field(kw, field):
  with pytest.raises(SpecError) as err:
    spec(**kw).validate()
  assert err.value.field == field


def test_depthwise_conv_and_its_gradient_equal_a_grouped_conv():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 8)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((2, 5, 6, 8)), jnp.float32)

  def reference(x, k):
    return jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=8,
    )  # fmt: skip

  ours = lambda x, k: depthwise3x3(x, k.reshape(9, 8))
  np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda x, k: jnp.sum(ours(x, k) * cot), argnums=(0, 1))(x, kernel)
  want = jax.grad(lambda x, k: jnp.sum(reference(x, k) * cot), argnums=(0, 1))(x, kernel)
  for g, w in zip(grads, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
