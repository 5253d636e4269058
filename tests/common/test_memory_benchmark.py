"""benchmarks/memory.py: per-device bytes of a compiled step without the hardware."""

import importlib.util
import json
import os
import subprocess
import sys

from configs import ddpm
from tests.common.test_train import REPO, xla_flags


def _memory_module():
  path = os.path.join(REPO, "benchmarks", "memory.py")
  spec = importlib.util.spec_from_file_location("benchmarks_memory", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_fsdp_divides_parameter_and_optimizer_bytes_by_about_the_axis_size():
  # data=8 replicates the state on every device; the CLI with fsdp=8 splits it. Arrays under
  # parallel.MIN_FSDP_SIZE elements (biases, norms) stay replicated: 1/7.1 on the digits preset.
  config = ddpm.get_config("digits")
  config.batch_size, config.mesh.data = 16, 8
  replicated = _memory_module().measure(config)
  env = os.environ.copy()
  # The binary adds its own device count (the last one given wins).
  env["XLA_FLAGS"] = xla_flags(1)
  cli = [sys.executable, "benchmarks/memory.py", "--config=configs/ddpm.py:digits", "--devices=8",
         "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.batch_size=16"]  # fmt: skip
  out = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  split = json.loads(out.stdout.strip().splitlines()[-1])
  assert split["mesh"] == {"data": 1, "fsdp": 8, "model": 1}
  assert split["params"] == replicated["params"] and split["devices"] == 8
  a, b = replicated["bytes_per_device"], split["bytes_per_device"]
  for part in ("params", "ema", "opt_state"):
    assert a[part] / 8 <= b[part] <= a[part] / 6, (part, a[part], b[part])
  # The step's arguments are exactly the state and the batch (the rng and step are tiny).
  for r in (a, b):
    state = r["params"] + r["ema"] + r["opt_state"] + r["batch"]
    assert state <= r["argument"] <= state + 1024
