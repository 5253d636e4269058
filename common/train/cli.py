"""What the method binaries share around their ``run(config, workdir)``: the ``--config`` and
``--workdir`` flags, quiet library logs, one persistent compile cache for campaigns, config errors
as one line with exit code 2 and a non-finite loss with exit code 3."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from common.train import logger
from common.train.validate import ConfigError


def start_binary(*, persistent_compile_cache: bool = False) -> None:
  """Silences library chatter; with ``persistent_compile_cache`` compiled programs are kept under
  ``cache_root()/jax``, so a campaign's next seed or a restarted run compiles nothing twice."""
  logger.quiet_library_logs()
  if persistent_compile_cache:
    import jax

    from common.metrics import reference

    jax.config.update("jax_compilation_cache_dir", os.path.join(reference.cache_root(), "jax"))


def run_or_exit(run: Callable[..., Any], *args, **kwargs) -> Any:
  """``run(*args, **kwargs)``; a ``ConfigError`` is printed as its one-line message and the
  process exits 2 (the binaries' contract for bad input, see ``common.train.validate``); a
  diverged training run (``loop.NonFiniteLossError``) exits 3."""
  from common.train.loop import NonFiniteLossError

  try:
    return run(*args, **kwargs)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    sys.exit(2)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def config_workdir_binary(
  run: Callable[[Any, str], Any],
  *,
  workdir_help: str = "Run directory (checkpoints, logs, samples).",
) -> None:
  """The whole ``__main__`` of a ``--config=... --workdir=...`` binary: defines the two flags
  (here, never at import, so tests and the quickstart can import several binaries in one
  process), initialises ``jax.distributed`` on a multi-process launch and calls
  ``run(config, workdir)`` through ``run_or_exit``."""
  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset.", lock_config=True
  )
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    # Before anything asks JAX for its devices.
    from common import parallel

    parallel.maybe_initialize_distributed()
    start_binary()
    run_or_exit(run, config.value, workdir.value)

  app.run(main)
