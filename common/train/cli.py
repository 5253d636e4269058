"""What the method binaries share around their ``run(config, workdir)``: quiet library logs, one
persistent compile cache for campaigns, and config errors as one line with exit code 2."""

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
  process exits 2 (the binaries' contract for bad input, see ``common.train.validate``)."""
  try:
    return run(*args, **kwargs)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    sys.exit(2)
