"""Beyond one process: the binaries as 2 real processes x 4 forced CPU devices on 127.0.0.1 (gloo
collectives), against 1 process x 8 devices: the same losses, SIGTERM to both processes saving one
step, the resume, process 0 alone writing the run's files, a checkpoint refused by another process
count; half-specified launches."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from common import parallel
from tests.common.test_train import REPO, TINY_FLAGS, read_losses

# The processes must train on the same global batches and sum the same gradients as one process,
# up to the order of float32 sums (2 x 4 devices against 1 x 8). With the preset's learning rate,
# Adam turns that rounding noise in near-zero gradients (the zero-initialised output layer) into
# lr-sized moves, and the runs drift apart by ~1e-3 in 10 steps (measured 6e-3 at step 9), which
# would hide a wrong batch. A 100,000-step warm-up keeps every update below 1e-7, so each step's
# loss compares the batch and the sums themselves: measured <= 2.5e-7 relative over 10 steps.
WARMUP = "--config.optimizer.warmup_steps=100000"
LOSS_RTOL = 2e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = os.environ.copy()
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _launch(workdir, processes: int, devices: int, *flags, module="common.train"):
  """``processes`` processes of ``module`` with ``devices`` CPU devices each; returns them."""
  port = _free_port()
  procs = []
  for i in range(processes):
    launch = (
      [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
       f"--process_id={i}"] if processes > 1 else []
    )  # fmt: skip
    cmd = [sys.executable, "-m", module, "--config=configs/ddpm.py:digits", f"--workdir={workdir}"]
    procs.append(
      subprocess.Popen(
        cmd + [*TINY, "--config.mesh.data=8", *launch, *flags],
        cwd=REPO,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )  # fmt: skip
    )
  return procs


def _finish(procs, timeout=400) -> list[str]:
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  return outs


def _files(workdir) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(r, n), workdir)
    for r, _, ns in os.walk(workdir)
    for n in ns
    if "/checkpoints" not in "/" + os.path.relpath(r, workdir)
  )


TINY = [f for f in TINY_FLAGS if not f.startswith("--config.mesh.")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """1 process x 8 devices, 12 steps: the losses the multi-process runs must give."""
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  _finish(_launch(workdir, 1, 8, WARMUP, "--config.total_steps=12"))
  return read_losses(workdir)


def _assert_same_losses(got: dict, want: dict) -> None:
  steps = sorted(got)
  assert steps == list(range(1, len(steps) + 1)) and set(steps) <= set(want)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=LOSS_RTOL)


@pytest.mark.slow
def test_two_processes_train_like_one_stop_together_on_sigterm_and_resume(tmp_path, reference):
  workdir = str(tmp_path / "run")
  # A checkpoint every step and 2 kept: the processes seal and rotate (orbax's delete is a
  # collective) together at every step.
  procs = _launch(workdir, 2, 4, WARMUP, "--config.ckpt_every_steps=1", "--config.keep_checkpoints=2",
                  "--config.total_steps=100000")  # fmt: skip
  deadline = time.time() + 400
  while time.time() < deadline and (
    not os.path.exists(os.path.join(workdir, "metrics.jsonl")) or len(read_losses(workdir)) < 3
  ):
    time.sleep(0.2)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = _finish(procs, timeout=300)
  # Both processes stop at the same step (JAX's preemption sync) and save it together; the
  # rotation kept the newest 2.
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  stop = max(read_losses(workdir))
  assert saved == [stop - 1, stop], (saved, outs[0][-2000:])
  assert all(f"preempted: saved step {stop}" in out for out in outs)
  assert stop <= 10, "stopped too late for the reference's 12 steps"
  _assert_same_losses(read_losses(workdir), reference)
  # Only process 0 writes the run's files: one of each (two writers would leave two event files
  # and duplicated log lines).
  files = _files(workdir)
  assert files[:2] == ["config.json", "metrics.jsonl"] and len(files) == 3, files
  assert files[2].startswith("tensorboard/events")
  assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == stop
  # Another process count cannot take over the per-process data positions: one line, exit 2.
  (one,) = _launch(workdir, 1, 8, WARMUP, "--config.total_steps=12")
  out = one.communicate(timeout=300)[0]
  assert one.returncode == 2 and "written by 2 processes and this launch has 1" in out, out[-2000:]
  # The same two processes resume and train on like the uninterrupted run.
  total = stop + 2
  out = _finish(_launch(workdir, 2, 4, WARMUP, f"--config.total_steps={total}"))[0]
  assert "resuming from" in out
  _assert_same_losses(read_losses(workdir), reference)
  assert os.path.exists(os.path.join(workdir, "samples", f"step_{total:07d}.png"))


@pytest.mark.parametrize(
  "kwargs,env,expected",
  [
    ({"coordinator_address": "127.0.0.1:1234"}, {}, "not --num_processes"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "not --process_id"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "must be in [0"),
    ({"coordinator_address": "host", "num_processes": 2, "process_id": 0}, {}, "host:port"),
  ],
)
def test_half_specified_launch_is_one_line(kwargs, env, expected):
  with pytest.raises(parallel.LaunchError) as err:
    parallel.launch_settings(**kwargs, env=env)
  assert expected in str(err.value) and "\n" not in str(err.value)


def test_launch_settings_from_flags_environment_or_cluster():
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert parallel.launch_settings(env=env) == {
    "coordinator_address": "h:1",
    "num_processes": 2,
    "process_id": 1,
  }
  # Flags win over the environment.
  assert parallel.launch_settings(process_id=0, env=env)["process_id"] == 0
  assert parallel.launch_settings(env={}) is None  # one process
  assert parallel.launch_settings(env={"SLURM_NTASKS": "4"}) == {}  # JAX detects the cluster
  assert parallel.launch_settings(env={"TPU_WORKER_HOSTNAMES": "a,b"}) == {}


def test_binary_half_launch_exits_2(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.run(
    [sys.executable, "-m", "common.train", "--config=configs/ddpm.py:digits",
     f"--workdir={workdir}", "--coordinator_address=127.0.0.1:1"],
    cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("launch error:"), lines
  assert not os.path.exists(workdir)
