"""The shared loop end to end: sharding equivalence, resume after SIGKILL, preemption, NaN stop,
checkpoint/model mismatch, start-up validation of every bad value."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import checkpoint
from common.train import drift, loop
from common.train.method import DDPM
from common.train.validate import ConfigError
from configs import ddpm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
  """digits at 8x8 with a two-level U-Net: a step takes milliseconds on a CPU."""
  c = ddpm.get_config("digits")
  c.data.resolution = 8
  c.model.channels = (16, 32)
  c.model.num_res_blocks = 1
  c.model.attention_resolutions = (4,)
  c.model.num_heads = 2
  c.diffusion.num_timesteps = 50
  c.diffusion.sample_steps = 4
  c.batch_size = 16
  c.total_steps = 6
  c.log_every_steps = 1
  c.ckpt_every_steps = 3
  c.sample_every_steps = 0
  # No sample grids: drawing the end-of-run grid compiled and ran the sampler in every run that
  # uses this config (a second or more each); the tests of the grid ask for one.
  c.num_sample_images = 0
  c.optimizer.warmup_steps = 2
  c.update_from_flattened_dict(overrides)
  return c


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  """``tiny_config`` trained on one device: the files it writes, and the reference for the sharded
  runs (read only)."""
  workdir = str(tmp_path_factory.mktemp("single") / "run")
  config = tiny_config(**{"mesh.data": 1, "num_sample_images": 4})
  loop.train(config, workdir, devices=jax.devices()[:1])
  return workdir


def test_train_writes_logs_checkpoints_and_samples(single_device_run):
  workdir = single_device_run
  losses = read_losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(v) for v in losses.values())
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    record = json.loads(f.readlines()[-1])
  for key in ("loss", "grad_norm", "lr", "steps_per_s", "images_per_s", "eta_s", "mse"):
    assert key in record, key
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000006.png"))
  assert any(n.startswith("events") for n in os.listdir(os.path.join(workdir, "tensorboard")))
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["total_steps"] == 6 and saved["data"]["resolution"] == 8


@pytest.mark.parametrize("mesh", [{"data": 8}, {"data": 2, "fsdp": 4}])
def test_sharded_training_matches_single_device(tmp_path, mesh, single_device_run):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  single = single_device_run
  sharded = str(tmp_path / "sharded")
  overrides = {f"mesh.{k}": v for k, v in mesh.items()}
  state = loop.train(tiny_config(**overrides), sharded)
  assert not os.path.exists(os.path.join(sharded, "samples"))  # num_sample_images=0: no grid
  a, b = read_losses(single), read_losses(sharded)
  assert sorted(a) == sorted(b)
  np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=2e-4)
  if mesh.get("fsdp", 1) > 1:
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
    assert any("fsdp" in s for s in specs), "FSDP should split at least the large kernels"


def _run_binary(workdir, *flags, env=None):
  cmd = [
    sys.executable,
    "-m",
    "common.train",
    "--config=configs/ddpm.py:digits",
    f"--workdir={workdir}",
  ]
  return subprocess.Popen(
    cmd + list(flags),
    cwd=REPO,
    env=env or os.environ.copy(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


TINY_FLAGS = [
  "--config.data.resolution=8",
  "--config.model.channels=(16,32)",
  "--config.model.num_res_blocks=1",
  "--config.model.attention_resolutions=(4,)",
  "--config.model.num_heads=2",
  "--config.diffusion.num_timesteps=50",
  "--config.diffusion.sample_steps=4",
  "--config.batch_size=16",
  "--config.log_every_steps=1",
  "--config.sample_every_steps=0",
  "--config.num_sample_images=4",
  "--config.mesh.data=1",
]


def xla_flags(devices: int) -> str:
  """The conftest's XLA flags (fast compiling: it dominates these tiny runs) with ``devices``
  forced CPU devices instead of its 8."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
  return f"--xla_force_host_platform_device_count={devices} {flags.strip()}"


def run_benchmark(script: str, *args: str) -> str:
  """``benchmarks/<script>`` with ``args`` in a subprocess on one forced CPU device; its stdout
  (the test fails with the stderr's tail on a non-zero exit)."""
  env = os.environ.copy()
  env["XLA_FLAGS"] = xla_flags(1)
  cmd = [sys.executable, f"benchmarks/{script}", *args]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _single_device_env():
  env = os.environ.copy()
  env["XLA_FLAGS"] = xla_flags(1)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _wait_for_checkpoint(proc, ckpt_dir, step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(os.path.join(ckpt_dir, str(step), "commit_success.txt")) or (
      os.path.isdir(os.path.join(ckpt_dir, str(step)))
      and os.path.exists(os.path.join(ckpt_dir, str(step), "_CHECKPOINT_METADATA"))
    ):
      return
    if proc.poll() is not None:
      raise AssertionError("training exited before the checkpoint:\n" + proc.stdout.read())
    time.sleep(0.05)
  raise AssertionError("no checkpoint in time")


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
  flags = [*TINY_FLAGS, "--config.total_steps=40", "--config.ckpt_every_steps=5"]
  env = _single_device_env()
  reference = str(tmp_path / "reference")
  ref = _run_binary(reference, *flags, env=env)
  killed = str(tmp_path / "killed")
  proc = _run_binary(killed, *flags, env=env)
  _wait_for_checkpoint(proc, os.path.join(killed, "checkpoints"), 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_before = read_losses(killed)
  assert max(steps_before) < 40, "the run should have been killed mid-way"
  resumed = _run_binary(killed, *flags, env=env)
  out = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0, out
  assert "resuming from" in out
  assert ref.wait(timeout=300) == 0, ref.stdout.read()
  a, b = read_losses(reference), read_losses(killed)
  assert sorted(a) == sorted(b) == list(range(1, 41))
  # Same losses step for step (identical data order and randomness), to float tolerance.
  np.testing.assert_allclose([a[s] for s in range(1, 41)], [b[s] for s in range(1, 41)], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_saves_and_stops_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  flags = [*TINY_FLAGS, "--config.total_steps=100000", "--config.ckpt_every_steps=1000"]
  proc = _run_binary(workdir, *flags, env=_single_device_env())
  deadline = time.time() + 240
  while not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and time.time() < deadline:
    time.sleep(0.1)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out
  assert "preempted" in out
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 1000, steps
  assert steps[0] == max(read_losses(workdir))


class NaNAfter(DDPM):
  """DDPM whose loss turns NaN from the 6th update on (a numerical blow-up, injected)."""

  def loss_fn(self, params, batch, rng, step):
    loss, metrics = super().loss_fn(params, batch, rng, step)
    return jnp.where(step >= 5, jnp.nan, loss), metrics


def test_nan_loss_stops_and_last_checkpoint_restores(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"mesh.data": 1, "total_steps": 10, "ckpt_every_steps": 4})
  mesh, method = loop.setup(config, devices=jax.devices()[:1])
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 6\b.*last good checkpoint is step 4"):
    loop.train(
      config, workdir, devices=jax.devices()[:1], method=NaNAfter(config, method.data_info)
    )
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 4
  fns = loop.build(config, method, mesh)
  state = ckpt.restore(4, fns["abstract_state"])
  ckpt.close()
  assert int(state.step) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_checkpoint_of_another_model_is_refused_naming_the_parameter(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train(tiny_config(**{"mesh.data": 1, "total_steps": 3}), workdir, devices=jax.devices()[:1])
  wider = tiny_config(**{"mesh.data": 1, "total_steps": 6, "model.channels": (16, 48)})
  # The saved config catches the change first (common.train.drift) ...
  with pytest.raises(ConfigError, match=r"model.channels: \[16, 32\] -> \[16, 48\]"):
    loop.train(wider, workdir, devices=jax.devices()[:1])
  # ... and a launch that allows it still meets the checkpoint's own check.
  drift.allow(["model.channels"])
  try:
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"parameter '.*' has shape"):
      loop.train(wider, workdir, devices=jax.devices()[:1])
  finally:
    drift.allow([])


BAD_VALUES = [
  ({"diffusion.num_timesteps": 0}, "diffusion.num_timesteps"),
  ({"batch_size": 12, "mesh.data": 8}, "batch_size"),
  ({"mesh.data": 16}, "mesh"),
  ({"mesh.data": 2, "mesh.fsdp": 8}, "mesh"),
  ({"data.name": "mnist"}, "data.name"),
  ({"model.name": "transformer"}, "model.name"),
  ({"diffusion.schedule": "sigmoid"}, "diffusion.schedule"),
  ({"data.name": "array_record", "data.data_dir": "/no/such/dir"}, "data.data_dir"),
  ({"data.resolution": 12}, "data.resolution"),
  (
    {"model.channels": (16, 16, 16, 16, 16), "model.attention_resolutions": ()},
    "model",
  ),
  ({"model.attention_resolutions": (3,)}, "model"),
  ({"diffusion.sample_steps": 51}, "diffusion.sample_steps"),
  ({"total_steps": 0}, "total_steps"),
  ({"ema_decay": 1.0}, "ema_decay"),
  ({"num_sample_images": -1}, "num_sample_images"),
  ({"optimizer.name": "sgd"}, "optimizer.name"),
]


@pytest.mark.parametrize("overrides,field", BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_bad_value_names_field_and_writes_nothing(tmp_path, overrides, field):
  workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError) as err:
    loop.train(tiny_config(**overrides), workdir)
  message = str(err.value)
  assert message.startswith(f"config error: {field}=")
  assert "\n" not in message
  assert not os.path.exists(workdir)


@pytest.mark.slow
def test_binary_bad_value_exits_nonzero_with_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _run_binary(
    workdir, *TINY_FLAGS, "--config.diffusion.num_timesteps=0", env=_single_device_env()
  )
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 2
  errors = [line for line in out.splitlines() if line.startswith("config error:")]
  assert errors == ["config error: diffusion.num_timesteps=0: must be an integer >= 1"], out
  assert not os.path.exists(workdir)


def test_conditional_hybrid_loss_run_on_shapes(tmp_path):
  """The paper-scale code paths at toy size: RGB shapes, class labels with CFG dropout, learned
  sigma with the hybrid loss, dropout, DDPM sampling with guidance for the labelled grid."""
  config = tiny_config(
    **{
      "mesh.data": 1,
      "total_steps": 2,
      "data.name": "shapes",
      "data.num_examples": 64,
      "model.class_conditional": True,
      "model.dropout": 0.1,
      "diffusion.loss": "hybrid",
      "diffusion.cond_drop_prob": 0.1,
      "diffusion.guidance_scale": 2.0,
      "diffusion.sampler": "ddpm",
      "num_sample_images": 6,
    }
  )
  workdir = str(tmp_path / "run")
  state = loop.train(config, workdir, devices=jax.devices()[:1])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    record = json.loads(f.readlines()[-1])
  assert np.isfinite(record["loss"]) and np.isfinite(record["vlb"])
  assert record["loss"] > record["mse"], "the hybrid loss adds the (positive) vlb term"
  # Learned sigma doubles the output channels of the last conv.
  assert state.params["out_conv"]["kernel"].shape[-1] == 2 * 3
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))
