"""Does a train step's time grow with its batch, or is it per-step overhead?

  python benchmarks/batch_scaling.py --config=configs/mobile.py:digits_config1 --batch_sizes=32,128

Builds the shared loop's jitted step (``common.train.loop.build``, one device) once per batch
size, then times ``--steps`` steps of each in ``--rounds`` interleaved rounds in this one process
(a burst of load hits every size alike) and prints each size's step times and images/s. Images/s
that stay flat as the batch grows mean the step's time is its arithmetic; images/s that grow
with the batch mean a fixed cost per step (dispatch, small kernels) that a larger batch hides.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import jitted_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A training config (configs/*.py).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["32", "128"], "Global batch sizes to compare.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per round and batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")


def main(argv):
  del argv
  jitted_step.as_the_binaries(_CONFIG.value.model.name)
  sizes = [int(b) for b in _BATCHES.value]
  prepared = {b: jitted_step.prepared(_CONFIG.value, b) for b in sizes}
  seconds: dict[int, list[float]] = {b: [] for b in sizes}
  for _ in range(_ROUNDS.value):
    for b in sizes:
      step, state, batch = prepared[b]
      t0 = time.perf_counter()
      for _ in range(_STEPS.value):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      seconds[b].append((time.perf_counter() - t0) / _STEPS.value)
      prepared[b] = (step, state, batch)
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")
  print("| batch | step ms (per round) | images/s (median) |")
  print("|---|---|---|")
  for b in sizes:
    rounds = ", ".join(f"{s * 1e3:.1f}" for s in seconds[b])
    print(f"| {b} | {rounds} | {b / statistics.median(seconds[b]):.0f} |")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
