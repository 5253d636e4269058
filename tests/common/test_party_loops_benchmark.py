"""benchmarks/party_loops.py on hybrid's tiny preset: the binaries' XLA:CPU settings (YNNPACK dots,
which the test process itself runs without), the users' loop and the written-out step train to
the same bits."""

import os
import subprocess
import sys

from tests.common.test_train import REPO, xla_flags


def test_the_users_loop_trains_the_written_out_steps_bits_under_the_binaries_settings():
  env = os.environ.copy()
  env["XLA_FLAGS"] = xla_flags(1)
  cli = [sys.executable, "benchmarks/party_loops.py", "--config=configs/hybrid.py:tiny",
         "--loops=scan,unroll", "--rounds=2"]  # fmt: skip
  out = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert "params after 4 steps, unroll vs scan: equal bit for bit" in lines, out.stdout
  assert lines[-1].startswith("unroll / scan: compile "), out.stdout
