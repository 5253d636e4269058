"""Beyond one process: the binaries as 2 real processes x 4 forced CPU devices on 127.0.0.1 (gloo
collectives), against 1 process x 8 devices: the same losses, SIGTERM to both processes saving one
step, the resume, process 0 alone writing the run's files, a checkpoint refused by another process
count; half-specified launches."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from common import parallel
from tests.common.test_train import REPO, TINY_FLAGS, read_losses
from tests.multiprocess import (
  LEARN,
  assert_same_losses,
  device_env,
  finish,
  free_port,
  launch,
  run_files,
)

TINY = [f for f in TINY_FLAGS if not f.startswith("--config.mesh.")]
DDPM = ["--config=configs/ddpm.py:digits", *TINY, "--config.mesh.data=8", *LEARN]


def _launch(workdir, processes, devices, *flags):
  return launch(workdir, processes, devices, *DDPM, *flags)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """1 process x 8 devices, 14 steps: the losses the multi-process runs must give."""
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  finish(_launch(workdir, 1, 8, "--config.total_steps=14"))
  return read_losses(workdir)


@pytest.mark.slow
def test_two_processes_train_like_one_stop_together_and_resume_at_either_count(tmp_path, reference):
  workdir = str(tmp_path / "run")
  # A checkpoint every step and 2 kept: the processes seal and rotate (orbax's delete is a
  # collective) together at every step.
  procs = _launch(workdir, 2, 4, "--config.ckpt_every_steps=1", "--config.keep_checkpoints=2",
                  "--config.total_steps=100000")  # fmt: skip
  deadline = time.time() + 400
  while time.time() < deadline and (
    not os.path.exists(os.path.join(workdir, "metrics.jsonl")) or len(read_losses(workdir)) < 3
  ):
    time.sleep(0.2)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = finish(procs, timeout=300)
  # Both processes stop at the same step (JAX's preemption sync) and save it together; the
  # rotation kept the newest 2.
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  stop = max(read_losses(workdir))
  assert saved == [stop - 1, stop], (saved, outs[0][-2000:])
  assert all(f"preempted: saved step {stop}" in out for out in outs)
  assert stop <= 10, "stopped too late for the reference's 14 steps"
  assert_same_losses(read_losses(workdir), reference)
  # Only process 0 writes the run's files: one of each (two writers would leave two event files
  # and duplicated log lines).
  files = run_files(workdir)
  assert files == ["config.json", "metrics.jsonl", "tensorboard/events", "train_compute.json"], (
    files
  )
  assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == stop
  # One process x 8 devices takes the 2-process checkpoint over (the state re-sharded, the data
  # position shared), then 2 processes take the 1-process one: the losses stay the reference's.
  out = finish(_launch(workdir, 1, 8, f"--config.total_steps={stop + 2}"))[0]
  assert "written by 2 processes; this launch has 1" in out, out[-2000:]
  assert_same_losses(read_losses(workdir), reference)
  total = stop + 4
  out = finish(_launch(workdir, 2, 4, f"--config.total_steps={total}"))[0]
  assert "written by 1 processes; this launch has 2" in out, out[-2000:]
  assert_same_losses(read_losses(workdir), reference)
  assert os.path.exists(os.path.join(workdir, "samples", f"step_{total:07d}.png"))
  # common.eval reads the run the processes wrote, as one process.
  proc = subprocess.run(
    [sys.executable, "-m", "common.eval", f"--workdir={workdir}", "--num_samples=16",
     "--batch_size=16"],
    cwd=REPO, env=device_env(1), capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["checkpoint_step"] == total and np.isfinite(metrics["fid"])


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
    cwd=REPO, env=device_env(1), capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("launch error:"), lines
  assert not os.path.exists(workdir)


# A peer that reaches a new program's first collective 35 s after the other (a slow compile on a
# loaded machine): gloo's 30 s connect limit would fail the early one, unless make_mesh connected
# the mesh's device groups while the processes were in step (common/parallel/cpu_collectives.py).
LATE_PEER = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from common import parallel
i, port = int(sys.argv[1]), sys.argv[2]
parallel.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, i)
mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "model": 1})
x = jax.make_array_from_callback(
  (4, 8), NamedSharding(mesh, P("data", "fsdp")), lambda _: np.ones((2, 4), np.float32))
if i == 1:
  time.sleep(35)
# A sum over the data axis alone (groups of 2 devices across the processes), then all devices.
over_data = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P("fsdp")))(x)
print("sums", float(over_data.sum()), float(jax.jit(jnp.sum)(x)))
"""


@pytest.mark.slow
def test_a_peer_late_at_a_new_programs_first_collective_is_waited_for():
  port = str(free_port())
  procs = [
    subprocess.Popen([sys.executable, "-c", LATE_PEER, str(i), port], cwd=REPO, env=device_env(2),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for i in range(2)
  ]  # fmt: skip
  for out in finish(procs, timeout=200):
    assert "sums 32.0 32.0" in out, out[-2000:]
