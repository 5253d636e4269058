"""Who holds which images: each user's few-shot subject set and the cluster-wide model's data.

User i's subject is one digit class (``hybrid.user_classes[i]``) and it holds ``hybrid.shots``
images of it from the train split (DreamBooth's 5-10 subject photos). The cluster-wide model trains
on the generic data (every train image of a class no user has, or every train image) plus the
union of the users' shots, repeated ``hybrid.union_repeats`` times so the few subject images are
not drowned out (the paper's cluster model is a DreamBooth fine-tune on the union alone).

Indices are into the train split (``common.data.load_split(config.data, "train")``); the choice
of shots depends on ``config.seed`` only, so stage 1, stage 2 and every binary agree on it.
"""

from __future__ import annotations

import numpy as np

from common import data
from common.train.validate import ConfigError

GENERIC = ("other_classes", "all")


def validate(config, data_info) -> None:
  """The data fields of ``hybrid.*``; raises ``ConfigError`` naming the field."""
  h = config.hybrid
  u = h.num_users
  if not isinstance(u, int) or isinstance(u, bool) or u < 1:
    raise ConfigError("hybrid.num_users", u, "must be an integer >= 1")
  classes = tuple(h.user_classes)
  if len(classes) != u:
    raise ConfigError(
      "hybrid.user_classes", classes, f"needs one class per user ({u} = hybrid.num_users)"
    )
  k = data_info.num_classes
  if any(not 0 <= int(c) < k for c in classes) or len(set(classes)) != len(classes):
    raise ConfigError("hybrid.user_classes", classes, f"distinct classes in [0, {k})")
  if not isinstance(h.shots, int) or h.shots < 1:
    raise ConfigError("hybrid.shots", h.shots, "must be an integer >= 1")
  if h.generic not in GENERIC:
    raise ConfigError("hybrid.generic", h.generic, "allowed: " + ", ".join(GENERIC))
  if not isinstance(h.union_repeats, int) or h.union_repeats < 1:
    raise ConfigError("hybrid.union_repeats", h.union_repeats, "must be an integer >= 1")


def user_shot_indices(config) -> list[np.ndarray]:
  """Per user, the sorted int64 [shots] train indices of its subject images."""
  labels = data.load_labels(config.data, "train")
  rng = np.random.default_rng([int(config.seed), 0x5407])
  out = []
  for c in config.hybrid.user_classes:
    members = np.flatnonzero(labels == int(c))
    if len(members) < config.hybrid.shots:
      raise ConfigError(
        "hybrid.shots", config.hybrid.shots, f"class {c} has only {len(members)} train images"
      )
    out.append(np.sort(rng.choice(members, config.hybrid.shots, replace=False)).astype(np.int64))
  return out


def generic_indices(config) -> np.ndarray:
  """int64 train indices of the generic data (no user's shot among them)."""
  labels = data.load_labels(config.data, "train")
  shots = np.concatenate(user_shot_indices(config))
  if config.hybrid.generic == "other_classes":
    keep = ~np.isin(labels, np.asarray(config.hybrid.user_classes))
  else:
    keep = np.ones(len(labels), bool)
  keep[shots] = False
  return np.flatnonzero(keep).astype(np.int64)


def cluster_indices(config) -> np.ndarray:
  """int64 train indices of the cluster-wide model's data: generic + the repeated union."""
  union = np.concatenate(user_shot_indices(config))
  return np.concatenate([generic_indices(config), np.tile(union, config.hybrid.union_repeats)])
