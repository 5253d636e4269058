"""Checkpoints: the only module that imports orbax.

A checkpoint at step N holds the train state *after* N updates, the data iterator's state (so a
resumed run reads exactly the batches an uninterrupted one would) and the resolved config, as three
items of one orbax step directory. The data position is the number of global batches consumed, the
same on every process, so a step written by P processes resumes with any other count (the state is
re-sharded onto the new mesh by orbax). Saves are asynchronous and atomic: a process killed mid-save
leaves a temporary directory that orbax ignores, and the previous checkpoint stays restorable.
Each finished step is sealed with a manifest of its bytes and verified at restore
(``integrity.py``); errors here are ``CheckpointError``s, which the binaries print as one line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from common.checkpoint import integrity


def _one_writer_per_array_in_one_process() -> None:
  """Orbax's replica-parallel saving (its default off GPUs) splits every array replicated over N
  devices into N slices, one written from each replica, so that the processes holding replicas
  share the writing. In one process it buys nothing, and each distinct slice is one more small
  program to compile: a tiny model replicated over 8 devices compiled 192 of them at its first
  save. With one process, each array is written whole from one device instead; a multi-process
  run keeps orbax's default."""
  if jax.process_count() == 1:
    ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
    )


class CheckpointError(ValueError):
  """A checkpoint problem the binaries report as one line and exit 2 (``common.train.cli``)."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint on disk does not fit the model being restored into."""


class CheckpointDamagedError(CheckpointError):
  """A checkpoint whose bytes differ from its manifest, that cannot be read, or that holds NaNs."""


class NoIntactCheckpointError(CheckpointError):
  """A run has checkpoints and every one of them is damaged."""


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in leaves:
    shape = tuple(getattr(leaf, "shape", ()) or ())
    dtype = str(getattr(leaf, "dtype", ""))
    out[integrity.path_str(path)] = (shape, dtype)
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

  Integrity (``integrity.py``): a step is *sealed* with a manifest of its files' sha256 once its
  write has finished and it is vouched for; a save marked ``provisional`` is vouched for only by
  ``confirm`` (the loop calls it when the next training step's loss is finite) and removed by
  ``discard`` (that loss was not). ``restore_latest`` takes the newest step that matches its
  manifest, reads and holds only finite numbers; damaged ones are reported in one warning line
  each and moved to ``<directory>_damaged/``. Rotation keeps the newest ``max_to_keep`` sealed
  steps, so the last intact checkpoint is never deleted before a newer one is sealed.

  Also turns SIGTERM (what schedulers and TPU maintenance send before preemption) and orbax's
  multi-host preemption signal into ``should_stop``, so the loop can save and exit cleanly; a
  SIGTERM that arrives while the loop is still compiling ends the process at once (see
  ``install_signal_handler``).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1):
    self.directory = os.path.abspath(directory)
    self.max_to_keep = max_to_keep
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None,  # rotation is ours: only sealed steps count (see ``_rotate``)
      save_interval_steps=save_interval_steps,
      create=True,
      enable_async_checkpointing=True,
    )
    _one_writer_per_array_in_one_process()
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
    # Steps this object saved whose manifest is not written yet: step -> True / False (seal as
    # confirmed / on finite parameters only, once the write finishes) or None (provisional).
    self._unsealed: dict[int, bool | None] = {}
    self._is_primary = jax.process_index() == 0
    self._sigterm = threading.Event()
    self._previous_handler = None
    self._compiling = threading.Event()
    self._resume_note = "no checkpoint was saved yet"

  # --- Preemption. ------------------------------------------------------------------------------

  def install_signal_handler(self) -> None:
    """Catches SIGTERM so the loop can save before the process is taken away.

    A Python signal handler only runs between bytecodes, so one that arrives while XLA compiles
    (minutes, and growing in memory, for a paper-scale step on a CPU) would wait for the compile.
    The C-level handler also writes the signal to a wakeup socket that a watchdog thread reads at
    once: while ``compiling`` is set (before the first step of this process returns) it prints
    that no checkpoint was written and exits 143; later, the loop saves at the next step.
    """
    if threading.current_thread() is not threading.main_thread():
      return
    if jax.process_count() > 1:
      # Every process must stop at the same step: JAX's preemption sync manager (which catches
      # SIGTERM in C++ on each process) agrees on one through ``reached_preemption``. A Python
      # handler would replace its notifier, and each process would stop wherever it saw the signal.
      return

    def handler(signum, frame):  # noqa: ARG001
      logging.warning("SIGTERM received: saving a checkpoint and stopping at the next step")
      self._sigterm.set()

    self._previous_handler = signal.signal(signal.SIGTERM, handler)
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    self._wakeup = (reader, writer, signal.set_wakeup_fd(writer.fileno()))
    threading.Thread(target=self._watch_signals, args=(reader,), daemon=True).start()

  def _watch_signals(self, reader: socket.socket) -> None:
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        return
      if signal.SIGTERM in data and self._compiling.is_set():
        sys.stderr.write(
          "SIGTERM while compiling the train step: stopping now, no checkpoint was written by "
          f"this run ({self._resume_note}).\n"
        )
        sys.stderr.flush()
        os._exit(143)

  def set_compiling(self, compiling: bool, resume_note: str = "") -> None:
    """Marks the stretch (set-up and the first step's compile) where a SIGTERM exits at once;
    ``resume_note`` says where a rerun would start, for that message."""
    if resume_note:
      self._resume_note = resume_note
    (self._compiling.set if compiling else self._compiling.clear)()

  def should_stop(self, step: int) -> bool:
    """True once a preemption was signalled (SIGTERM here, or orbax's multi-host signal)."""
    return self._sigterm.is_set() or self._manager.reached_preemption(step)

  # --- Steps. -----------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_sealed_step(self) -> int | None:
    """The newest step with a manifest (vouched for when it was sealed); None if none is."""
    for step in sorted(self.all_steps(), reverse=True):
      if step not in self._unsealed and integrity.read_manifest(self.step_dir(step)) is not None:
        return step
    return None

  def latest_good_step(self) -> int | None:
    """The newest step vouched for: sealed, or saved here and confirmed / final but not sealed
    yet (its write may still be in flight). None if there is none."""
    vouched = [s for s, v in self._unsealed.items() if v is not None]
    sealed = self.latest_sealed_step()
    return max(vouched + ([] if sealed is None else [sealed]), default=None)

  def is_adopted(self, step: int) -> bool:
    """Whether ``step`` waits for ``confirm`` / ``discard`` (saved provisional, or adopted)."""
    return step in self._unsealed and self._unsealed[step] is None

  # --- Save, seal, rotate. ----------------------------------------------------------------------

  def save(
    self,
    step: int,
    state: Any,
    data_iterator: Any | None,
    config_json: str,
    *,
    force: bool = False,
    provisional: bool = False,
  ) -> bool:
    """Saves asynchronously; returns whether a save was started for ``step``.

    The step is sealed once written, on finite parameters only, unless ``provisional``: then it
    waits for ``confirm`` or ``discard``. The caller checks the state is finite before saving.
    """
    self._seal_finished()
    items = {
      "state": ocp.args.StandardSave(state),
      "config": ocp.args.JsonSave(json.loads(config_json)),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    started = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if started:
      self._unsealed[step] = None if provisional else False
    return started

  def adopt(self, step: int) -> None:
    """Treats an unsealed step on disk (restored on a finiteness check only) as provisional."""
    self._unsealed[step] = None

  def confirm(self, step: int) -> None:
    """The loss of the step after ``step`` was finite: seal ``step`` as confirmed."""
    if step in self._unsealed:
      self._unsealed[step] = True

  def discard(self, step: int) -> None:
    """The loss of the step after ``step`` diverged: ``step`` is past the divergence."""
    self._manager.wait_until_finished()
    self._unsealed.pop(step, None)
    if step in self.all_steps():
      self._manager.delete(step)
      logging.warning("removed checkpoint %d: the loss of the step after it diverged", step)

  def _seal_finished(self) -> None:
    """Waits for the write in flight, seals every vouched-for step and rotates."""
    self._manager.wait_until_finished()
    for step in sorted(self._unsealed):
      confirmed = self._unsealed[step]
      if confirmed is None:
        continue
      del self._unsealed[step]
      if self._is_primary and os.path.isdir(self.step_dir(step)):
        integrity.seal(self.step_dir(step), confirmed=confirmed)
    if jax.process_count() > 1:
      # Every process decides the rotation from the manifests on disk, and orbax's delete is a
      # collective: all must see process 0's new manifests before any of them decides.
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("segdiff_checkpoint_sealed")
    self._rotate()

  def _rotate(self) -> None:
    """Deletes sealed steps beyond the newest ``max_to_keep`` sealed ones, and unsealed leftovers
    older than the newest sealed step (never vouched for, and superseded)."""
    if not self.max_to_keep:
      return
    sealed, leftovers = [], []
    for step in sorted(self.all_steps(), reverse=True):
      if step in self._unsealed:
        continue
      if integrity.read_manifest(self.step_dir(step)) is not None:
        sealed.append(step)
      elif sealed:
        leftovers.append(step)
    for step in sealed[self.max_to_keep :] + leftovers:
      self._manager.delete(step)

  # --- Restore. ---------------------------------------------------------------------------------

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores the state at ``step`` into the shardings of ``abstract_state``, verified.

    ``data_iterator`` (a grain iterator), if given, is moved to the saved position in place.

    Raises:
      CheckpointMismatchError: the saved parameters' names or shapes differ from the model's.
      CheckpointDamagedError: the files differ from the step's manifest, cannot be read, or the
        state holds a NaN or an infinity.
    """
    where = self.step_dir(step)
    manifest = integrity.read_manifest(where)
    if manifest is not None and (why := integrity.damage(where, manifest)):
      raise CheckpointDamagedError(f"checkpoint {where}: {why}")
    try:
      metadata = self._manager.item_metadata(step)
      saved_state = metadata["state"] if "state" in metadata else metadata.state
    except Exception as e:  # a torn _METADATA: JSON, TensorStore or OS errors
      raise CheckpointDamagedError(
        f"checkpoint {where}: unreadable metadata ({_first_line(e)})"
      ) from e
    check_compatible(saved_state, abstract_state, where)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    # The data position is global batches consumed, the same in every process's file, so a
    # checkpoint resumes with another process count by reading it from the files written.
    positions = _data_positions(where) if data_iterator is not None else {}
    same_count = positions.get("count") == jax.process_count()
    if data_iterator is not None and same_count:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
    except Exception as e:
      raise CheckpointDamagedError(f"checkpoint {where}: unreadable ({_first_line(e)})") from e
    if data_iterator is not None and not same_count:
      _set_position(data_iterator, positions["state"])
      logging.info(
        "checkpoint %d was written by %s processes; this launch has %d: each reads its block of "
        "the same global batches from position %s",
        step, positions["count"], jax.process_count(), positions["state"],
      )  # fmt: skip
    bad = integrity.nonfinite_leaves(state)
    if bad:
      raise CheckpointDamagedError(
        f"checkpoint {where}: non-finite values in {bad[0]} ({len(bad)} arrays in all)"
      )
    return state

  def restore_latest(
    self, abstract_state: Any, data_iterator: Any | None = None
  ) -> tuple[int | None, Any]:
    """The newest intact checkpoint: ``(step, state)``, or ``(None, None)`` when there is none.

    Each damaged step is reported in one warning line and moved to ``<directory>_damaged/`` (so
    the resumed run can save that step number again); an unsealed step (the run stopped before
    vouching for it) is restored on its finiteness alone, with a warning, and ``adopt``-ed.

    Raises:
      NoIntactCheckpointError: there are checkpoints and none is intact (nothing is moved).
      CheckpointMismatchError: the newest readable checkpoint belongs to another model.
    """
    failures: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except CheckpointDamagedError as e:
        why = str(e).split(": ", 1)[-1]
        logging.warning("checkpoint %d is damaged (%s); trying an older one", step, why)
        failures.append((step, why))
        continue
      if integrity.read_manifest(self.step_dir(step)) is None:
        logging.warning(
          "checkpoint %d was never sealed (the run stopped before vouching for it): restored "
          "after a finiteness check only",
          step,
        )
        self.adopt(step)
      self._quarantine([s for s, _ in failures])
      return step, state
    if failures:
      listed = "; ".join(f"step {s}: {why}" for s, why in failures)
      raise NoIntactCheckpointError(f"no intact checkpoint in {self.directory}: {listed}")
    return None, None

  def _quarantine(self, steps: list[int]) -> None:
    if not steps:
      return
    if self._is_primary:
      aside = self.directory + "_damaged"
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}_{int(time.time())}")
        os.replace(self.step_dir(step), target)
        logging.warning("moved damaged checkpoint %d to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("segdiff_checkpoint_quarantine")
    self._manager.reload()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self, *, failed: bool = False) -> None:
    """Finishes the write in flight and seals what is vouched for; provisional steps stay
    unsealed (a resumed run restores them on a finiteness check and confirms them).

    ``failed``: this process is leaving on an error. With several processes it then skips every
    collective (the seal barrier, the rotation, orbax's own close): its peers may be waiting in a
    step this process will never run, and a barrier here would hang both instead of letting the
    error end the job.
    """
    if failed and jax.process_count() > 1:
      logging.error("leaving on an error: checkpoints not sealed or rotated by this process")
    else:
      self._seal_finished()
      self._manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      signal.set_wakeup_fd(self._wakeup[2])
      for sock in self._wakeup[:2]:
        sock.close()
      self._previous_handler = None


def _data_positions(step_dir: str) -> dict:
  """``{"count": processes that wrote the step's data item, "state": their common position}``.

  Raises:
    CheckpointDamagedError: the data item is missing, unreadable, or its files disagree.
  """
  folder = os.path.join(step_dir, "data")
  files = {}
  for name in os.listdir(folder) if os.path.isdir(folder) else []:
    if (m := re.fullmatch(r"process_(\d+)-of-(\d+)\.json", name)) is not None:
      with open(os.path.join(folder, name)) as f:
        files[(int(m.group(1)), int(m.group(2)))] = f.read()
  counts = {n for _, n in files}
  if not files or len(counts) != 1 or len(files) != max(counts):
    raise CheckpointDamagedError(
      f"checkpoint {step_dir}: the data positions are incomplete ({sorted(files)})"
    )
  try:
    states = {json.dumps(json.loads(text), sort_keys=True) for text in files.values()}
  except ValueError as e:
    raise CheckpointDamagedError(f"checkpoint {step_dir}: unreadable data position ({e})") from e
  if len(states) != 1:
    raise CheckpointDamagedError(
      f"checkpoint {step_dir}: the processes saved different data positions {sorted(states)}"
    )
  return {"count": counts.pop(), "state": json.loads(states.pop())}


def _set_position(data_iterator: Any, position: dict) -> None:
  # grain's own iterators take the parsed dict; others (StackedIterator) take the JSON bytes, as
  # grain's checkpoint handler gives them.
  if isinstance(data_iterator, grain.DatasetIterator):
    data_iterator.set_state(position)
  else:
    data_iterator.set_state(json.dumps(position).encode())
  if hasattr(data_iterator, "start_prefetch"):
    data_iterator.start_prefetch()


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
