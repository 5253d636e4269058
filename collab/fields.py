"""CollaFuse's config fields: what values they may take and where they live.

They live under ``config.collab.*`` (issue 21), as every method keeps its own fields under its
name; before, they sat at the config's top level (``config.cut_point``), and
``configs.collab.RENAMED`` maps each old name to the new one.

* ``validate``: each field's allowed values, checked at start-up (``ConfigError`` naming it);
* ``upgrade``: a config saved with the old layout (a run's ``config.json``) in the new one; what
  ``CollaFuse`` reads, so ``common.eval`` works on an old run;
* ``in_layout_of``: the config to resume a run with, in the layout its saved config has, so an old
  run resumes with today's command line (the drift check compares like with like);
* ``exit_if_renamed``: an old command line (``--config.cut_point=10``)
  answered with one line naming the new field, and exit code 2.
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections

from common import renamed_fields

# Fields added after the first runs were saved, with the value those runs used.
_ABSENT_IN_OLD_RUNS = {"server_sampling_chain": "global", "client_mesh_axis": ""}


def _renamed() -> dict[str, str]:
  from configs.collab import RENAMED

  return RENAMED


def _is_old_layout(tree) -> bool:
  return "collab" not in tree and any(old in tree for old in _renamed())


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with CollaFuse's fields under ``collab.*``: itself when already so, else a copy
  with each old top-level field moved to its new place (and the fields old runs predate at the
  value they ran with)."""
  if not _is_old_layout(config):
    return config
  tree = renamed_fields.move(config.to_dict(), _renamed())
  for name, value in _ABSENT_IN_OLD_RUNS.items():
    tree["collab"].setdefault(name, value)
  return ml_collections.ConfigDict(tree)


def in_layout_of(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """``config`` (new layout) as the run in ``workdir`` saved its config: with the old top-level
  fields when its ``config.json`` predates ``collab.*``, else ``config`` itself. The saved file is
  left as it is (``common.eval`` reads either layout through ``upgrade``)."""
  path = os.path.join(workdir, "config.json")
  if "collab" not in config or not os.path.exists(path):
    return config
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return config  # the drift check reports an unreadable saved config
  if not isinstance(saved, dict) or not _is_old_layout(saved):
    return config
  flat = copy.deepcopy(config)
  with flat.unlocked():
    for old, new in _renamed().items():
      if old in saved or new.split(".", 1)[1] not in _ABSENT_IN_OLD_RUNS:
        flat[old] = config[new]
    del flat["collab"]
  return flat


def exit_if_renamed(argv: list[str]) -> None:
  """A binary's first step: an old command line exits 2 with ``error: --config.cut_point is now
  --config.collab.cut_point`` instead of absl's unknown-field message."""
  renamed_fields.exit_if_renamed(argv, _renamed())


OFFSETS = ("none", "code")
# common.train.parties.PARTY_LOOPS (tested equal), named here so that reading a config needs no JAX.
CLIENT_LOOPS = ("vmap", "scan", "unroll")
PARTITIONS = ("iid", "by_class", "dirichlet", "by_attribute")
CLIENT_MESH_AXES = ("", "data", "fsdp", "model")


def validate(config, data_info) -> None:
  """CollaFuse's own fields (``collab.*``, either layout: ``upgrade``); raises
  ``ConfigError`` naming the field."""
  from collab import server
  from common.train import validate as v

  config = upgrade(config)
  big_t = config.diffusion.num_timesteps
  k = v.require(config, "collab.num_clients", v.integer(1), "must be an integer >= 1")
  v.require(
    config, "collab.cut_point", v.integer(0, big_t),
    f"must be an integer in [0, {big_t}] (diffusion.num_timesteps)",
  )  # fmt: skip
  v.require_choice(config, "collab.server_noising", server.NOISINGS)
  v.require_choice(config, "collab.server_sampling_chain", server.SAMPLING_CHAINS)
  v.require_choice(config, "collab.client_start_offset", OFFSETS)
  v.require_choice(config, "collab.client_loop", CLIENT_LOOPS)
  v.require(
    config, "collab.client_mesh_axis", lambda a: a in CLIENT_MESH_AXES,
    "allowed: '' (FSDP rule), data, fsdp, model",
  )  # fmt: skip
  partition = v.require_choice(config, "collab.partition", PARTITIONS)
  v.require(config, "collab.classes_per_client", v.integer(1), "must be an integer >= 1")
  v.require(
    config, "collab.dirichlet_alpha", v.number(lambda a: a > 0), "must be a finite number > 0"
  )
  v.require(config, "collab.share_labels", v.boolean, "must be true or false")
  v.require(
    config, "diffusion.loss", lambda loss: loss == "simple",
    "CollaFuse trains with the simple loss (the server's data, x_cut, is not 8-bit)",
  )  # fmt: skip
  n_groups = data_info.num_classes
  if partition == "by_attribute":
    names = list(data_info.attribute_names)
    v.require(
      config, "collab.partition_attribute", lambda _: names,
      f"data.name={config.data.name!r} has no attributes",
    )  # fmt: skip
    attribute = v.require_choice(config, "collab.partition_attribute", names)
    n_groups = data_info.num_attribute_values[names.index(attribute)]
  if partition in ("by_class", "by_attribute") and k > n_groups:
    raise v.ConfigError(
      "collab.num_clients",
      k,
      f"a {partition} split needs at most one client per class ({n_groups} here)",
    )
