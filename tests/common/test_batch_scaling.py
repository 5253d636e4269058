"""benchmarks/batch_scaling.py: a step's time at several batch sizes, interleaved."""

import os
import re
import subprocess
import sys

from tests.common.test_train import REPO, xla_flags


def test_times_each_batch_size_of_a_real_step():
  env = os.environ.copy()
  env["XLA_FLAGS"] = xla_flags(1)
  cmd = [
    sys.executable,
    "benchmarks/batch_scaling.py",
    "--config=configs/mobile.py:digits_config1",
    "--config.model.width=16",
    "--config.model.depth=2",
    "--config.model.num_heads=2",
    "--config.optimizer.warmup_steps=1",
    "--batch_sizes=4,8",
    "--steps=2",
    "--rounds=2",
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = re.findall(r"^\| (\d+) \| ([\d., ]+) \| (\d+) \|$", proc.stdout, re.MULTILINE)
  assert [int(b) for b, _, _ in rows] == [4, 8], proc.stdout
  for _, rounds, images_per_s in rows:
    assert len(rounds.split(", ")) == 2 and int(images_per_s) > 0
