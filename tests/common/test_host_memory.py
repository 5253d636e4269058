"""common.train.host_memory: freed host memory stays in a CPU process; benchmarks/host_memory.py."""

import re
import subprocess
import sys

import pytest

from common.train import host_memory
from tests.common.test_train import REPO, run_benchmark

glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt is glibc's")

# In a fresh process: fill and free a 64 MiB block, then report how much of it is still resident.
# glibc's defaults serve a block that large with mmap and unmap it on free.
_RESIDENT_AFTER_FREE = """
import sys
from common.train import host_memory

def resident_mib():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "kept":
  assert host_memory.keep_freed("cpu", env={})
elif sys.argv[1] == "binary":  # what every binary's start does, on this CPU-only machine
  from common.train import cli
  cli.start_binary()
before = resident_mib()
block = bytearray(64 * 2**20)  # zero-filled: every page touched
del block
print(resident_mib() - before)
"""


def _resident_after_free(mode: str) -> float:
  cmd = [sys.executable, "-c", _RESIDENT_AFTER_FREE, mode]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
  return float(proc.stdout.strip())


@glibc
def test_a_freed_block_stays_resident_only_when_kept():
  assert _resident_after_free("default") < 16
  assert _resident_after_free("kept") > 48
  assert _resident_after_free("binary") > 48


@glibc
def test_not_set_on_an_accelerator_or_when_opted_out():
  # Each returns before touching this process's malloc (the subprocess test sets it).
  assert not host_memory.keep_freed("gpu", env={})
  assert not host_memory.keep_freed("tpu", env={})
  assert not host_memory.keep_freed("cpu", env={host_memory.OPT_OUT: "0"})


def test_benchmark_times_both_workers_side_by_side():
  if host_memory._glibc() is None:
    pytest.skip("mallopt is glibc's")
  out = run_benchmark(
    "host_memory.py",
    "--config=configs/mobile.py:digits_config1",
    "--config.model.width=16",
    "--config.model.depth=2",
    "--config.model.num_heads=2",
    "--config.batch_size=4",
    "--steps=2",
    "--rounds=2",
  )
  for mode in ("kept", "default"):
    rounds = re.search(rf"^{mode} +step ms per round: (.+)$", out, re.MULTILINE)
    assert rounds and len(rounds.group(1).split(", ")) == 2, out
  ratio = re.search(r"^default / kept: [\d.]+ / [\d.]+ ms = ([\d.]+)$", out.splitlines()[-1])
  assert ratio and float(ratio.group(1)) > 0, out
