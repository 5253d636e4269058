"""Issue 19 for cdc: malformed configs are one line before anything is written, damaged npz
checkpoints fall back to the previous one, a resumed run's metrics read as one run."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from cdc import evaluate, experiment, pretrain, train
from common import fileio
from common.train.validate import ConfigError
from configs import cdc as cdc_configs
from tests.faults import NPZ_DAMAGE, damage_npz, run_binary


def _tiny(**overrides):
  c = cdc_configs.get_config("tiny")
  for field, value in overrides.items():
    *parents, leaf = field.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _files(root) -> dict[str, float]:
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      out[os.path.relpath(p, root)] = os.path.getmtime(p)
  return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  pretrain.pretrain(_tiny(), workdir)
  return workdir


def _with_pretraining(pretrained, path) -> str:
  os.makedirs(path)
  for name in ("pretrain.npz", "config.json"):
    shutil.copy(os.path.join(pretrained, name), os.path.join(path, name))
  return str(path)


MALFORMED = [
  ({"cdc.adr.selector": "bogus"}, "cdc.adr.selector"),
  ({"cdc.adr.num_anchors": 0}, "cdc.adr.num_anchors"),
  ({"cdc.meta.devices_per_step": -1}, "cdc.meta.devices_per_step"),
  ({"cdc.meta.devices_per_step": 7}, "cdc.meta.devices_per_step"),  # > 6 meta-train devices
  ({"batch_size": 7}, "batch_size"),  # not a multiple of devices_per_step = 2
  ({"total_steps": -1}, "total_steps"),
  ({"optimizer.learning_rate": -1.0}, "optimizer.learning_rate"),
  ({"optimizer.name": "sgd"}, "optimizer.name"),
  ({"data.name": "bogus"}, "data.name"),
  ({"data.num_heldout": 8}, "data.num_heldout"),
  ({"data.shape_names": ("circle", "circle", "square")}, "data.shape_names"),
  ({"model.frame_input": "features"}, "model.frame_input"),
  ({"model.dim": 0}, "model.dim"),
  ({"cdc.fda.generated": ("qa", "nope")}, "cdc.fda.generated"),
  ({"cdc.fda.set_pool": "max"}, "cdc.fda.set_pool"),
  ({"cdc.fda.rank": -2}, "cdc.fda.rank"),
  ({"cdc.adr.weighting": "inverse"}, "cdc.adr.weighting"),
  ({"cdc.adr.uplink_dtype": "bfloat16"}, "cdc.adr.uplink_dtype"),
  ({"cdc.meta.pool_videos": 100}, "cdc.meta.pool_videos"),  # > data.pool_videos = 8
  ({"cdc.meta.temperature": 0.0}, "cdc.meta.temperature"),
  ({"cdc.pretrain.steps": 0}, "cdc.pretrain.steps"),
  ({"cdc.finetune.shots": (0,)}, "cdc.finetune.shots"),
  ({"cdc.eval.selectors": ("k_center", "all")}, "cdc.eval.selectors"),
  ({"cdc.eval.drift_switch_at": 4}, "cdc.eval.drift_switch_at"),  # == drift_windows
  ({"cdc.eval.link_mbps": float("nan")}, "cdc.eval.link_mbps"),
]


@pytest.mark.parametrize("overrides,field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_configs_are_refused_before_anything_is_written(
  pretrained, tmp_path, overrides, field
):
  config = _tiny(**overrides)
  fresh = str(tmp_path / "fresh")
  with pytest.raises(ConfigError, match=f"^config error: {field}="):
    pretrain.pretrain(config, fresh)
  assert not os.path.exists(fresh)

  workdir = _with_pretraining(pretrained, tmp_path / "run")
  before = _files(workdir)
  with pytest.raises(ConfigError, match=f"^config error: {field}="):
    train.meta_train(config, workdir)
  assert _files(workdir) == before

  # cdc.evaluate validates the config the run recorded.
  experiment.write_config(workdir, config, "train_config.json")
  before = _files(workdir)
  with pytest.raises(ConfigError, match=f"^config error: {field}="):
    evaluate.evaluate(workdir)
  assert _files(workdir) == before


def test_binaries_exit_2_with_one_line(pretrained, tmp_path):
  fresh = str(tmp_path / "fresh")
  rc, lines = run_binary(
    "cdc.pretrain",
    "--config=configs/cdc.py:tiny",
    "--config.cdc.adr.num_anchors=0",
    f"--workdir={fresh}",
  )
  assert rc == 2 and len(lines) == 1 and "cdc.adr.num_anchors=0" in lines[0], lines
  assert not os.path.exists(fresh)
  workdir = _with_pretraining(pretrained, tmp_path / "run")
  before = _files(workdir)
  rc, lines = run_binary(
    "cdc.train", "--config=configs/cdc.py:tiny", "--config.batch_size=7", f"--workdir={workdir}"
  )
  assert rc == 2 and len(lines) == 1 and "batch_size=7" in lines[0], lines
  assert _files(workdir) == before
  experiment.write_config(workdir, _tiny(**{"cdc.adr.selector": "bogus"}), "train_config.json")
  rc, lines = run_binary("cdc.evaluate", f"--workdir={workdir}")
  assert rc == 2 and len(lines) == 1 and "cdc.adr.selector='bogus'" in lines[0], lines
  assert not os.path.exists(os.path.join(workdir, "eval"))


# -------------------------------------------------------------------------------------------------
# Damaged checkpoints.


def _tree(step):
  return {"w": np.full((3, 4), float(step), np.float32), "count": np.arange(5, dtype=np.int32)}


@pytest.mark.parametrize("how", NPZ_DAMAGE)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, how):
  path = str(tmp_path / "train_ckpt.npz")
  for step in (2, 4):
    experiment.save_checkpoint(path, _tree(step), step=step)
  assert sorted(os.listdir(tmp_path)) == ["train_ckpt.npz", "train_ckpt.prev.npz"]
  tree, step = experiment.restore_checkpoint(path, _tree(0))
  assert step == 4 and float(tree["w"][0, 0]) == 4.0

  damage_npz(path, how, "w")
  with caplog.at_level(logging.WARNING):
    tree, step = experiment.restore_checkpoint(path, _tree(0))
  assert step == 2 and float(tree["w"][0, 0]) == 2.0
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert path in warnings[0] and "train_ckpt.prev.npz (step 2)" in warnings[0]
  # The damaged file is set aside: the next save keeps the intact step 2 as the previous one.
  assert os.path.exists(path.replace(".npz", ".damaged.npz")) == (how != "delete")
  experiment.save_checkpoint(path, _tree(6), step=6)
  damage_npz(path, how, "w")
  assert experiment.restore_checkpoint(path, _tree(0))[1] == 2

  damage_npz(experiment.prev_path(path), "truncate", "w")
  with pytest.raises(ConfigError, match="no intact checkpoint") as err:
    experiment.restore_checkpoint(path, _tree(0))
  msg = str(err.value)
  assert "\n" not in msg and path in msg and experiment.prev_path(path) in msg


def test_a_fresh_run_has_no_checkpoint_and_a_mismatch_is_one_line(tmp_path):
  path = str(tmp_path / "ckpt.npz")
  assert experiment.restore_checkpoint(path, _tree(0)) is None
  experiment.save_checkpoint(path, _tree(1), step=1)
  with pytest.raises(ConfigError, match="'w' has shape"):
    experiment.restore_checkpoint(path, {**_tree(0), "w": np.zeros((2, 2), np.float32)})


def test_damaged_final_outputs_are_one_line(pretrained, tmp_path):
  workdir = _with_pretraining(pretrained, tmp_path / "run")
  damage_npz(os.path.join(workdir, "pretrain.npz"), "overwrite", "w")
  with pytest.raises(ConfigError, match="pretrain.npz.*rerun python -m cdc.pretrain"):
    train.meta_train(_tiny(), workdir)
  assert sorted(os.listdir(workdir)) == ["config.json", "pretrain.npz"]


# -------------------------------------------------------------------------------------------------
# Resume.


class _Killed(Exception):
  pass


def _records(workdir):
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_resume_after_a_kill_and_a_damaged_checkpoint_is_bit_exact(
  pretrained, tmp_path, monkeypatch, caplog
):
  config = _tiny(total_steps=6, ckpt_every_steps=2, log_every_steps=2)
  straight = _with_pretraining(pretrained, tmp_path / "straight")
  train.meta_train(config, straight)

  workdir = _with_pretraining(pretrained, tmp_path / "killed")
  save = experiment.save_checkpoint

  def save_then_die(path, tree, step):
    save(path, tree, step)
    if step == 4:
      raise _Killed

  monkeypatch.setattr(experiment, "save_checkpoint", save_then_die)
  with pytest.raises(_Killed):
    train.meta_train(config, workdir)
  monkeypatch.undo()
  assert [r["step"] for r in _records(workdir)] == [2, 4]
  # A kill between the log line and the checkpoint leaves a record past it, then a torn line.
  with open(os.path.join(workdir, "train_metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 6, "loss": 0.0}) + '\n{"step": 7, "lo')
  damage_npz(os.path.join(workdir, "train_ckpt.npz"), "overwrite", "w")

  with caplog.at_level(logging.WARNING):
    train.meta_train(config, workdir)  # falls back to step 2, the torn line dropped
  assert any("train_ckpt.prev.npz (step 2)" in r.getMessage() for r in caplog.records)
  got, want = _records(workdir), _records(straight)
  assert [r["step"] for r in got] == [2, 4, 6]
  assert [r["loss"] for r in got] == [r["loss"] for r in want]
  a = fileio.load_npz_checked(os.path.join(workdir, "fda.npz"))
  b = fileio.load_npz_checked(os.path.join(straight, "fda.npz"))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # A finished run keeps no checkpoint, only the damaged file it set aside.
  assert [n for n in os.listdir(workdir) if "ckpt" in n] == ["train_ckpt.damaged.npz"]


def test_all_checkpoints_damaged_is_a_config_error(pretrained, tmp_path):
  workdir = _with_pretraining(pretrained, tmp_path / "run")
  path = os.path.join(workdir, "train_ckpt.npz")
  experiment.save_checkpoint(path, _tree(2), step=2)
  experiment.save_checkpoint(path, _tree(4), step=4)
  damage_npz(path, "truncate", "w")
  damage_npz(experiment.prev_path(path), "altered", "w")
  before = _files(workdir)
  with pytest.raises(ConfigError, match="no intact checkpoint.*train_ckpt.npz.*prev.npz"):
    train.meta_train(_tiny(), workdir)
  assert _files(workdir) == before
