"""Compute cost of JAX functions: XLA-counted FLOPs, parameter counts, wall-clock latency.

XLA's counts are remembered next to JAX's persistent compile cache (``memo_dir``), keyed by the
program itself: counting a lowered program converts it to HLO first (1.4-1.8 s for a tiny
two-client collab step on 2 cores, next to other work) and counting a compiled one compiles it,
while the key (the lowered module's bytecode, hashed) takes 0.03 s. A resumed run, the next seed
of a campaign, or a test that builds the same step again reads the count back.

A step with a loop inside is counted on its written-out form (``unrolled_flops``), which costs a
second tracing and lowering (2.7-3.4 s for the tiny collab step); that count is remembered under
the step's own program and the source of every repo module the process has loaded, so a launch of
the same step with the same code skips the written-out form altogether.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from common import fileio

MEMO_SUBDIR = "segdiff_flops"


def analysis_flops(analysis: Any) -> float | None:
  """The ``flops`` of an XLA cost analysis, summed over its programs; None when it has none.

  ``analysis``: what ``Compiled.cost_analysis()`` or ``Lowered.cost_analysis()`` returns (older
  JAX: a list with one dict per program; newer: a single dict, or None).
  """
  if analysis is None:
    analyses = []
  elif isinstance(analysis, dict):
    analyses = [analysis]
  else:
    analyses = list(analysis)
  flops = [a["flops"] for a in analyses if a and "flops" in a]
  return float(sum(flops)) if flops else None


def compiled_flops(compiled: Any) -> float:
  """XLA's FLOP count of a compiled program (``jax.jit(f).lower(...).compile()``).

  Raises:
    RuntimeError: if the backend's cost analysis has no ``flops`` entry.
  """
  analysis = compiled.cost_analysis()
  flops = analysis_flops(analysis)
  if flops is None:
    raise RuntimeError(
      f"XLA cost analysis reported no 'flops' on backend {jax.default_backend()!r} "
      f"(got {analysis!r})"
    )
  return flops


def memo_dir() -> str | None:
  """``<JAX's persistent compile cache>/segdiff_flops``; None when no local cache directory is
  set (then nothing is remembered)."""
  cache = jax.config.jax_compilation_cache_dir
  if not cache or "://" in cache:
    return None
  return os.path.join(cache, MEMO_SUBDIR)


@functools.cache
def _versions() -> str:
  from importlib import metadata

  try:
    jaxlib = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    jaxlib = "?"
  return f"jax {jax.__version__} jaxlib {jaxlib}"


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loaded_source_digest() -> str:
  """sha256 of the source of every module loaded from this repository (paths and contents): what
  a program written out from the same step could differ by."""
  root = REPO_ROOT + os.sep
  paths = set()
  for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and path.endswith(".py") and os.path.abspath(path).startswith(root):
      paths.add(os.path.abspath(path))
  digest = hashlib.sha256()
  for path in sorted(paths):
    digest.update(os.path.relpath(path, REPO_ROOT).encode() + b"\0")
    try:
      with open(path, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
    except OSError:
      digest.update(b"unreadable")
  return digest.hexdigest()


def _memo_key(lowered: Any, kind: str) -> str:
  """The program's identity for a count of ``kind``: its StableHLO bytecode and what else can
  change XLA's count (the backend, the device kind, JAX's and jaxlib's versions; for ``compiled``
  the XLA flags that shape the compiled program; for ``unrolled``, a count of another program
  written out from this one, the repo's loaded source)."""
  buf = io.BytesIO()
  lowered.compiler_ir("stablehlo").operation.write_bytecode(buf)
  digest = hashlib.sha256(buf.getvalue())
  device = jax.devices()[0]
  context = [kind, _versions(), device.platform, device.device_kind]
  if kind == "compiled":
    context.append(os.environ.get("XLA_FLAGS", ""))
  if kind == "unrolled":
    context.append(loaded_source_digest())
  digest.update("\0".join(context).encode())
  return digest.hexdigest()


def _remembered(lowered: Any, kind: str, count: Callable[[], float | None]) -> float | None:
  """``count()``, read from or written to the memo when there is one."""
  directory = memo_dir()
  if directory is None:
    return count()
  path = os.path.join(directory, _memo_key(lowered, kind) + ".json")
  try:
    with open(path) as f:
      return json.load(f)["flops"]
  except (OSError, ValueError, KeyError, TypeError):
    pass
  flops = count()
  try:
    os.makedirs(directory, exist_ok=True)
    fileio.write_json(path, {"flops": flops})
  except OSError:
    pass  # a read-only cache only costs the next count
  return flops


def lowered_flops(lowered: Any) -> float | None:
  """XLA's FLOP count of a lowered program (``jax.jit(f).lower(...)``) before optimisation:
  ``analysis_flops(lowered.cost_analysis())``, remembered (``memo_dir``)."""
  return _remembered(lowered, "lowered", lambda: analysis_flops(lowered.cost_analysis()))


def unrolled_flops(lowered_step: Any, lower_unrolled: Callable[[], Any]) -> float | None:
  """``lowered_flops`` of a step's written-out form (``lower_unrolled()``: its loops unrolled, as
  ``Method.make_flops_counting_step`` writes them, since XLA counts a loop body once), remembered
  under ``lowered_step``, the step as it runs, and the repo's loaded source: on a hit the
  written-out form is neither traced nor lowered."""
  return _remembered(lowered_step, "unrolled", lambda: lowered_flops(lower_unrolled()))


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
  """FLOPs of one call of ``fn(*args, **kwargs)`` as counted by XLA's compiled cost analysis,
  remembered (``memo_dir``): a program counted before is not compiled again.

  Args may be concrete arrays or ``jax.ShapeDtypeStruct`` (nothing is executed). A
  multiply-add counts as 2 FLOPs, so an [M, K] x [K, N] matmul is ``2 * M * N * K``.
  Non-array arguments (Python ints, strings) must be hashable; they are not made static
  automatically, so pass ``functools.partial`` for static configuration.

  Returns:
    The FLOP count as a Python float (summed over all programs when XLA reports several).

  Raises:
    RuntimeError: if the backend's cost analysis has no ``flops`` entry.
  """
  lowered = jax.jit(fn).lower(*args, **kwargs)
  return _remembered(lowered, "compiled", lambda: compiled_flops(lowered.compile()))


def count_params(tree: Any) -> int:
  """Total element count of the array leaves of a pytree.

  Leaves may be jax/numpy arrays, ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``) or
  Python scalars (counted as 1). Returns a Python int.
  """
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    total += math.prod(shape)
  return int(total)


def measure_latency(
  fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 10
) -> float:
  """Median wall-clock seconds of one call of ``jax.jit(fn)(*args)``.

  The first ``warmup`` calls (which include compilation) are excluded; each timed call waits
  on its outputs with ``jax.block_until_ready`` because JAX dispatch is asynchronous and would
  otherwise time only the enqueue. ``args``: arrays already on device, to keep host->device
  transfer out of the measurement.
  """
  if repeats < 1:
    raise ValueError(f"measure_latency: repeats must be >= 1, got {repeats}")
  jitted = jax.jit(fn)
  for _ in range(max(warmup, 1)):  # at least one call, so compilation is never timed
    jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
