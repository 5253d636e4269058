"""adaptive.supernet (E6): the exact width schedule, the supernet method. The campaign arm runs in
``tests/adaptive/test_experiments.py``, next to the arms whose stage 1 and search it shares."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive import method as tdc_method
from adaptive import routing, supernet
from common import data
from common.diffusion import sampling
from common.train.validate import ConfigError
from tests.adaptive.test_tdc import tiny


def test_schedule_search_is_the_exact_optimum_under_the_budget():
  rng = np.random.default_rng(0)
  flops = np.array([1.0, 0.55, 0.3])
  for trial in range(20):
    table = rng.uniform(0, 1, (5, 3))
    budget = rng.uniform(5 * 0.3, 5 * 1.0)
    schedule, total, loss = supernet.schedule_search(table, flops, budget)
    feasible = [
      s for s in itertools.product(range(3), repeat=5) if flops[list(s)].sum() <= budget + 1e-12
    ]
    best = min(table[np.arange(5), list(s)].sum() for s in feasible)
    assert total <= budget + 1e-9, trial
    assert loss == pytest.approx(table[np.arange(5), schedule].sum())
    # Exact up to rounding costs up to 1/2000 of a full call.
    assert loss <= best + 1e-9 or flops[schedule].sum() > budget - 5 * 1.0 / 2000, trial
  with pytest.raises(ValueError, match="below 5 calls of the cheapest width"):
    supernet.schedule_search(np.zeros((5, 3)), flops, 5 * 0.29)


def test_widths_are_validated():
  assert tdc_method.validate_widths([1, 0.5]) == (1.0, 0.5)
  for bad in ([], [0.5, 1.0], [1.0, 1.0], [1.0, 0.0], [0.75, 0.5]):
    with pytest.raises(ConfigError, match="adaptive.supernet.widths"):
      tdc_method.validate_widths(bad)


def _supernet(schedule=()):
  c = tiny(model__norm_group_size=4, adaptive__group_models=[], adaptive__cuts=[])
  c.adaptive.supernet = {"widths": [1.0, 0.5], "schedule": list(schedule)}
  return tdc_method.METHOD(c, data.get_info(c.data))


def test_supernet_trains_every_width_and_routes_each_sampler_step():
  steps = routing.sampler_timesteps(_supernet().config)  # 5 of T = 20
  schedule = [0, 1, 1, 0, 1]
  m = _supernet(schedule)
  assert isinstance(m, tdc_method.Supernet)
  # Random weights everywhere: the zero-initialised output convs would stop every gradient.
  # Every network call below is one jitted program: run op by op, this test compiled ~900 small
  # programs.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: jax.device_put(rng.normal(0, 0.2, a.shape).astype(np.float32)),
    jax.eval_shape(m.init_params, jax.random.key(0)),
  )
  full, half = m.subnet_params(params)
  assert full is params and half["input_blocks"][0]["layers"][0]["kernel"].shape[-1] == 4
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)), jnp.float32)
  loss, metrics = jax.jit(lambda p: m.loss_fn(p, {"image": x}, jax.random.key(1), 0))(params)
  assert {"loss/width1", "loss/width0.5"} <= set(metrics)
  assert float(loss) == pytest.approx(
    float(metrics["loss/width1"]) + float(metrics["loss/width0.5"]), rel=1e-6
  )
  # The half-width loss trains the supernet's first channels only.
  grad = jax.jit(jax.grad(lambda p: m.members[1].loss_fn(m.subnet_params(p)[1], {"image": x},
                                                         jax.random.key(1), 0)[0]))(params)  # fmt: skip
  stem = np.abs(np.asarray(grad["input_blocks"][0]["layers"][0]["kernel"]))
  assert stem[..., :4].sum() > 0 and stem[..., 4:].sum() == 0
  # Each sampler step runs its scheduled width; other t take the nearest step's.
  fn = jax.jit(m.denoise_fn(params))
  applies = [jax.jit(member.apply) for member in m.members]
  for t, w in zip(steps, schedule, strict=True):
    tt = jnp.full((2,), t, jnp.int32)
    want = applies[w]((full, half)[w], x, tt)
    np.testing.assert_allclose(np.asarray(fn(x, tt)), np.asarray(want), rtol=1e-5, atol=1e-6)
  table = m.width_of_t()
  assert table.shape == (20,) and (table[steps] == schedule).all()
  assert m.sampling_steps_per_width().tolist() == [2, 3]
  cost = m.cost_description(params)
  assert 0.4 < cost["sampling_flops_ratio"] < 0.8
  with pytest.raises(ConfigError, match="adaptive.supernet.schedule"):
    _supernet([0, 2, 0, 0, 0])
  with pytest.raises(ValueError, match="indices into 2 networks"):
    sampling.routed_denoise_fn(np.array([0, 1, 2]), [lambda x, t, y: x] * 2)
