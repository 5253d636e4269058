"""benchmarks/batch_scaling.py: a step's time at several batch sizes, interleaved."""

import re

from tests.common.test_train import run_benchmark


def test_times_each_batch_size_of_a_real_step():
  out = run_benchmark(
    "batch_scaling.py",
    "--config=configs/mobile.py:digits_config1",
    "--config.model.width=16",
    "--config.model.depth=2",
    "--config.model.num_heads=2",
    "--config.optimizer.warmup_steps=1",
    "--batch_sizes=4,8",
    "--steps=2",
    "--rounds=2",
  )
  rows = re.findall(r"^\| (\d+) \| ([\d., ]+) \| (\d+) \|$", out, re.MULTILINE)
  assert [int(b) for b, _, _ in rows] == [4, 8], out
  for _, rounds, images_per_s in rows:
    assert len(rounds.split(", ")) == 2 and int(images_per_s) > 0
