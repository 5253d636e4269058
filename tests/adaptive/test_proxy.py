"""The pruning proxy: deterministic per (structure, seed), and fine-tuning is part of the score."""

import jax
import numpy as np

from adaptive import heldout, method, proxy, search_space
from common import data
from tests.adaptive.test_tdc import tiny


def test_proxy_score_is_deterministic_and_fine_tunes_the_candidate():
  config = tiny(
    adaptive__group_models=[], model__norm_group_size=4, adaptive__pruner__proxy_batch=8
  )
  config.adaptive.pruner.proxy_steps = 2
  m = method.TDC(config, data.get_info(config.data))

  # Random non-zero weights everywhere (fresh output convs are zero, which hides the network), made
  # in one program rather than op by op.
  @jax.jit
  def perturbed_init(key):
    leaves, treedef = jax.tree.flatten(m.members[0].init_params(key))
    return jax.tree.unflatten(
      treedef,
      [a + 0.05 * jax.random.normal(jax.random.key(i), a.shape) for i, a in enumerate(leaves)],
    )

  base_params = perturbed_init(jax.random.key(0))
  x_train, _ = data.load_split(config.data, "train")
  x_test, _ = data.load_split(config.data, "test")
  draws = heldout.fixed_draws(m.groups, x_test, per_group=8, seed=0)
  args = (config, m.data_info, base_params, m.groups.intervals[1], x_train, x_test, draws, 1)
  score = proxy.make_score_fn(*args)
  base = search_space.base_structure(config.model)
  small = search_space.Structure(widths=(0.5, 0.5), blocks=base.blocks, attention=base.attention)
  a, b = score(small), score(small)
  assert a == b and np.isfinite(a)
  assert score(base) != a
  config.adaptive.pruner.proxy_steps = 0
  untuned = proxy.make_score_fn(*args)(small)
  assert untuned != a  # the two Adam steps moved the candidate


def test_program_cache_is_bounded_and_keeps_the_most_recent():
  config = tiny(adaptive__group_models=[], model__norm_group_size=4)
  info = data.get_info(config.data)
  base = search_space.base_structure(config.model)
  structures = [
    search_space.Structure(widths=(w, w), blocks=base.blocks, attention=base.attention)
    for w in (1.0, 0.75, 0.5)
  ]
  cache = proxy.ProgramCache(max_programs=2)
  first = cache.get(config, info, structures[0])
  cache.get(config, info, structures[1])
  assert cache.get(config, info, structures[0]) is first  # a hit refreshes it
  cache.get(config, info, structures[2])  # evicts structures[1], the least recently used
  assert len(cache) == 2 and cache.compiled == 3
  assert cache.get(config, info, structures[0]) is first
  cache.get(config, info, structures[1])
  assert cache.compiled == 4  # built again after its eviction
