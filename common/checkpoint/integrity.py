"""What makes a checkpoint trustworthy: a manifest of its bytes, and finite numbers in it.

A checkpoint step directory is *sealed* by writing ``MANIFEST`` into it once orbax has finished
writing it: the sha256 of every file under the directory, and how the step was vouched for
(``confirmed``: the training step after it had a finite loss; otherwise only its parameters were
checked finite, as for a run's last step or a preemption save). A sealed step whose files no longer
hash to the manifest (bytes overwritten, a chunk truncated or deleted, ``_METADATA`` cut short) is
damaged. Restored states are also checked for non-finite values in every floating-point leaf.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import fileio

MANIFEST = "segdiff_integrity.json"
_CHUNK = 1 << 22


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_CHUNK):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST:
        out.append(rel)
  return sorted(out)


def seal(step_dir: str, *, confirmed: bool) -> dict:
  """Writes ``step_dir/MANIFEST`` (atomically) over the directory's files as they are now."""
  files = {rel: _sha256(os.path.join(step_dir, rel)) for rel in _files(step_dir)}
  record = {"version": 1, "confirmed": bool(confirmed), "sealed_at": time.time(), "files": files}
  fileio.write_json(os.path.join(step_dir, MANIFEST), record, sort_keys=True)
  return record


def read_manifest(step_dir: str) -> dict | None:
  """The step's manifest, or None when it was never sealed. A torn manifest reads as damage."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    if not isinstance(record.get("files"), dict):
      raise ValueError("no file list")
    return record
  except (OSError, ValueError) as e:
    return {"damaged": f"unreadable {MANIFEST} ({e})"}


def damage(step_dir: str, manifest: dict) -> str | None:
  """Why ``step_dir`` no longer matches its ``manifest``, or None when every byte does."""
  if "damaged" in manifest:
    return manifest["damaged"]
  want = manifest["files"]
  have = set(_files(step_dir))
  missing = sorted(set(want) - have)
  if missing:
    return f"file {missing[0]} is missing ({len(missing)} in all)"
  for rel in sorted(want):
    if _sha256(os.path.join(step_dir, rel)) != want[rel]:
      size = os.path.getsize(os.path.join(step_dir, rel))
      return f"file {rel} ({size} bytes) does not match its checksum"
  extra = sorted(have - set(want))
  if extra:
    return f"file {extra[0]} was not part of the checkpoint when it was sealed"
  return None


def path_str(path) -> str:
  """A pytree key path as ``"params/conv/kernel"`` (what errors and manifests name a leaf by)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _host_finite(x) -> bool:
  a = np.asarray(x)
  if a.dtype.itemsize < 4:  # bfloat16 and float16: ufuncs on float32 copies
    a = a.astype(np.float32)
  return bool(np.isfinite(a).all())


def _on_this_host_cpu(x) -> bool:
  """Whether ``x`` is host memory numpy can read: a numpy value, or a JAX array on CPU devices
  whose every shard is this process's."""
  if not isinstance(x, jax.Array):
    return True
  return x.is_fully_addressable and all(d.platform == "cpu" for d in x.sharding.device_set)


@jax.jit
def _finite_flags(tree: Any) -> list[jax.Array]:
  return [
    jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    for x in jax.tree.leaves(tree)
  ]


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of ``tree`` holding a NaN or an infinity (sharded arrays
  are reduced on their devices; one boolean per leaf comes to the host)."""
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  leaves = jax.tree.leaves(tree)
  if all(_on_this_host_cpu(x) for x in leaves):
    # Host memory already: numpy reads it in place. The jitted check cost each run 1-3 s of XLA
    # compile for the state's tree (it is compiled per tree), more than the check itself.
    flags = [_host_finite(x) if jnp.issubdtype(x.dtype, jnp.inexact) else True for x in leaves]
  else:
    flags = jax.device_get(_finite_flags(tree))
  return [p for p, ok in zip(paths, flags, strict=True) if not ok]
