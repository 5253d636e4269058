"""Checkpoints: the only module that imports orbax.

A checkpoint at step N holds the train state *after* N updates, the data iterator's state (so a
resumed run reads exactly the batches an uninterrupted one would) and the resolved config, as three
items of one orbax step directory. Saves are asynchronous and atomic: a process killed mid-save
leaves a temporary directory that orbax ignores, and the previous checkpoint stays restorable.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
  """The checkpoint on disk does not fit the model being restored into."""


def _path_str(path) -> str:
  parts = []
  for k in path:
    key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    parts.append(str(key))
  return "/".join(parts)


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in leaves:
    shape = tuple(getattr(leaf, "shape", ()) or ())
    dtype = str(getattr(leaf, "dtype", ""))
    out[_path_str(path)] = (shape, dtype)
  return out


def check_compatible(saved_metadata: Any, abstract_state: Any, directory: str) -> None:
  """Raises ``CheckpointMismatchError`` naming the first parameter whose name or shape differs.

  Args:
    saved_metadata: the tree of array metadata orbax recorded for the saved state.
    abstract_state: the tree of ``jax.ShapeDtypeStruct`` of the state we would restore into.
    directory: the checkpoint, for the message.
  """
  saved = _flat_shapes(saved_metadata)
  wanted = _flat_shapes(abstract_state)
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  if missing:
    raise CheckpointMismatchError(
      f"checkpoint {directory} has no parameter {missing[0]!r} that the model has "
      f"({len(missing)} missing in all); it was written by a different model or config"
    )
  if unexpected:
    raise CheckpointMismatchError(
      f"checkpoint {directory} has parameter {unexpected[0]!r} that the model does not "
      f"({len(unexpected)} unexpected in all); it was written by a different model or config"
    )
  for name in sorted(wanted):
    if saved[name][0] != wanted[name][0]:
      raise CheckpointMismatchError(
        f"checkpoint {directory}: parameter {name!r} has shape {saved[name][0]} in the "
        f"checkpoint but {wanted[name][0]} in the model"
      )


class Checkpointer:
  """Saves and restores (state, data iterator, config) under ``<workdir>/checkpoints``.

  Also turns SIGTERM (what schedulers and TPU maintenance send before preemption) and orbax's
  multi-host preemption signal into ``should_stop``, so the loop can save and exit cleanly.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=save_interval_steps,
      create=True,
      enable_async_checkpointing=True,
    )
    # Handlers named up front: a fresh process must be able to read an item's metadata (to check
    # it against the model) before it has saved or restored anything.
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
    )
    self._sigterm = threading.Event()
    self._previous_handler = None

  def install_signal_handler(self) -> None:
    """Catches SIGTERM so the loop can save before the process is taken away."""
    if threading.current_thread() is not threading.main_thread():
      return

    def handler(signum, frame):  # noqa: ARG001
      logging.warning("SIGTERM received: saving a checkpoint and stopping at the next step")
      self._sigterm.set()

    self._previous_handler = signal.signal(signal.SIGTERM, handler)

  def should_stop(self, step: int) -> bool:
    """True once a preemption was signalled (SIGTERM here, or orbax's multi-host signal)."""
    return self._sigterm.is_set() or self._manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    data_iterator: Any | None,
    config_json: str,
    *,
    force: bool = False,
  ) -> bool:
    """Saves asynchronously; returns whether a save was started for ``step``."""
    items = {
      "state": ocp.args.StandardSave(state),
      "config": ocp.args.JsonSave(json.loads(config_json)),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores the state at ``step`` into the shardings of ``abstract_state``.

    ``data_iterator`` (a grain iterator), if given, is moved to the saved position in place.

    Raises:
      CheckpointMismatchError: the saved parameters' names or shapes differ from the model's.
    """
    metadata = self._manager.item_metadata(step)
    saved_state = metadata["state"] if "state" in metadata else metadata.state
    where = os.path.join(self.directory, str(step))
    check_compatible(saved_state, abstract_state, where)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def abstract_like(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` tree with the shardings of ``tree``'s arrays."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
    tree,
  )
