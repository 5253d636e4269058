"""Trains CollaFuse: ``python -m collab.train --config=configs/collab.py:digits --workdir=DIR``.

The shared binary with CollaFuse's config: the loop, checkpoints (server and all clients together),
logging and resume are ``common.train``'s; ``collab.method`` supplies the split training step.
"""

from common.train.__main__ import run

if __name__ == "__main__":
  from common.train import cli

  cli.config_workdir_binary(run)
