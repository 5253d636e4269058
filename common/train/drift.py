"""Config drift on resume: a resumed run trains on with the config its checkpoints were made with.

A run's workdir holds ``config.json``, the config in force. A resume compares the resolved config
with it, field by field (dotted names). Fields in ``RESUMABLE`` change nothing the checkpoints
hold or the steps already taken mean, so they may differ; any other difference is refused with one
line listing each field with its old and new value, unless the launch names it in
``--allow_config_change`` (``allow``). Every accepted difference is appended to
``config_history.jsonl`` (``{"step", "changed": {field: {"old", "new"}}, "how"}``): from that step
on the new value holds, and the record of the steps before it stays true. Then ``config.json``
becomes the new config.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any

import ml_collections

from common import fileio
from common.train.validate import ConfigError

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

# Harmless on resume: how long to train, how often to log / save / sample and how many checkpoints
# to keep, the sample grid's size, and the mesh (the batch is global, and a checkpoint is restored
# into any layout; only the reduction order of float sums changes).
RESUMABLE = (
  "total_steps",
  "log_every_steps",
  "ckpt_every_steps",
  "sample_every_steps",
  "keep_checkpoints",
  "num_sample_images",
  "mesh.*",
)

_allowed: tuple[str, ...] = ()


class ConfigDriftError(ConfigError):
  """A resume whose config differs from the saved one in fields it may not change."""

  def __init__(self, fields: list[str], message: str):
    self.field, self.value, self.allowed = ",".join(fields), None, message
    ValueError.__init__(self, f"config error: {message}")


def allow(fields: list[str] | tuple[str, ...]) -> None:
  """Sets the fields a resume may change besides ``RESUMABLE`` (the ``--allow_config_change``
  flag of every binary; patterns like ``optimizer.*`` work)."""
  global _allowed
  _allowed = tuple(f.strip() for f in fields if f.strip())


# Fields added to the configs after runs were saved without them, each with the value that keeps
# what those runs did: a saved config lacking one reads as that value, so a run (or campaign)
# saved before the field existed resumes as it was instead of being refused.
ADDED_FIELDS = {
  "diffusion.timestep_spacing": "uniform",
  "diffusion.x0_clipping": "static",
  "diffusion.dynamic_threshold_percentile": 0.95,
  "adaptive.stage2_ema_decay": -1.0,  # stage 2 on the run's ema_decay
}


def added_field(config: ml_collections.ConfigDict, name: str) -> Any:
  """``config``'s value of the ``ADDED_FIELDS`` field ``name`` (dotted), or, in a config saved
  before the field existed, the value that keeps what that run did."""
  node = config
  for part in name.split("."):
    if part not in node:
      return ADDED_FIELDS[name]
    node = node[part]
  return node


def with_added_fields(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
  """``saved`` (flat, dotted) with each ``ADDED_FIELDS`` field it lacks and ``current`` has."""
  added = {k: v for k, v in ADDED_FIELDS.items() if k in current and k not in saved}
  return {**saved, **added}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (JSON makes tuples lists)."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out: dict[str, Any] = {}
  for k, v in tree.items():
    name = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, dict) and v:
      out.update(flatten(v, name))
    else:
      out[name] = v
  return out


def _matches(field: str, patterns: tuple[str, ...]) -> bool:
  return any(fnmatch.fnmatchcase(field, p) for p in patterns)


def differences(saved: dict, current: dict) -> dict[str, dict[str, Any]]:
  """``{field: {"old", "new"}}`` for every dotted field whose value differs (or exists once)."""
  b = flatten(current)
  a = with_added_fields(flatten(saved), b)
  missing = object()
  out = {}
  for field in sorted(set(a) | set(b)):
    old, new = a.get(field, missing), b.get(field, missing)
    if old != new:
      out[field] = {
        "old": None if old is missing else old,
        "new": None if new is missing else new,
      }
  return out


def check_resume(
  workdir: str, config: ml_collections.ConfigDict, resumable: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
  """The accepted differences between ``config`` and ``workdir/config.json`` (empty when there
  is no saved config); writes nothing. ``resumable``: patterns the caller knows do not affect
  this run (adaptive's stage 1 ignores ``adaptive.*``), accepted like ``RESUMABLE``.

  Raises:
    ConfigDriftError: a field outside ``RESUMABLE``, ``resumable`` and the allowed ones differs.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(
      CONFIG_FILE, path, f"unreadable saved config ({e}); restore or delete it"
    ) from e
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  diff = differences(saved, current)
  refused = {k: v for k, v in diff.items() if not _matches(k, RESUMABLE + resumable + _allowed)}
  if refused:
    listed = "; ".join(f"{k}: {v['old']!r} -> {v['new']!r}" for k, v in refused.items())
    raise ConfigDriftError(
      list(refused),
      f"the config differs from the one {workdir} was trained with ({listed}); pass "
      f"--allow_config_change={','.join(refused)} to resume with the new values",
    )
  return {k: {**v, "how": _how(k, resumable)} for k, v in diff.items()}


def _how(field: str, resumable: tuple[str, ...]) -> str:
  return "resumable" if _matches(field, RESUMABLE + resumable) else "--allow_config_change"


def record(workdir: str, config_json: str, changed: dict[str, dict[str, Any]], step: int) -> None:
  """Appends the accepted ``changed`` fields at ``step`` to the history and writes the config."""
  if changed:
    how = {k: v["how"] for k, v in changed.items()}
    values = {k: {"old": v["old"], "new": v["new"]} for k, v in changed.items()}
    line = json.dumps({"step": int(step), "changed": values, "how": how}, sort_keys=True)
    history = os.path.join(workdir, HISTORY_FILE)
    previous = open(history).read() if os.path.exists(history) else ""
    fileio.write_text(history, previous + line + "\n")
  fileio.write_text(os.path.join(workdir, CONFIG_FILE), config_json)
