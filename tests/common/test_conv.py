"""common.models.conv: the U-Net's convolution with its gradients spelled as forward convolutions
gives lax's values bit for bit, and keeps XLA:CPU's fast kernels inside a loop body."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from common.models import conv as conv_lib
from common.models import unet

NHWC_HWIO = conv_lib.NHWC_HWIO


def _loss(conv_fn, strides, padding):
  return lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w, strides, padding)))


def _lax(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC_HWIO)


def _ours(x, w, strides, padding):  # as nnx.Conv calls it, in a loop body
  with conv_lib.in_loop_body():
    return conv_lib.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC_HWIO)


def _outside_a_loop(x, w, strides, padding):
  return conv_lib.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC_HWIO)


@pytest.mark.parametrize(
  "size, c_in, c_out, kernel, stride, pad",
  [
    (8, 4, 6, 3, 1, 1),  # the U-Net's 3x3
    (8, 4, 6, 3, 2, 1),  # its stride-2 downsampling
    (7, 3, 5, 3, 2, 1),  # an odd size: the last row and column are read
    (8, 4, 6, 1, 1, 0),  # its 1x1 skip projection
    (8, 4, 6, 1, 2, 0),  # the weight gradient's padding comes out negative (-1)
    (9, 2, 3, 5, 3, 2),
  ],
)
def test_values_and_gradients_are_lax_bit_for_bit(size, c_in, c_out, kernel, stride, pad):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, c_in)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(kernel, kernel, c_in, c_out)).astype(np.float32))
  strides, padding = (stride, stride), ((pad, pad), (pad, pad))
  ours = jax.jit(jax.value_and_grad(_loss(_ours, strides, padding), (0, 1)))
  theirs = jax.jit(jax.value_and_grad(_loss(_lax, strides, padding), (0, 1)))
  for a, b in zip(jax.tree.leaves(ours(x, w)), jax.tree.leaves(theirs(x, w)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_what_it_does_not_cover_goes_to_lax_unchanged():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)).astype(np.float32))  # 2 groups
  for kwargs in (
    {"padding": ((1, 1), (1, 1)), "feature_group_count": 2},
    {"padding": "SAME", "feature_group_count": 2},
  ):
    ours = conv_lib.conv_general_dilated(x, w, (1, 1), dimension_numbers=NHWC_HWIO, **kwargs)
    theirs = lax.conv_general_dilated(x, w, (1, 1), dimension_numbers=NHWC_HWIO, **kwargs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def _loop_program(conv_fn) -> str:
  """The compiled text of a two-iteration scan over a convolution's forward and backward."""
  x = jnp.ones((2, 4, 8, 8, 3), jnp.float32)
  w = jnp.ones((2, 3, 3, 3, 5), jnp.float32)
  grad = jax.grad(_loss(conv_fn, (1, 1), ((1, 1), (1, 1))), (0, 1))

  def looped(x, w):
    return jax.lax.scan(lambda c, xw: (c, grad(*xw)), None, (x, w))[1]

  return jax.jit(looped).lower(x, w).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's rewrite")
def test_inside_a_loop_every_convolution_keeps_the_forward_form():
  # XLA:CPU hands a convolution to its Eigen / YNNPACK kernels in the form b01f_01io->b01f;
  # it rewrites other forms into it only outside loop bodies, and the rest go to a generic
  # loop emitter ~20x slower (a digits U-Net step in a scan: 575 against 29 ms).
  def forms(text):
    return set(re.findall(r"dim_labels=([^,\s]+)", text))

  assert forms(_loop_program(_lax)) != {"b01f_01io->b01f"}  # what the rule below fixes
  assert forms(_loop_program(_ours)) == {"b01f_01io->b01f"}


def test_outside_a_loop_body_it_is_lax_s_own_program():
  # XLA's rewrite does the same there, and the spelled-out form compiled ~5% slower.
  args = (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5)))
  loss = _loss(_outside_a_loop, (1, 1), ((1, 1), (1, 1)))
  ref = _loss(_lax, (1, 1), ((1, 1), (1, 1)))
  ours = jax.jit(jax.grad(loss, (0, 1))).lower(*args).as_text()
  theirs = jax.jit(jax.grad(ref, (0, 1))).lower(*args).as_text()
  assert "custom_vjp" not in jax.make_jaxpr(jax.grad(loss, (0, 1)))(*args).pretty_print()
  assert ours.count("stablehlo.convolution") == theirs.count("stablehlo.convolution") == 3


def test_the_unet_convolves_through_it_on_the_cpu():
  layer = unet._conv(4, 6, 3, dtype=jnp.float32, param_dtype=jnp.float32, rngs=unet.nnx.Rngs(0))
  expected = (
    conv_lib.conv_general_dilated if jax.default_backend() == "cpu" else lax.conv_general_dilated
  )
  assert layer.conv_general_dilated is expected
