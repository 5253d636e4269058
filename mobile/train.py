"""Trains TFDiff: ``python -m mobile.train --config=configs/mobile.py:digits_config1 --workdir=DIR``.

The shared binary with the mobile config: the loop, checkpoints, logging and resume are
``common.train``'s; ``mobile.method`` plugs the TFDiff network in through the model registry
(``config.model.name = "tfdiff"``).
"""

from absl import app

from common.train.__main__ import main

if __name__ == "__main__":
  app.run(main)
