"""Trains CollaFuse: ``python -m collab.train --config=configs/collab.py:digits --workdir=DIR``.

The shared binary with CollaFuse's config: the loop, checkpoints (server and all clients together),
logging and resume are ``common.train``'s; ``collab.method`` supplies the split training step.
A command line with a field's old top-level name (``--config.cut_point=10``) exits 2 naming its
new place (``--config.collab.cut_point``); a run saved before ``collab.*`` resumes as it was
(``collab.fields``).
"""

import sys


def run(config, workdir: str):
  """The shared loop on ``config``, in the config layout of the run ``workdir`` holds."""
  from collab import fields
  from common.train import loop

  return loop.train(fields.in_layout_of(config, workdir), workdir)


if __name__ == "__main__":
  from collab import fields
  from common.train import cli

  fields.exit_if_renamed(sys.argv)
  cli.config_workdir_binary(run)
