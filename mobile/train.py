"""Trains TFDiff: ``python -m mobile.train --config=configs/mobile.py:digits_config1 --workdir=DIR``.

The shared binary with the mobile config: the loop, checkpoints, logging and resume are
``common.train``'s; ``mobile.method`` plugs the TFDiff network in through the model registry
(``config.model.name = "tfdiff"``).
"""

from common.train.__main__ import run

if __name__ == "__main__":
  from common.train import cli

  cli.config_workdir_binary(run)
