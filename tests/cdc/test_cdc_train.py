"""Tests for cdc.train / cdc.experiment / configs/cdc.py: held-out devices never reach
meta-training, checkpoints round-trip, presets keep the shared keys."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from cdc import data as cdc_data
from cdc import experiment, models, objectives, train
from configs import cdc as cdc_configs
from configs import ddpm


def _tiny():
  return cdc_configs.get_config("tiny")


def test_presets_keep_the_shared_keys_and_build():
  shared = ddpm.base_config()
  for preset in ("moving_shapes", "tiny", "msrvtt_qa", "msvd_qa", "msrvtt_retrieval"):
    c = cdc_configs.get_config(preset)
    assert c.method == "cdc"
    for key in ("seed", "total_steps", "batch_size", "log_every_steps", "ckpt_every_steps"):
      assert type(c[key]) is type(shared[key]), key
    assert set(shared.optimizer.keys()) <= set(c.optimizer.keys())
  c = cdc_configs.get_config("moving_shapes")
  assert 20 <= c.data.num_devices <= 50 and c.data.num_heldout >= 10
  ds = experiment.build_dataset(c)
  spec = experiment.model_spec(c, ds)
  assert sum(int(np.prod(s)) for s in spec.head_shapes().values()) == 38_290
  with pytest.raises(ValueError, match="unknown preset"):
    cdc_configs.get_config("nope")


class _Spy:
  """A dataset that records which devices' data is read."""

  def __init__(self, inner):
    self.inner, self.read = inner, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def domain(self, dev, split, *args, **kw):
    self.read.append((int(dev), split))
    return self.inner.domain(dev, split, *args, **kw)


def test_heldout_devices_never_reach_meta_training(tmp_path, monkeypatch):
  config = _tiny()
  with config.unlocked():
    config.total_steps = 0  # the bank and the FDA's set-up, no update (covered elsewhere)
  dataset = experiment.build_dataset(config)
  spec = experiment.model_spec(config, dataset)
  enc = experiment.new_encoders(spec, 0)
  _, state = nnx.split(enc)
  experiment.save_npz(
    str(tmp_path / "pretrain.npz"), (state, models.init_head(spec, jax.random.key(0)))
  )
  spy = _Spy(dataset)
  monkeypatch.setattr(experiment, "build_dataset", lambda c: spy)
  train.meta_train(config, str(tmp_path))
  read = {d for d, _ in spy.read}
  assert read == set(dataset.meta_train_devices.tolist())
  assert not read & set(dataset.heldout_devices.tolist())
  assert cdc_data.SOURCE not in read
  assert os.path.exists(tmp_path / "fda.npz")
  # The bank itself refuses a held-out device.
  graphdef, state = nnx.split(enc)
  with pytest.raises(ValueError, match="held out"):
    train.build_bank(config, dataset, graphdef, state, dataset.heldout_devices[:1])


def test_npz_checkpoint_round_trip_and_mismatch(tmp_path):
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.ones(2, np.int32)]}
  path = str(tmp_path / "x.npz")
  experiment.save_npz(path, tree, step=7)
  back, meta = experiment.load_npz(path, tree)
  assert meta == {"step": 7}
  np.testing.assert_array_equal(back["a"], tree["a"])
  np.testing.assert_array_equal(back["b"][0], tree["b"][0])
  with pytest.raises(ValueError, match="'a' has shape"):
    experiment.load_npz(path, {"a": np.zeros((3, 2), np.float32), "b": tree["b"]})
  with pytest.raises(ValueError, match="no array 'c'"):
    experiment.load_npz(path, {**tree, "c": np.zeros(1)})


def test_recall_at_k_and_accuracy():
  video = np.eye(4)
  text = np.array([[1.0, 0.1, 0, 0], [0, 0.5, 1.0, 0], [0, 0, 1.0, 0], [0.5, 0.5, 0, 0.2]])
  # Caption 0 -> video 0 (rank 1); 1 -> video 1 (rank 2: video 2 scores higher); 2 -> video 2
  # (rank 1); 3 -> video 3 (rank 3: 0.2 below videos 0 and 1 at 0.5).
  r = objectives.recall_at_k(text, video, np.arange(4), ks=(1, 2, 3))
  assert r == {"R@1": 0.5, "R@2": 0.75, "R@3": 1.0}
  flat = objectives.recall_at_k(np.ones((3, 2)), np.ones((3, 2)), np.arange(3), ks=(1,))
  assert flat["R@1"] == 0.0  # a collapsed embedding retrieves nothing
  assert objectives.qa_accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])) == 0.5


def test_a_workdir_without_pretraining_is_a_one_line_error(tmp_path):
  import subprocess
  import sys

  from common.train.validate import ConfigError

  with pytest.raises(ConfigError, match="holds no pretrain.npz"):
    train.meta_train(_tiny(), str(tmp_path))
  assert not os.path.exists(tmp_path / "train_config.json")  # refused before anything ran
  for args in (
    ["cdc.train", "--config=configs/cdc.py:tiny", f"--workdir={tmp_path}"],
    ["cdc.evaluate", f"--workdir={tmp_path}"],
  ):
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "holds no" in out.stderr and "Traceback" not in out.stderr
