"""Trains any method: ``python -m common.train --config=configs/ddpm.py:digits --workdir=runs/ddpm``.

Killed at any moment, the same command continues from the latest checkpoint with the same data
order and the same losses. Every config field can be overridden: ``--config.total_steps=200``.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file and preset.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Imported inside main so that on a multi-host launch jax.distributed is initialized before
  # anything asks JAX for its devices.
  from common import parallel

  parallel.maybe_initialize_distributed()
  from common.train import logger, loop
  from common.train.validate import ConfigError

  logger.quiet_library_logs()
  try:
    loop.train(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(str(e), file=sys.stderr)
    sys.exit(2)
  except loop.NonFiniteLossError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main)
