"""hybrid.agent: the Q-network, prioritized storage and learning, training, resumable checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flashbax.buffers import sum_tree

from configs import hybrid as hybrid_configs
from hybrid import agent, env, system
from hybrid import baselines as bl

P = system.Profile.paper()
S = system.SystemParams()

# The tiny preset's agent: the binary's test compiles the same programs (persistent cache).
TINY = dict(hybrid_configs.get_config("tiny").scheduler.agent)
TINY = {k: v for k, v in TINY.items() if k in agent.AgentConfig.__dataclass_fields__}


@pytest.fixture(scope="module")
def tiny_agent():
  # One agent object per module: its jitted steps compile once for every test below.
  return agent.PerDQN(agent.AgentConfig(**TINY), S.max_users)


def test_q_network_matches_the_code():
  # The code's network; a small replay (the network does not depend on it) keeps init cheap.
  ag = agent.PerDQN(agent.AgentConfig(capacity=1024), S.max_users)
  ts = ag.init(0)
  shapes = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(ts.params)}
  # Embedding(4, 3); 126 -> 256 -> 256 -> 256 -> 2 (126 = 6 global + 20 rows x (3 + 3)).
  assert sorted(shapes.values()) == sorted(
    [(4, 3), (126, 256), (256,), (256, 256), (256,), (256, 256), (256,), (256, 2), (2,)]
  )
  q = ag.q_values(ts.params, np.zeros((5, 20, 4)), np.zeros((5, 6)))
  assert q.shape == (5, 2) and q.dtype == jnp.float32
  # PyTorch's Linear init: |W| <= 1/sqrt(fan_in).
  first = [v for k, v in jax.tree.leaves_with_path(ts.params) if v.shape == (126, 256)][0]
  assert float(jnp.abs(first).max()) <= 1 / np.sqrt(126) + 1e-7
  with pytest.raises(AssertionError):
    ag.q_values(ts.params, np.zeros((5, 19, 4)), np.zeros((5, 6)))


def test_epsilon_schedule_is_the_codes():
  cfg = agent.AgentConfig()
  assert cfg.epsilon(0) == cfg.epsilon(501) == 0.5
  assert cfg.epsilon(502) == pytest.approx(0.5 - 0.5 / 10_000)
  assert cfg.epsilon(5501) == pytest.approx(0.25)
  assert cfg.epsilon(30_000) == 0.001
  assert (cfg.terminal_batch, cfg.nonterminal_batch) == (16, 112)
  with pytest.raises(ValueError, match="replay"):
    agent.AgentConfig(replay="her")
  with pytest.raises(ValueError, match="empty part"):
    agent.AgentConfig(batch_size=4)


def test_store_sets_the_codes_priorities_and_learn_updates(tiny_agent):
  ag = tiny_agent
  ts = ag.init(1)
  e = env.HybridEnv(S, P)
  scn = system.sample_scenario(np.random.default_rng(0), P, S, 7, 4.0)
  batch = env.rollout(e, scn, lambda s_l, s_g: 1)
  padded, length = agent.pad_episode(batch, S.max_users)
  expect_err = np.abs(np.asarray(jax.jit(ag._td)(ts.params, ts.target_params, padded)))
  ts = ag.store(ts, padded, length)
  np.testing.assert_array_equal(np.asarray(ts.stored), [6, 1])
  # Push priority (|TD| + 2e-5)^0.7 of the TD error at storage time (the code's push).
  stored_p = np.asarray(sum_tree.get_batch(ts.replay[0].sum_tree_state, jnp.arange(6)))
  np.testing.assert_allclose(stored_p, (expect_err[:6] + 2e-5) ** 0.7, rtol=1e-5)
  terminal_p = float(sum_tree.get_batch(ts.replay[1].sum_tree_state, jnp.arange(1))[0])
  assert terminal_p == pytest.approx((expect_err[6] + 2e-5) ** 0.7, rel=1e-5)
  np.testing.assert_array_equal(np.asarray(ts.replay[0].experience["action"][0, :6]), 1)
  # The first learner step copies the online network into the target, then updates the online one.
  ts = jax.tree.map(jnp.copy, ts)
  ts = ts.replace(target_params=jax.tree.map(jnp.zeros_like, ts.target_params))
  before = jax.tree.map(np.asarray, ts.params)
  ts2, loss = ag.learn(ts)
  assert np.isfinite(float(loss)) and int(ts2.learn_steps) == 1
  assert float(ts2.beta) == pytest.approx(0.3 + 1.3e-6)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ts2.target_params), before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), ts2.params, before)
  assert all(jax.tree.leaves(changed))
  # Updated priorities are min(|TD| + eps, 1)^0.7 <= 1.
  assert float(jnp.max(sum_tree.get_batch(ts2.replay[0].sum_tree_state, jnp.arange(6)))) <= 1.0


def test_agent_learns_a_fixed_instance(tiny_agent):
  # The released main's setting: the same scenario every episode (re-seeded), small edge.
  stream = env.ScenarioStream(S, P, "fixed", (4.0,), (6,), fixed_seed=3)
  scn = stream(None)
  trainer = agent.Trainer(tiny_agent, stream, seed=0)
  trainer.run(90, log_every=1000, ckpt_every=10**9)
  losses = [v for v in trainer.history["loss"] if not np.isnan(v)]
  assert len(losses) > 50
  assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])
  d = agent.drl_decide(tiny_agent, trainer.ts.params, env.HybridEnv(S, P), scn)
  rng = np.random.default_rng(0)
  random_u = np.mean([bl.random_admission(scn, S, P, rng).utility for _ in range(100)])
  assert d.utility > random_u
  assert d.utility > bl.all_local(scn, S, P).utility
  assert d.utility <= bl.optimum_by_batch(scn, S, P).utility + 1e-9


def test_resumed_training_equals_uninterrupted(tiny_agent, tmp_path):
  stream = env.ScenarioStream(S, P, "dynamic", (4.0, 16.0), (6, 8))
  # learn_start=40 non-terminal transitions: learning starts before the interruption.
  full = agent.Trainer(tiny_agent, stream, seed=5)
  full.run(24, log_every=1000, ckpt_every=10**9)
  first = agent.Trainer(tiny_agent, stream, seed=5, ckpt_dir=str(tmp_path))
  first.run(12, log_every=1000, ckpt_every=12)
  assert int(first.ts.learn_steps) > 0
  resumed = agent.Trainer(tiny_agent, stream, seed=5, ckpt_dir=str(tmp_path))
  assert resumed.episode == 12
  resumed.run(24, log_every=1000, ckpt_every=10**9)
  assert int(resumed.ts.learn_steps) == int(full.ts.learn_steps)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
    resumed.ts,
    full.ts,
  )
  assert resumed.history["utility_per_user"] == full.history["utility_per_user"]
  # A checkpoint of another agent's settings is refused, naming the problem.
  other = agent.PerDQN(agent.AgentConfig(**{**TINY, "hidden": 16}), S.max_users)
  with pytest.raises(ValueError, match="other agent settings"):
    agent.Trainer(other, stream, seed=5, ckpt_dir=str(tmp_path))
