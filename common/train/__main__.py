"""Trains any method: ``python -m common.train --config=configs/ddpm.py:digits --workdir=runs/ddpm``.

Killed at any moment, the same command continues from the latest checkpoint with the same data
order and the same losses. Every config field can be overridden: ``--config.total_steps=200``.
A bad config exits 2 with one line naming the field; a diverged loss exits 3.
"""


def run(config, workdir: str):
  """The shared loop on ``config``'s method; what ``collab.train`` and ``mobile.train`` run too."""
  from common.train import loop

  return loop.train(config, workdir)


if __name__ == "__main__":
  from common.train import cli

  cli.config_workdir_binary(run)
