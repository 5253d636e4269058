"""What keeping freed host memory (``common.train.host_memory``) does to a CPU train step.

  python benchmarks/host_memory.py --config=configs/ddpm.py:digits
  python benchmarks/host_memory.py --config=configs/mobile.py:digits_config1 --rounds=6

Starts two worker processes that build the same jitted step of ``--config`` (the shared loop's
``common.train.loop.build``, one device, the binaries' XLA:CPU defaults for its model): ``kept``
calls ``host_memory.keep_freed`` as the binaries do, ``default`` leaves glibc's malloc as it is.
glibc's state cannot be put back within one process (a block once kept in the heap is reused
whatever the settings), hence two processes. The driver then asks each in turn for ``--steps``
timed steps, ``--rounds`` times, the first worker alternating, so a burst of load hits both
alike. Prints the step's temp buffer (XLA's memory analysis), each worker's median step, their
ratio and the load average; the last line is ``default / kept``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A training config (configs/*.py).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round and worker.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Interleaved rounds.")
_WORKER = flags.DEFINE_enum("worker", None, ["kept", "default"], "Internal: run as a worker.")
MODES = ("kept", "default")


def _worker(mode: str) -> None:
  """Builds the step, reports its temp buffer, then times ``steps`` steps per request line."""
  import jax

  from benchmarks import jitted_step
  from common.train import host_memory, xla_flags

  config = _CONFIG.value
  xla_flags.apply_cpu_defaults(config.model.name)
  kept = host_memory.keep_freed(jax.default_backend(), env={}) if mode == "kept" else False
  step, state, batch = jitted_step.prepared(config, config.batch_size)
  analysis = step.lower(state, batch).compile().memory_analysis()
  temp = analysis.temp_size_in_bytes if analysis is not None else None
  print(json.dumps({"temp_bytes": temp, "kept": kept}), flush=True)
  for line in sys.stdin:
    steps = int(line)
    state, metrics = step(state, batch)  # untimed: the other worker just ran
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    print(json.dumps({"seconds": (time.perf_counter() - t0) / steps}), flush=True)


def _start(mode: str) -> tuple[subprocess.Popen, dict]:
  # The driver's own command line (absl's argv has the flags taken out).
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={mode}", *sys.argv[1:]]
  stderr = tempfile.TemporaryFile(mode="w+")
  proc = subprocess.Popen(
    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
  )
  first = proc.stdout.readline()
  if not first:
    stderr.seek(0)
    tail = stderr.read().strip().splitlines()[-1:] or ["(no output)"]
    raise RuntimeError(f"host_memory.py: the {mode} worker exited ({proc.wait()}): {tail[0]}")
  return proc, json.loads(first)


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  workers = {mode: _start(mode) for mode in MODES}
  if not workers["kept"][1]["kept"]:
    raise app.UsageError("host_memory.py: keep_freed did nothing here (not glibc, or no CPU)")
  seconds = {mode: [] for mode in MODES}
  try:
    for r in range(_ROUNDS.value):
      for mode in MODES if r % 2 == 0 else MODES[::-1]:
        proc = workers[mode][0]
        proc.stdin.write(f"{_STEPS.value}\n")
        proc.stdin.flush()
        seconds[mode].append(json.loads(proc.stdout.readline())["seconds"])
  finally:
    for proc, _ in workers.values():
      proc.stdin.close()
      proc.wait()
  temp = workers["kept"][1]["temp_bytes"]
  kept, default = (statistics.median(seconds[m]) * 1e3 for m in MODES)
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")
  print(f"temp buffer of the step: {temp / 2**20:.0f} MiB" if temp else "temp buffer: unknown")
  for mode in MODES:
    rounds = ", ".join(f"{s * 1e3:.1f}" for s in seconds[mode])
    print(f"{mode:8s} step ms per round: {rounds}")
  print(f"default / kept: {default:.1f} / {kept:.1f} ms = {default / kept:.2f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
