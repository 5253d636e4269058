"""The train state's first moments: the init compiled for one run (the same bits as XLA's
production default) and the step-0 state of a run that starts from given weights."""

import os

import jax
import numpy as np
import pytest

from common.train import loop
from tests.common.test_train import tiny_config


def _tiny_of(method_name):
  from tests.adaptive.test_tdc import tiny as adaptive_tiny
  from tests.collab.test_collab import tiny as collab_tiny
  from tests.hybrid.test_hybrid_models import _tiny as hybrid_tiny
  from tests.mobile.test_method import tiny_config as mobile_tiny

  return {
    "ddpm": tiny_config,
    "collab": collab_tiny,
    "hybrid": hybrid_tiny,
    "adaptive": adaptive_tiny,
    "mobile": mobile_tiny,
  }[method_name]()


@pytest.mark.parametrize("method_name", ["ddpm", "collab", "hybrid", "adaptive", "mobile"])
def test_init_compiled_for_one_run_gives_the_same_bits(method_name):
  """The state's init is compiled with LLVM -O1 on the CPU (loop.RUN_ONCE_CPU_OPTIONS: 2-4x
  faster to compile); its numbers are those of XLA's production default, -O2 with the fusion
  emitters (this process's own flags are the tests' faster ones, so both are set explicitly)."""
  config = _tiny_of(method_name)
  mesh, method = loop.setup(config, devices=jax.devices()[:1])
  fns = loop.build(config, method, mesh)
  production = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True}
  run_once = {**production, **loop.run_once_options(mesh)}
  assert run_once["xla_backend_optimization_level"] == 1
  # This process's flags turn the fusion emitters off: the init must not inherit that.
  assert "--xla_cpu_use_fusion_emitters=false" in os.environ["XLA_FLAGS"]
  run_once_here = loop.run_once_options(mesh)
  tx, _ = method.make_optimizer()
  init_fn = loop.make_init_fn(method, tx, config.seed)
  shardings = fns["state_shardings"]
  states = [
    jax.jit(init_fn, out_shardings=shardings, compiler_options=options)()
    for options in (production, run_once, run_once_here)
  ]
  leaves = [jax.tree.leaves(s) for s in states]
  assert len(leaves[0]) == len(leaves[1]) == len(leaves[2]) > 3
  for a, b, c in zip(*leaves, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("method_name", ["hybrid", "adaptive"])
def test_start_state_is_the_init_around_given_weights(method_name):
  """``loop.start_state`` (the start checkpoint of hybrid's personal stage and adaptive's stage 2)
  equals the loop's init with its parameters replaced, without compiling the init: the same step,
  rng and optimizer state, EMA = the given weights, the run's shardings."""
  config = _tiny_of(method_name)
  mesh, method = loop.setup(config, devices=jax.devices()[:1])
  fns = loop.build(config, method, mesh)
  tx, _ = method.make_optimizer()
  init_fn = loop.make_init_fn(method, tx, config.seed)
  # What the init gives besides the weights; XLA drops the weights' random draws from this program.
  step, rng, opt_state = jax.jit(lambda: (lambda s: (s.step, s.rng, s.opt_state))(init_fn()))()
  abstract = fns["abstract_state"].params
  given = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), abstract)
  state = loop.start_state(config, method, fns, given)
  want = loop.TrainState(step=step, params=given, ema_params=given, opt_state=opt_state, rng=rng)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  got_leaves = jax.tree.leaves(state)
  for a, b in zip(got_leaves, jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(
    a.sharding.is_equivalent_to(s, a.ndim)
    for a, s in zip(got_leaves, jax.tree.leaves(fns["state_shardings"]), strict=True)
  )
  with pytest.raises(ValueError, match="parameter tree"):
    loop.start_state(config, method, fns, {"w": np.zeros(3)})
