"""Compute cost of JAX functions: XLA-counted FLOPs, parameter counts, wall-clock latency."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


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


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
  """FLOPs of one call of ``fn(*args, **kwargs)`` as counted by XLA's compiled cost analysis.

  Args may be concrete arrays or ``jax.ShapeDtypeStruct`` (nothing is executed). A
  multiply-add counts as 2 FLOPs, so an [M, K] x [K, N] matmul is ``2 * M * N * K``.
  Non-array arguments (Python ints, strings) must be hashable; they are not made static
  automatically, so pass ``functools.partial`` for static configuration.

  Returns:
    The FLOP count as a Python float (summed over all programs when XLA reports several).

  Raises:
    RuntimeError: if the backend's cost analysis has no ``flops`` entry.
  """
  return compiled_flops(jax.jit(fn).lower(*args, **kwargs).compile())


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
