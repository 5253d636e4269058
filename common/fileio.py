"""Files written whole or not at all: the one way this repo writes a result, a cache or a record.

Every writer goes through ``atomic_path`` (or the helpers over it): the bytes go to a temporary file
with a unique name in the target's own directory, are flushed to disk, and only then take the
target's name with ``os.replace`` (atomic on POSIX within one filesystem). A reader, a resumed run
or a second process writing the same target at the same moment never sees half a file, and two
writers never share a temporary file. A write that fails leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a unique temporary path next to ``path``; on success it replaces ``path``.

  The temporary name keeps ``path``'s extension, so libraries that infer a format from the name
  (``PIL.Image.save``, ``matplotlib``'s ``savefig``, ``np.savez``) write the same format. The
  parent directory is created if missing.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  base = os.path.basename(path)
  ext = os.path.splitext(base)[1]
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=directory)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_figure(fig: Any, path: str, dpi: float | None = None) -> str:
  """Saves a matplotlib figure at ``path`` atomically (format from the extension), then closes it
  so that a long run drawing many figures keeps no memory for them. Returns ``path``."""
  import matplotlib.pyplot as plt

  try:
    with atomic_path(path) as tmp:
      fig.savefig(tmp, **({} if dpi is None else {"dpi": dpi}))
  finally:
    plt.close(fig)
  return path


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
  """``open`` for writing (``"w"`` or ``"wb"``) whose file appears at ``path`` only when closed
  without an error."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
  with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
    yield f


def write_text(path: str, text: str) -> str:
  """Writes ``text`` to ``path`` atomically; returns ``path``."""
  with atomic_open(path) as f:
    f.write(text)
  return path


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> str:
  """``json.dump(obj)`` to ``path`` atomically (``indent=2`` unless given); returns ``path``."""
  dump_kwargs.setdefault("indent", 2)
  with atomic_open(path) as f:
    json.dump(obj, f, **dump_kwargs)
  return path


def save_npz(path: str, **arrays: Any) -> str:
  """``np.savez(path, **arrays)`` atomically; ``path`` is used as given (no ``.npz`` appended)."""
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)
  return path


class DamagedFileError(ValueError):
  """A checkpoint file that cannot be read back as it was written (torn, truncated, altered)."""


_DIGESTS_KEY = "__sha256__"


def _digest(array: np.ndarray) -> str:
  import hashlib

  a = np.ascontiguousarray(array)
  h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def save_npz_checked(path: str, **arrays: Any) -> str:
  """``save_npz`` plus a sha256 of every array (dtype, shape and bytes), verified by
  ``load_npz_checked``: what the npz checkpoints (cdc's, hybrid's agent) are written with."""
  host = {k: np.asarray(v) for k, v in arrays.items()}
  digests = {k: _digest(v) for k, v in host.items()}
  return save_npz(path, **host, **{_DIGESTS_KEY: np.asarray(json.dumps(digests, sort_keys=True))})


def load_npz_checked(path: str) -> dict[str, np.ndarray]:
  """Every array of a ``save_npz_checked`` file, each checked against its saved sha256.

  Raises:
    DamagedFileError: the file is unreadable, lacks its digests, or an array differs from what
      was saved; the message names the file and the first array that failed.
  """
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: np.asarray(f[k]) for k in f.files}
  except Exception as e:  # zipfile, zlib, ValueError, EOFError, OSError: all mean a torn file
    raise DamagedFileError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
  if _DIGESTS_KEY not in arrays:
    raise DamagedFileError(f"{path}: no checksums (not written by save_npz_checked)")
  digests = json.loads(str(arrays.pop(_DIGESTS_KEY)))
  if sorted(digests) != sorted(arrays):
    missing = sorted(set(digests) ^ set(arrays))
    raise DamagedFileError(f"{path}: arrays {missing} missing or unexpected")
  for k in sorted(arrays):
    if _digest(arrays[k]) != digests[k]:
      raise DamagedFileError(f"{path}: array {k!r} does not match its checksum")
  return arrays


class NoIntactFileError(DamagedFileError):
  """Neither a rotated checkpoint nor the one kept before it can be read back intact;
  ``failures`` names each file and what failed."""

  def __init__(self, failures: list[str]):
    self.failures = failures
    super().__init__("no intact checkpoint: " + "; ".join(failures))


def rotated_paths(path: str) -> tuple[str, str, str]:
  """``(path, <stem>.prev.npz, <stem>.next.npz)``: a rotated npz checkpoint's files."""
  stem = os.path.splitext(path)[0]
  return path, stem + ".prev.npz", stem + ".next.npz"


def save_npz_rotated(path: str, read_back: Any, **arrays: Any) -> None:
  """``save_npz_checked`` a checkpoint that keeps the one it replaces as ``<stem>.prev.npz``.

  The new file is staged at ``<stem>.next.npz`` and read back with ``read_back(staged)`` (which
  raises ``DamagedFileError``) before the rotation (old -> ``.prev``, staged -> ``path``), so a
  crash at any point leaves an intact checkpoint behind.
  """
  _, prev, staged = rotated_paths(path)
  save_npz_checked(staged, **arrays)
  read_back(staged)
  if os.path.exists(path):
    os.replace(path, prev)
  os.replace(staged, path)


def newest_intact_npz(path: str, read: Any) -> tuple[str, Any, list[str]] | None:
  """The newest of ``path`` and ``<stem>.prev.npz`` that ``read(p)`` reads without a
  ``DamagedFileError``: ``(p, read(p), failures)``, where ``failures`` names each newer file that
  was missing or damaged and what failed (for the caller's one warning line). A damaged newer file
  is set aside as ``<stem>.damaged.npz`` so the next rotation cannot push it over the intact one.
  None when neither file exists (a fresh run).

  Raises:
    NoIntactFileError: files exist and none reads intact; the message names each and what failed.
  """
  candidates = rotated_paths(path)[:2]
  if not any(os.path.exists(p) for p in candidates):
    return None
  failures, damaged = [], []
  for p in candidates:
    if not os.path.exists(p):
      failures.append(f"{p}: missing")
      continue
    try:
      value = read(p)
    except DamagedFileError as e:
      failures.append(" ".join(str(e).split()))
      damaged.append(p)
      continue
    for bad in damaged:
      os.replace(bad, os.path.splitext(bad)[0] + ".damaged.npz")
    return p, value, failures
  raise NoIntactFileError(failures)
