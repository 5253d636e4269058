"""Test-wide setup: 8 forced CPU devices, set before anything imports JAX."""

import os

# Tests are dominated by XLA:CPU compiling many small programs, not by running them. A tiny collab
# train step (benchmarks/train_step.py, 2 cores) compiled in 32 s by default, 21-23 s with LLVM at
# -O0, and 11-14 s with the loop-fusion emitters off and each program's code generated in one
# piece as well. Subprocesses launched by the tests inherit these (tests/multiprocess.xla_flags).
COMPILE_FAST = (
  "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
  " --xla_cpu_parallel_codegen_split_count=1"
)
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {COMPILE_FAST}"
).strip()
# The binaries the tests launch add their own XLA:CPU defaults (common/train/xla_flags.py, for
# U-Net configs); this process keeps XLA's: its tests compare against fixed figures measured
# without them (a per-class FID of six samples moved past its tolerance with them).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same small programs (a train step, a sampler); a persistent cache shared
# by the xdist workers compiles each once.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# The binaries' garbage-collector thresholds (they set them in start_binary): the tests trace as
# much as they do. Imports nothing of JAX.
from common.train import cli as _cli  # noqa: E402

_cli.collect_garbage_less_often()


def pytest_configure(config):
  """pytest-xdist (3.x) re-sorts ``--dist loadfile``'s files by their number of tests unless told
  not to, which put the one-test files that run for minutes (the GPU check's CPU mode, the
  multi-process runs) last, one worker finishing them alone; keep the order set below."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """The longest files first (their measured seconds, ``tests/file_durations.py``), each file's own
  order kept: pytest-xdist hands out whole files (``--dist loadfile``) in this order, so the long
  files start early and the short ones fill the end, rather than one worker finishing a long file
  alone."""
  from tests import file_durations

  del config
  seconds = file_durations.load()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def file_seconds(item):
    rel = os.path.relpath(str(item.path), root).replace(os.sep, "/")
    return seconds.get(rel, file_durations.UNKNOWN_S)

  items.sort(key=lambda item: -file_seconds(item))  # stable


# Per-test compile figures when asked (``tests/compile_profile.py``): where the suite's time goes.
if os.environ.get("SEGDIFF_TEST_COMPILE_PROFILE"):
  import pytest

  _RECORDER = None

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    """Sums each test's compile events (``tests.compile_profile.Recorder``)."""
    from tests import compile_profile

    del nextitem
    global _RECORDER
    if _RECORDER is None:
      _RECORDER = compile_profile.Recorder(os.environ[compile_profile.ENV])
    state = _RECORDER.start(item.nodeid)
    yield
    _RECORDER.end(item.nodeid, *state)
