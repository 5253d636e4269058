"""What a binary's start (``common.train.cli.start_binary``) sets up: the persistent compile cache
(``$SEGDIFF_COMPILE_CACHE``, set by the main job), the timing record that counts its hits, and the
garbage collector's thresholds."""

import json
import os
import subprocess
import sys

from common.train import cli
from tests.common.test_train import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What a binary does first (common.train.cli.start_binary), then one jitted program.
PROGRAM = """
from common.train import cli
cli.start_binary()
import jax, jax.numpy as jnp
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((16, 16))).sum()))
"""


def _run(tmp_path, name, cache_dir):
  timing_file = tmp_path / f"{name}.json"
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), SEGDIFF_TIMING_FILE=str(timing_file))
  for var in ("SEGDIFF_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR"):  # the tests' own cache
    env.pop(var, None)
  if cache_dir is not None:
    env["SEGDIFF_COMPILE_CACHE"] = str(cache_dir)
  # The program compiles in milliseconds: JAX alone keeps only those over 1 s, start_binary all.
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
  out = subprocess.run(
    [sys.executable, "-c", PROGRAM], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return float(out.stdout.strip().splitlines()[-1]), json.loads(timing_file.read_text())


def test_a_second_launch_reads_its_program_from_the_shared_cache(tmp_path):
  cache = tmp_path / "jax_cache"
  first_value, first = _run(tmp_path, "first", cache)
  assert first["programs"] >= 1 and first["cache_hits"] == 0
  assert any(cache.iterdir()), "nothing was written to $SEGDIFF_COMPILE_CACHE"
  second_value, second = _run(tmp_path, "second", cache)
  assert second["cache_hits"] >= 1, second
  assert second_value == first_value


def test_without_the_variable_nothing_is_cached(tmp_path):
  _, spent = _run(tmp_path, "plain", None)
  assert spent["programs"] >= 1 and spent["cache_hits"] == 0


def test_a_binary_collects_garbage_less_often():
  script = (
    "import gc, json\n"
    "from common.train import cli\n"
    "before = gc.get_threshold()\n"
    "cli.start_binary()\n"
    "print(json.dumps([before, gc.get_threshold()]))\n"
  )
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  before, after = json.loads(out.stdout.strip().splitlines()[-1])
  assert tuple(before) != cli.GC_THRESHOLDS  # CPython's default (700, 10, 10 on 3.11)
  assert tuple(after) == cli.GC_THRESHOLDS
