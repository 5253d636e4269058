"""Faults a long run meets, injected into the shared loop: damaged checkpoints, divergence, config
drift on resume, a torn metrics line, bad command lines, SIGTERM during compilation."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from common import checkpoint
from common.checkpoint import integrity
from common.train import drift, loop
from common.train.validate import ConfigError
from tests.common.test_train import (
  REPO,
  TINY_FLAGS,
  _run_binary,
  _single_device_env,
  read_losses,
  tiny_config,
)

ONE = {"mesh.data": 1}


def _train(workdir, **overrides):
  return loop.train(tiny_config(**{**ONE, **overrides}), workdir, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Losses of an uninterrupted 9-step run, checkpoints at 3, 6, 9."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  _train(workdir, total_steps=9)
  return read_losses(workdir)


def _data_files(step_dir):
  state = os.path.join(step_dir, "state")
  files = [os.path.join(r, n) for r, _, ns in os.walk(state) for n in ns if "/d/" in r + "/"]
  return sorted(files, key=os.path.getsize)


def _damage(step_dir, how):
  if how == "metadata":
    path = os.path.join(step_dir, "state", "_METADATA")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
    return
  path = _data_files(step_dir)[-1]  # the largest chunk file: the parameters' bytes
  if how == "overwrite":
    rng = np.random.default_rng(0)
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 4)
      f.write(rng.integers(0, 256, min(4000, os.path.getsize(path) // 2), np.uint8).tobytes())
  elif how == "truncate":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  elif how == "delete":
    os.remove(path)


@pytest.mark.parametrize("how", ["overwrite", "truncate", "delete", "metadata"])
def test_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, reference, how, caplog):
  workdir = str(tmp_path / "run")
  _train(workdir, total_steps=6)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert integrity.read_manifest(os.path.join(ckpt_dir, "6"))["confirmed"] is False  # last step
  assert integrity.read_manifest(os.path.join(ckpt_dir, "3"))["confirmed"] is True
  _damage(os.path.join(ckpt_dir, "6"), how)
  caplog.set_level("WARNING")
  _train(workdir, total_steps=9)
  warned = [r.getMessage() for r in caplog.records if "checkpoint 6 is damaged" in r.getMessage()]
  assert len(warned) == 1, caplog.text
  # Resumed from 3, so steps 4-6 ran again: the same losses as the uninterrupted run, and the
  # log holds each step once.
  losses = read_losses(workdir)
  assert sorted(losses) == list(range(1, 10))
  np.testing.assert_allclose([losses[s] for s in range(1, 10)], [reference[s] for s in range(1, 10)],
                             rtol=1e-6)  # fmt: skip
  (aside,) = os.listdir(ckpt_dir + "_damaged")
  assert aside.startswith("6_")
  assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [3, 6, 9]


def test_every_checkpoint_damaged_exits_2_with_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  _train(workdir, total_steps=6)
  for step in ("3", "6"):
    _damage(os.path.join(workdir, "checkpoints", step), "overwrite")
  with pytest.raises(checkpoint.NoIntactCheckpointError, match=r"step 6: .*; step 3: ") as err:
    _train(workdir, total_steps=9)
  assert "\n" not in str(err.value)
  assert max(read_losses(workdir)) == 6  # nothing trained, nothing moved
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
  same = [
    "--config.total_steps=9",
    "--config.ckpt_every_steps=3",
    "--config.optimizer.warmup_steps=2",
  ]
  proc = _run_binary(workdir, *TINY_FLAGS, *same, env=_single_device_env())
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 2, out
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "no intact checkpoint" in errors[0], out


def test_divergence_saves_no_bad_checkpoint_and_a_lower_lr_resumes(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  # Linear warm-up to 30: step 1 runs at lr 0, and the loss explodes a few steps later.
  diverging = {"optimizer.learning_rate": 30.0, "optimizer.warmup_steps": 10}
  with pytest.raises(loop.NonFiniteLossError, match="past the divergence") as err:
    _train(workdir, total_steps=40, ckpt_every_steps=1, **diverging)
  good = int(err.value.args[0].split("last good checkpoint is step ")[1].split(":")[0])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  assert steps[-1] == good
  # Every checkpoint left was confirmed by the healthy loss of the step after it.
  losses = read_losses(workdir)
  for step in steps:
    assert integrity.read_manifest(os.path.join(ckpt_dir, str(step)))["confirmed"] is True
    assert np.isfinite(losses[step + 1]) and losses[step + 1] < 1e3 * min(losses.values())
  # Resuming with another learning rate is refused, naming the field's old and new value ...
  with pytest.raises(ConfigError, match=r"optimizer.learning_rate: 30.0 -> 0.001"):
    _train(
      workdir,
      total_steps=good + 6,
      ckpt_every_steps=3,
      **{**diverging, "optimizer.learning_rate": 1e-3},
    )
  # ... until the launch allows it; then the run trains on from the good checkpoint.
  monkeypatch.setattr(drift, "_allowed", ())
  drift.allow(["optimizer.learning_rate"])
  _train(
    workdir,
    total_steps=good + 6,
    ckpt_every_steps=3,
    **{**diverging, "optimizer.learning_rate": 1e-3},
  )
  losses = read_losses(workdir)
  assert sorted(losses) == list(range(1, good + 7))
  assert all(np.isfinite(losses[s]) for s in range(good + 1, good + 7))
  with open(os.path.join(workdir, drift.HISTORY_FILE)) as f:
    history = [json.loads(line) for line in f]
  changed = history[-1]["changed"]
  assert history[-1]["step"] == good
  assert changed["optimizer.learning_rate"] == {"old": 30.0, "new": 1e-3}
  assert history[-1]["how"]["optimizer.learning_rate"] == "--allow_config_change"
  assert changed["total_steps"] == {"old": 40, "new": good + 6}
  assert history[-1]["how"]["total_steps"] == "resumable"
  assert json.load(open(os.path.join(workdir, "config.json")))["optimizer"]["learning_rate"] == 1e-3


def test_fresh_divergence_says_no_checkpoint_was_saved(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match="No checkpoint was saved yet"):
    _train(str(tmp_path / "run"), total_steps=10, ckpt_every_steps=100,
           **{"optimizer.learning_rate": 1e6, "optimizer.warmup_steps": 0})  # fmt: skip


def test_resumable_fields_change_without_a_flag_and_others_are_refused(tmp_path):
  workdir = str(tmp_path / "run")
  _train(workdir, total_steps=3)
  with pytest.raises(ConfigError) as err:
    _train(workdir, total_steps=6, ema_decay=0.5, **{"diffusion.sample_steps": 2})
  message = str(err.value)
  assert "\n" not in message
  assert "ema_decay: 0.995 -> 0.5" in message and "diffusion.sample_steps: 4 -> 2" in message
  assert "total_steps" not in message
  assert "--allow_config_change=diffusion.sample_steps,ema_decay" in message
  assert not os.path.exists(os.path.join(workdir, drift.HISTORY_FILE))
  _train(workdir, total_steps=6, log_every_steps=2, keep_checkpoints=5)
  with open(os.path.join(workdir, drift.HISTORY_FILE)) as f:
    (entry,) = [json.loads(line) for line in f]
  assert entry["step"] == 3 and set(entry["changed"]) == {
    "total_steps",
    "log_every_steps",
    "keep_checkpoints",
  }


def test_torn_metrics_line_does_not_block_a_resume(tmp_path, reference):
  workdir = str(tmp_path / "run")
  _train(workdir, total_steps=6)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # killed after logging step 6
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "loss": 0.3')  # a kill mid-write
  _train(workdir, total_steps=9)
  losses = read_losses(workdir)  # every line parses again
  assert sorted(losses) == list(range(1, 10))
  np.testing.assert_allclose([losses[s] for s in range(1, 10)], [reference[s] for s in range(1, 10)],
                             rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize(
  "flag,expected",
  [
    ("--config.no_such_field=3", "unknown config field 'no_such_field'"),
    ("--config.model.no_such=3", "unknown config field 'model.no_such'"),
    ("--config.total_steps=abc", "flag --config.total_steps=abc"),
  ],
)
def test_bad_command_line_is_one_line_exit_2(tmp_path, flag, expected):
  workdir = str(tmp_path / "run")
  proc = _run_binary(workdir, flag, env=_single_device_env())
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 2, out
  assert [line for line in out.splitlines() if "Traceback" in line] == [], out
  (line,) = [line for line in out.splitlines() if line.startswith("error:")]
  assert expected in line
  assert not os.path.exists(workdir)


def test_unknown_preset_is_one_line_exit_2(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "common.train", "--config=configs/ddpm.py:no_such", "--workdir=x"],
    cwd=REPO, env=_single_device_env(), capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: configs/ddpm.py: unknown preset")


@pytest.mark.slow
def test_sigterm_during_compilation_ends_within_seconds(tmp_path):
  # The shapes preset's step takes tens of seconds to compile on a CPU: the signal lands in it.
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "common.train", "--config=configs/ddpm.py:shapes",
         f"--workdir={workdir}", "--config.total_steps=3", "--config.batch_size=2",
         "--config.mesh.data=1", "--config.sample_every_steps=0"]  # fmt: skip
  env = _single_device_env()
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # a cached program would skip the compile
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)  # fmt: skip
  lines = []
  for line in proc.stdout:  # "parameters: N" is logged just before the first step compiles
    lines.append(line)
    if "parameters:" in line:
      break
  time.sleep(2.0)
  assert proc.poll() is None, "".join(lines)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0]
  assert time.time() - sent < 15, "the process kept compiling after SIGTERM"
  assert proc.returncode == 143, "".join(lines) + out
  assert "SIGTERM while compiling" in out and "no checkpoint was written" in out
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_nonfinite_leaves_names_the_same_leaves_on_the_host_and_on_devices():
  """The check reads CPU arrays in place (no program to compile); it finds what the jitted
  per-device reduction finds, for sharded, bfloat16 and integer leaves."""
  import jax.numpy as jnp

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(
    np.arange(16, dtype=np.float32).reshape(8, 2), jax.NamedSharding(mesh, jax.P("data"))
  )
  tree = {
    "ok": sharded,
    "nan": sharded.at[5, 1].set(np.nan),
    "inf_bf16": jnp.ones((3,), jnp.bfloat16).at[2].set(jnp.inf),
    "count": jnp.arange(4),
    "host": np.array([1.0, np.nan]),
  }
  expected = ["host", "inf_bf16", "nan"]
  assert sorted(integrity.nonfinite_leaves(tree)) == expected
  paths = [integrity.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  on_devices = jax.device_get(integrity._finite_flags(tree))
  assert sorted(p for p, ok in zip(paths, on_devices, strict=True) if not ok) == expected
