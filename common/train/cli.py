"""What the method binaries share around their ``run(config, workdir)``: the ``--config`` and
``--workdir`` flags, quiet library logs, one persistent compile cache for campaigns, config errors
as one line with exit code 2 and a non-finite loss with exit code 3."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from typing import Any

from common.train import logger
from common.train.validate import ConfigError

COMPILE_CACHE_ENV = "SEGDIFF_COMPILE_CACHE"
# Python's cyclic garbage collector runs a pass every 700 net allocations, and every 100th pass
# walks every live object. Tracing a step allocates millions of short-lived objects next to the
# hundreds of thousands that JAX, Flax and the jaxprs keep alive, so those full passes add up:
# with these thresholds a tiny training launch took 7% less CPU (median of 8 pairs, 0.97-1.12)
# and three trace-heavy collab tests 9% less (3 pairs, 1.01-1.23), at the same peak memory
# (benchmarks/RESULTS.md, "Launch overheads").
GC_THRESHOLDS = (100_000, 50, 100)


def collect_garbage_less_often() -> None:
  """Sets ``GC_THRESHOLDS`` (first and full passes rarer; reference counting still frees the
  objects that are not in cycles at once). The binaries call it in ``start_binary``, the tests in
  their conftest."""
  gc.set_threshold(*GC_THRESHOLDS)


def default_compile_cache_dir() -> str:
  """The persistent compile cache campaigns and the main job share: ``$SEGDIFF_CACHE/jax``."""
  from common.metrics import reference

  return os.path.join(reference.cache_root(), "jax")


def start_binary(*, persistent_compile_cache: bool = False) -> None:
  """Silences library chatter; records where the time goes when ``$SEGDIFF_TIMING_FILE`` asks
  (``common.train.timing``); keeps compiled programs in JAX's persistent cache, so a campaign's
  next seed or a restarted run compiles nothing twice: in ``$SEGDIFF_COMPILE_CACHE`` when that is
  set (the main job sets it for every launch), else under ``cache_root()/jax`` with
  ``persistent_compile_cache``; on a CPU backend, keeps freed host memory for the next step
  (``common.train.host_memory``); runs Python's garbage collector less often
  (``collect_garbage_less_often``). Call it after ``jax.distributed`` is initialised."""
  from common.train import timing

  collect_garbage_less_often()
  logger.quiet_library_logs()
  timing.record_if_asked()
  import jax

  from common.train import host_memory

  cache_dir = os.environ.get(COMPILE_CACHE_ENV)
  if not cache_dir and persistent_compile_cache:
    cache_dir = default_compile_cache_dir()
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Every program, not only those over JAX's default 1 s of compile: the main job's evaluations
    # share 23-25 of their 27 small programs (feature network, statistics), 2.5-2.7 s a launch.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  host_memory.keep_freed(jax.default_backend())


def run_or_exit(run: Callable[..., Any], *args, **kwargs) -> Any:
  """``run(*args, **kwargs)``; a ``ConfigError`` or a ``checkpoint.CheckpointError`` (no intact
  checkpoint, one of another model) is printed as its one-line message and the process exits 2
  (the binaries' contract for bad input, see ``common.train.validate``); a diverged training run
  (``loop.NonFiniteLossError``) exits 3."""
  from common.checkpoint import CheckpointError
  from common.train.loop import NonFiniteLossError

  try:
    return run(*args, **kwargs)
  except (ConfigError, CheckpointError) as e:
    print(f"error: {e}" if isinstance(e, CheckpointError) else str(e), file=sys.stderr)
    sys.exit(2)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def _unknown_override(argv: list[str]) -> str | None:
  """The first ``--config.a.b=v`` naming a field the config does not have, as a message; None
  when every override names a field (or the config itself cannot be loaded)."""
  import importlib.util

  spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec_arg is None:
    return None
  path, _, preset = spec_arg.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_segdiff_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
  except Exception:  # the config's own error is reported by the caller
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config.") :].split("=", 1)[0]
    node = config
    for i, part in enumerate(dotted.split(".")):
      if not hasattr(node, "keys") or part not in node.keys():
        where = ".".join(dotted.split(".")[:i]) or "the config"
        return f"unknown config field {dotted!r} ({where} of {spec_arg} has no {part!r}): {arg}"
      node = node[part]
  return None


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error (unknown field, unknown preset, a value of the wrong
  type, a missing required flag) as one line on stderr and exit 2 instead of a traceback."""
  from absl import flags

  from common.train import xla_flags

  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      config = flags.FLAGS["config"].value
      config.keys()  # a config file that failed to load raises only here
      # Before a multi-process launch's initialization creates the CPU backend.
      xla_flags.apply_cpu_defaults(config.get("model", {}).get("name", ""))
    return rest
  except Exception as e:  # absl's flags.Error, and what a config file raises while loading
    message = _unknown_override(argv[1:])
    first = (str(e).strip().splitlines() or [""])[0]
    if message is None and isinstance(e, flags.Error) and not first.endswith(":"):
      message = first
    if message is None:
      cause = e
      while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
      lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
      message = lines[-1] if lines else type(cause).__name__
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def distributed_flags():
  """Defines ``--coordinator_address``, ``--num_processes``, ``--process_id`` (here, when a binary
  runs); unset, ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` or the
  cluster JAX detects (TPU pod, SLURM) decide. Returns a function that initialises
  ``jax.distributed`` from them, exiting 2 with one line on a half-specified launch."""
  from absl import flags

  address = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process launch."
  )
  count = flags.DEFINE_integer("num_processes", None, "Number of processes of the launch.")
  index = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")

  def initialize() -> None:
    from common import parallel

    try:
      parallel.maybe_initialize_distributed(address.value, count.value, index.value)
    except parallel.LaunchError as e:
      print(str(e), file=sys.stderr)
      sys.exit(2)

  return initialize


def allow_config_change_flag():
  """Defines ``--allow_config_change`` (here, when a binary runs): the fields besides
  ``drift.RESUMABLE`` a resume may change, e.g. ``optimizer.learning_rate``."""
  from absl import flags

  return flags.DEFINE_list(
    "allow_config_change",
    [],
    "Config fields a resume may change besides total_steps, the log/checkpoint/sample cadences, "
    "keep_checkpoints, num_sample_images and mesh.* (comma-separated dotted names, * allowed); "
    "each accepted change is recorded in WORKDIR/config_history.jsonl.",
  )


def config_workdir_binary(
  run: Callable[[Any, str], Any],
  *,
  workdir_help: str = "Run directory (checkpoints, logs, samples).",
) -> None:
  """The whole ``__main__`` of a ``--config=... --workdir=...`` binary: defines the flags
  (here, never at import, so tests and the quickstart can import several binaries in one
  process), initialises ``jax.distributed`` on a multi-process launch and calls
  ``run(config, workdir)`` through ``run_or_exit``."""
  from absl import app, flags
  from ml_collections import config_flags

  from common.train import drift

  config = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset.", lock_config=True
  )
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  allowed = allow_config_change_flag()
  initialize_distributed = distributed_flags()
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    initialize_distributed()  # before anything asks JAX for its devices
    start_binary()
    drift.allow(allowed.value)
    run_or_exit(run, config.value, workdir.value)

  app.run(main, flags_parser=parse_flags_or_exit)
