"""Config fields that a method renamed or moved: old command lines and runs saved before.

A method lists its renames as ``{old dotted name: new dotted name}`` (``configs.collab.RENAMED``,
``configs.hybrid.RENAMED``) and uses these helpers (``collab.fields``, ``hybrid.fields``):

* ``exit_if_renamed``: a binary's first step; ``--config.<old>=...`` exits 2 with one line naming
  the new field, instead of absl's unknown-field message;
* ``saved_names``: which old names a run's saved ``config.json`` still has;
* ``move``: a config (or a nested dict) with fields moved from one name to another, to read a
  saved config under today's names or to resume a run under the names it was saved with.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Mapping

import ml_collections


def renamed_override(argv: list[str], renamed: Mapping[str, str]) -> str | None:
  """The first ``--config.<old>`` of ``argv`` naming a renamed field, as one line naming its new
  name; None when there is none."""
  for arg in argv:
    if arg.startswith("--config."):
      old = arg[len("--config.") :].split("=", 1)[0]
      if old in renamed:
        return f"--config.{old} is now --config.{renamed[old]}"
  return None


def exit_if_renamed(argv: list[str], renamed: Mapping[str, str]) -> None:
  """Exits 2 with ``error: --config.<old> is now --config.<new>`` when ``argv[1:]`` sets a
  renamed field."""
  message = renamed_override(argv[1:], renamed)
  if message is not None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def has(tree, dotted: str) -> bool:
  """Whether the nested dict / ConfigDict ``tree`` has the field ``dotted`` (``a.b.c``)."""
  node = tree
  for part in dotted.split("."):
    if not isinstance(node, Mapping | ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def move(tree, renames: Mapping[str, str]):
  """A copy of ``tree`` (nested dict or ConfigDict) with each field ``old`` of ``renames`` that it
  has moved to ``new`` (parents created as needed; a parent left empty is removed)."""
  tree = copy.deepcopy(tree)
  config = isinstance(tree, ml_collections.ConfigDict)
  if config:
    with tree.unlocked():
      _move(tree, renames, ml_collections.ConfigDict)
  else:
    _move(tree, renames, dict)
  return tree


def _move(tree, renames: Mapping[str, str], node_type) -> None:
  for old, new in renames.items():
    if not has(tree, old):
      continue
    *parents, leaf = old.split(".")
    path = [tree]
    for part in parents:
      path.append(path[-1][part])
    value = path[-1][leaf]
    del path[-1][leaf]
    for node, part in zip(reversed(path[:-1]), reversed(parents), strict=True):
      if len(node[part]) == 0:
        del node[part]
    *parents, leaf = new.split(".")
    node = tree
    for part in parents:
      if part not in node:
        node[part] = node_type()
      node = node[part]
    node[leaf] = value


def saved_names(workdir: str, renamed: Mapping[str, str]) -> list[str]:
  """The old names of ``renamed`` that the run in ``workdir`` saved its config with (none when it
  has no readable ``config.json``: the drift check reports an unreadable one)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return []
  if not isinstance(saved, dict):
    return []
  return [old for old in renamed if has(saved, old) and not has(saved, renamed[old])]
