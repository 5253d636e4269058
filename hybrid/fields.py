"""hybrid's renamed config fields: the cut point's one name (issue 21).

The level where a request's latent leaves the edge for its device is ``cut_point`` in every
method; hybrid's fields called it ``split`` before (``hybrid.eval_split``,
``scheduler.eval.fixed_splits``, ...). ``configs.hybrid.RENAMED`` maps each old name to the new.

* ``exit_if_renamed``: ``hybrid.train`` and ``hybrid.optimize`` answer an old command line
  (``--config.hybrid.eval_split=100``) with one line naming the new field, and exit code 2;
* ``upgrade``: a config saved with the old names (a run's ``config.json``) under the new ones;
  what ``Hybrid`` and ``models.load_run`` read, so ``common.eval``, ``hybrid.profile`` and
  ``hybrid.serve`` work on an old run;
* ``in_layout_of``: the config to resume a run with, under the names its saved config has, so an
  old run resumes with today's command line (the drift check compares like with like).
"""

from __future__ import annotations

import ml_collections

from common import renamed_fields


def _renamed() -> dict[str, str]:
  from configs.hybrid import RENAMED

  return RENAMED


def exit_if_renamed(argv: list[str]) -> None:
  """A binary's first step: ``error: --config.hybrid.eval_split is now
  --config.hybrid.eval_cut_point`` and exit 2 for an old command line."""
  renamed_fields.exit_if_renamed(argv, _renamed())


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with today's field names: itself when it has none of the old ones, else a copy
  with each old field renamed."""
  if not any(renamed_fields.has(config, old) for old in _renamed()):
    return config
  return renamed_fields.move(config, _renamed())


def in_layout_of(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """``config`` (today's names) as the run in ``workdir`` saved its config: each field its saved
  ``config.json`` has under an old name renamed back, else ``config`` itself. The saved file is
  left as it is (``upgrade`` reads either)."""
  renamed = _renamed()
  old_names = renamed_fields.saved_names(workdir, renamed)
  if not old_names:
    return config
  return renamed_fields.move(config, {renamed[old]: old for old in old_names})
