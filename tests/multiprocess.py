"""Real multi-process runs for the tests: a binary launched as P processes x D forced CPU devices
on 127.0.0.1 (gloo collectives), and the comparison of their losses with a one-process run."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests.common.test_train import REPO, xla_flags

# The processes must train on the same global batches and sum the same gradients as one process,
# up to the order of float32 sums (2 x 4 devices against 1 x 8). Two settings make that a test of
# the batches: (1) the loss must depend on them: at step 1 it does not (the output layer starts at
# zero, so the loss is the noise's mean square), so the runs learn at lr 3e-3 from step 1 and the
# later losses depend on the images; (2) Adam must not blow rounding noise up: with eps = 1e-8
# it turns the ~1e-7 relative differences of near-zero gradients into lr-sized moves (the runs
# drifted ~6e-3 apart in 10 steps); eps = 1e-3 bounds each update's difference by lr/eps times the
# gradient's. Measured over 14 steps: 2 x 4 devices vs 1 x 8 agree to 9e-8 relative; reading the
# old per-process data slices instead of blocks of one global batch (the mutation check this
# tolerance is set against) moved every loss from step 2 on by 8.5e-4 to 5.3e-2 relative.
LEARN = [
  "--config.optimizer.warmup_steps=0",
  "--config.optimizer.learning_rate=3e-3",
  "--config.optimizer.eps=1e-3",
]
LOSS_RTOL = 1e-5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def device_env(devices: int) -> dict:
  env = os.environ.copy()
  env["XLA_FLAGS"] = xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONFAULTHANDLER"] = "1"
  return env


def launch(workdir, processes: int, devices: int, *flags, module="common.train"):
  """``processes`` processes of the binary ``module`` on ``workdir`` with ``devices`` CPU devices
  each, joined over 127.0.0.1 (gloo); returns the ``Popen``s, output in ``stdout``."""
  port = free_port()
  procs = []
  for i in range(processes):
    launch = (
      [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
       f"--process_id={i}"] if processes > 1 else []
    )  # fmt: skip
    cmd = [sys.executable, "-m", module, f"--workdir={workdir}"]
    procs.append(
      subprocess.Popen(
        cmd + [*launch, *flags],
        cwd=REPO,
        env=device_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )  # fmt: skip
    )
  return procs


def finish(procs, timeout=400) -> list[str]:
  """Waits for every process (``timeout`` seconds in all); returns their outputs. A process that
  fails or does not finish in time fails the test, with every process killed and its output's
  tail shown: a peer left running would wait for the dead one's collectives forever."""
  deadline = time.time() + timeout
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
  except subprocess.TimeoutExpired:
    for p in procs:  # PYTHONFAULTHANDLER: SIGABRT prints every thread's stack before dying
      p.send_signal(signal.SIGABRT)
    time.sleep(5)
    for p in procs:
      p.kill()
    # The stacks, without the list of extension modules the fault handler appends.
    tails = [p.communicate()[0].split("\nExtension modules:")[0][-6000:] for p in procs]
    raise AssertionError(f"not finished in {timeout} s; outputs' tails: {tails}") from None
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  return outs


def run_files(workdir) -> list[str]:
  """The files a run wrote outside its checkpoints, sorted; each TensorBoard event file (named by
  its time and host) as ``tensorboard/events``, so two writers show as two entries."""
  return sorted(
    "tensorboard/events"
    if n.startswith("events.out.tfevents")
    else os.path.relpath(os.path.join(r, n), workdir)
    for r, _, ns in os.walk(workdir)
    for n in ns
    if "/checkpoints" not in "/" + os.path.relpath(r, workdir)
  )


def assert_same_losses(got: dict, want: dict) -> None:
  """``got``'s steps are 1..n, all in ``want``, with the same losses to ``LOSS_RTOL``."""
  steps = sorted(got)
  assert steps == list(range(1, len(steps) + 1)) and set(steps) <= set(want)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=LOSS_RTOL)
