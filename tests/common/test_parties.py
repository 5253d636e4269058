"""common.train.parties: K parties' computation as vmap, a loop or written out gives the same
values; the loop picks each party's leaves exactly; the FLOP-counting form counts every party."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab import fields as collab_fields
from common.metrics import flops as flops_lib
from common.models import stacked
from common.train import parties


def _fn(params, x, label, scale):
  h = jnp.tanh(x @ params["w"] + params["b"]) * scale
  return jnp.sum(h * label), h


def _inputs(k=3):
  rng = np.random.default_rng(0)
  params = {
    "w": jnp.asarray(rng.normal(size=(k, 32, 48)).astype(np.float32)),
    "b": jnp.asarray(rng.normal(size=(k, 48)).astype(np.float32)),
  }
  x = jnp.asarray(rng.normal(size=(k, 16, 32)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 3, size=(k,)).astype(np.int32))
  return params, x, labels


def test_every_loop_gives_each_partys_own_result():
  params, x, labels = _inputs()
  grad = jax.value_and_grad(_fn, has_aux=True)
  outs = {
    loop: jax.jit(
      lambda p, x, y, loop=loop: parties.map_parties(grad, (p, x, y), (2.0,), loop=loop)
    )(params, x, labels)
    for loop in parties.PARTY_LOOPS
  }
  alone = [grad(jax.tree.map(lambda a, k=k: a[k], params), x[k], labels[k], 2.0) for k in range(3)]
  for loop, out in outs.items():
    for k in range(3):
      for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(alone[k]), strict=True):
        np.testing.assert_allclose(
          np.asarray(a)[k], np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=loop
        )
  for a, b in zip(jax.tree.leaves(outs["scan"]), jax.tree.leaves(outs["unroll"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_picking_by_product_is_exact_and_indexes_what_is_not_a_float():
  params, x, labels = _inputs()
  for k in range(3):
    onehot = jnp.eye(3, dtype=jnp.float32)[k]
    got = stacked.pick((params, x, labels), onehot)
    want = jax.tree.map(lambda a, k=k: a[k], (params, x, labels))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_flop_counting_form_counts_every_party():
  params, x, labels = _inputs()

  def flops(loop, for_flops):
    fn = lambda p, x, y: parties.map_parties(_fn, (p, x, y), (2.0,), loop=loop, for_flops=for_flops)
    return flops_lib.analysis_flops(jax.jit(fn).lower(params, x, labels).cost_analysis())

  unrolled = flops("unroll", False)
  assert flops("scan", False) < 0.5 * unrolled  # XLA counts the loop's body once
  assert flops("scan", True) == pytest.approx(unrolled, rel=1e-3)


def test_bad_loop_and_the_methods_names_for_it():
  params, x, labels = _inputs()
  with pytest.raises(ValueError, match="party loop 'loop'"):
    parties.map_parties(_fn, (params, x, labels), (2.0,), loop="loop")
  assert collab_fields.CLIENT_LOOPS == parties.PARTY_LOOPS
