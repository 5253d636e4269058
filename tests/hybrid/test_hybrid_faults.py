"""Issue 19 for hybrid: malformed configs of hybrid.optimize / hybrid.train are one line before
anything is written; a damaged agent checkpoint falls back to the previous one."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from common import renamed_fields
from common.train.validate import ConfigError
from configs import hybrid as hybrid_configs
from hybrid import agent, env, optimize, system
from hybrid import train as hybrid_train
from tests.faults import NPZ_DAMAGE, assert_refused_in_one_line, damage_npz, run_binary

P = system.Profile.paper()
S = system.SystemParams()
TINY = dict(hybrid_configs.get_config("tiny").scheduler.agent)
TINY = {k: v for k, v in TINY.items() if k in agent.AgentConfig.__dataclass_fields__}


def _tiny(**overrides):
  c = hybrid_configs.get_config("tiny")
  c.update_from_flattened_dict(overrides)
  return c


OPTIMIZE_MALFORMED = [
  ({"seed": -1}, "seed"),
  ({"scheduler.agent.episodes": -5}, "scheduler.agent.episodes"),
  ({"scheduler.agent.batch_size": 1}, "scheduler.agent.batch_size"),
  ({"scheduler.agent.capacity": 4}, "scheduler.agent.capacity"),  # no terminal slot
  ({"scheduler.agent.terminal_fraction": 1.0}, "scheduler.agent.terminal_fraction"),
  ({"scheduler.agent.replay": "greedy"}, "scheduler.agent.replay"),
  ({"scheduler.agent.learning_rate": 0.0}, "scheduler.agent.learning_rate"),
  ({"scheduler.agent.gamma": 1.5}, "scheduler.agent.gamma"),
  ({"scheduler.agent.eps_min": 0.9}, "scheduler.agent.eps_min"),  # > eps_start = 0.5
  ({"scheduler.agent.target_every": 0}, "scheduler.agent.target_every"),
  ({"scheduler.agent.log_every_episodes": 0}, "scheduler.agent.log_every_episodes"),
  ({"scheduler.agent.ckpt_every_episodes": -1}, "scheduler.agent.ckpt_every_episodes"),
  ({"scheduler.agent.priority_exponent": 2.0}, "scheduler.agent.priority_exponent"),
  ({"scheduler.agent.embed_dim": 0}, "scheduler.agent.embed_dim"),
  ({"scheduler.system.capacity": 0}, "scheduler.system.capacity"),
  ({"scheduler.system.transmission": "shannon"}, "scheduler.system.transmission"),
  ({"scheduler.system.min_cut_point": 300.0}, "scheduler.system.min_cut_point"),
  ({"scheduler.setting": "fixed"}, "scheduler.setting"),
  ({"scheduler.profile": "/nonexistent/profile.json"}, "scheduler.profile"),
  ({"scheduler.train_num_users": (4, 30)}, "scheduler.train_num_users"),
  ({"scheduler.eval.num_gpus": (4.0, -1.0)}, "scheduler.eval.num_gpus"),
  ({"scheduler.eval.scenarios": 0}, "scheduler.eval.scenarios"),
  ({"scheduler.eval.ga_population": 3}, "scheduler.eval.ga_population"),
  ({"scheduler.eval.ortools_solver": "gurobi"}, "scheduler.eval.ortools_solver"),
  ({"scheduler.eval.fixed_cut_points": (80.0, 300.0)}, "scheduler.eval.fixed_cut_points"),
]


@pytest.mark.parametrize(
  "overrides,field", OPTIMIZE_MALFORMED, ids=[f for _, f in OPTIMIZE_MALFORMED]
)
def test_optimize_refuses_malformed_configs_before_writing(tmp_path, overrides, field):
  workdir = tmp_path / "opt"
  with pytest.raises(ConfigError, match=f"^config error: {field}=") as err:
    optimize.run(_tiny(**overrides), str(workdir))
  assert "\n" not in str(err.value)
  assert not workdir.exists()


def test_a_bad_profile_file_isrun_binary(tmp_path):
  bad = tmp_path / "profile.json"
  bad.write_text('{"accuracy": {"a": 0.05}}')
  with pytest.raises(ConfigError, match="^config error: scheduler.profile=.*'a' and 'b'"):
    optimize.run(_tiny(**{"scheduler.profile": str(bad)}), str(tmp_path / "opt"))
  assert not (tmp_path / "opt").exists()


def test_optimize_binary_exits_2_withrun_binary(tmp_path):
  workdir = tmp_path / "opt"
  rc, lines = run_binary(
    "hybrid.optimize",
    "--config=configs/hybrid.py:tiny",
    "--config.scheduler.agent.episodes=-5",
    f"--workdir={workdir}",
  )
  assert rc == 2 and lines == ["config error: scheduler.agent.episodes=-5: must be an integer >= 1"]
  assert not workdir.exists()


TRAIN_MALFORMED = [
  ({"hybrid.personal_warmup_steps": -1}, "hybrid.personal_warmup_steps"),
  ({"hybrid.personal_learning_rate": 0.0}, "hybrid.personal_learning_rate"),
  ({"hybrid.personal_ema_decay": 1.0}, "hybrid.personal_ema_decay"),
  ({"hybrid.cluster_step": -2}, "hybrid.cluster_step"),
  ({"hybrid.cluster_workdir": "/nonexistent/run"}, "hybrid.cluster_workdir"),
  ({"hybrid.num_users": 0}, "hybrid.num_users"),
  ({"hybrid.shots": 0}, "hybrid.shots"),
  ({"hybrid.union_repeats": 0}, "hybrid.union_repeats"),
  ({"hybrid.prior_weight": -1.0}, "hybrid.prior_weight"),
  ({"batch_size": -8}, "batch_size"),
  ({"optimizer.learning_rate": -1.0}, "optimizer.learning_rate"),
  ({"diffusion.schedule": "cubic"}, "diffusion.schedule"),
]


@pytest.mark.parametrize("overrides,field", TRAIN_MALFORMED, ids=[f for _, f in TRAIN_MALFORMED])
def test_train_refuses_malformed_configs_before_writing(tmp_path, overrides, field):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=f"^config error: {field}="):
    hybrid_train.run(_tiny(**overrides), str(workdir))
  assert not workdir.exists()


def test_train_binary_exits_2_withrun_binary(tmp_path):
  workdir = tmp_path / "run"
  rc, lines = run_binary(
    "hybrid.train",
    "--config=configs/hybrid.py:tiny",
    "--config.hybrid.personal_steps=0",
    f"--workdir={workdir}",
  )
  assert rc == 2 and len(lines) == 1, lines
  assert lines[0].startswith("config error: hybrid.personal_steps=0:")
  assert not workdir.exists()


@pytest.mark.parametrize(
  "binary,old,new",
  [
    ("hybrid.train", "hybrid.eval_split=5", "hybrid.eval_cut_point"),
    ("hybrid.train", "hybrid.profile.splits=(0,12)", "hybrid.profile.cut_points"),
    ("hybrid.optimize", "scheduler.eval.fixed_splits=(80.0,)", "scheduler.eval.fixed_cut_points"),
    ("hybrid.optimize", "scheduler.system.min_split=80.0", "scheduler.system.min_cut_point"),
  ],
)
def test_old_command_line_names_the_new_field(tmp_path, binary, old, new):
  # Issue 21 gave the cut point one name: the old spelling gets the new one in one line.
  workdir = tmp_path / "run"
  name = old.split("=")[0]
  assert_refused_in_one_line(
    binary,
    "--config=configs/hybrid.py:tiny",
    f"--config.{old}",
    f"--workdir={workdir}",
    starts=f"error: --config.{name} is now --config.{new}",
    workdir=workdir,
  )
  assert hybrid_configs.RENAMED[name] == new


def test_renamed_fields_exist_under_their_new_names_only():
  config = hybrid_configs.get_config("tiny")
  for old, new in hybrid_configs.RENAMED.items():
    assert renamed_fields.has(config, new) and not renamed_fields.has(config, old), old


# -------------------------------------------------------------------------------------------------
# Damaged agent checkpoints.


@pytest.fixture(scope="module")
def tiny_agent():
  return agent.PerDQN(agent.AgentConfig(**TINY), S.max_users)


STREAM = env.ScenarioStream(S, P, "dynamic", (4.0, 16.0), (6, 8))


@pytest.fixture(scope="module")
def checkpointed(tiny_agent, tmp_path_factory):
  """A run checkpointed at episodes 6 (agent.prev.npz) and 12 (agent.npz), and its continuation
  to 18 episodes from episode 6."""
  ckpt_dir = str(tmp_path_factory.mktemp("agent"))
  trainer = agent.Trainer(tiny_agent, STREAM, seed=3, ckpt_dir=ckpt_dir)
  trainer.run(12, log_every=1000, ckpt_every=6)
  assert sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".npz")) == [
    "agent.npz",
    "agent.prev.npz",
  ]
  return ckpt_dir


@pytest.mark.parametrize("how", NPZ_DAMAGE)
def test_a_damaged_agent_checkpoint_falls_back(tiny_agent, checkpointed, tmp_path, caplog, how):
  ckpt_dir = str(tmp_path / "agent")
  shutil.copytree(checkpointed, ckpt_dir)
  damage_npz(os.path.join(ckpt_dir, "agent.npz"), how, "leaf00003")
  with caplog.at_level(logging.WARNING):
    trainer = agent.Trainer(tiny_agent, STREAM, seed=3, ckpt_dir=ckpt_dir)
  assert trainer.episode == 6 and len(trainer.history["loss"]) == 6
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert os.path.join(ckpt_dir, "agent.npz") in warnings[0] and "episode 6" in warnings[0]

  damage_npz(os.path.join(ckpt_dir, "agent.prev.npz"), "truncate", "leaf00003")
  with pytest.raises(ConfigError, match="no intact agent checkpoint") as err:
    agent.Trainer(tiny_agent, STREAM, seed=3, ckpt_dir=ckpt_dir)
  assert "agent.npz" in str(err.value) and "agent.prev.npz" in str(err.value)
  assert "\n" not in str(err.value)


def test_resuming_from_the_previous_checkpoint_is_bit_exact(tiny_agent, checkpointed, tmp_path):
  straight = agent.Trainer(tiny_agent, STREAM, seed=3)
  straight.run(18, log_every=1000, ckpt_every=10**9)
  ckpt_dir = str(tmp_path / "agent")
  shutil.copytree(checkpointed, ckpt_dir)
  damage_npz(os.path.join(ckpt_dir, "agent.npz"), "overwrite", "leaf00003")
  resumed = agent.Trainer(tiny_agent, STREAM, seed=3, ckpt_dir=ckpt_dir)
  assert resumed.episode == 6
  resumed.run(18, log_every=1000, ckpt_every=6)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
    resumed.ts,
    straight.ts,
  )
  np.testing.assert_array_equal(resumed.history["loss"], straight.history["loss"])
  # Its own checkpoints are whole again: the next resume starts from the newest, and the damaged
  # file set aside never became the previous one.
  assert agent.Trainer(tiny_agent, STREAM, seed=3, ckpt_dir=ckpt_dir).episode == 18
  assert os.path.exists(os.path.join(ckpt_dir, "agent.damaged.npz"))
  damage_npz(os.path.join(ckpt_dir, "agent.npz"), "truncate", "leaf00003")
  assert agent.Trainer(tiny_agent, STREAM, seed=3, ckpt_dir=ckpt_dir).episode == 12


def test_the_binary_exits_2_when_every_agent_checkpoint_is_damaged(tmp_path):
  workdir = tmp_path / "opt"
  config = _tiny(**{"scheduler.agent.episodes": 4, "scheduler.agent.ckpt_every_episodes": 2})
  ckpt_dir = workdir / "agents" / "dynamic"
  os.makedirs(ckpt_dir)
  for name in ("agent.npz", "agent.prev.npz"):
    (ckpt_dir / name).write_bytes(b"PK\x03\x04 not a zip")
  with pytest.raises(ConfigError, match="no intact agent checkpoint"):
    optimize.run(config, str(workdir))
  assert not (workdir / "results.json").exists()
