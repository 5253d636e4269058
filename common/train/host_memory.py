"""Keeps freed host memory inside the process on a CPU backend, so that a compiled step's
scratch buffer is not handed back to the kernel and faulted in again on every call.

Why (issue 24): XLA:CPU allocates a program's temp buffer with ``malloc`` on every execution and
frees it at the end. glibc serves a block above its mmap threshold (32 MiB at most) with a fresh
``mmap`` and unmaps it on ``free``, and trims the heap's free top above 128 KiB, so each step
touches tens of MiB of new zero pages (the digits U-Net's train step has a 46 MiB temp buffer,
TFDiff Config I's 43 MiB). With ``mallopt(M_MMAP_MAX, 0)`` and a trim threshold of 2 GiB the
blocks stay in the heap and the next step reuses them. ``benchmarks/host_memory.py`` (two
processes, one with glibc's defaults, timed in alternating rounds; load ~3.5): TFDiff Config I's
step 54.9 -> 44.9 ms, the digits U-Net's 99.8 -> 96.5 ms; the whole main job 10 min 47 s -> 10
min 04 s (``benchmarks/RESULTS.md``). A large model's step (the 32x32 shapes U-Net, 1.7 GiB of
temp) did not change: its time is arithmetic.

The cost: the process's resident memory no longer shrinks after a peak. A training or
evaluation process holds its peak until it exits anyway; ``SEGDIFF_KEEP_HOST_MEMORY=0`` leaves
glibc's defaults. Accelerator backends keep their tensors in device memory, so nothing is set
there; nor on a C library other than glibc (``mallopt`` is glibc's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

OPT_OUT = "SEGDIFF_KEEP_HOST_MEMORY"

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: 2 GiB - 1 is the largest trim threshold it can hold.
KEPT_TRIM_THRESHOLD = 2**31 - 1


def _glibc():
  """The process's C library when it is glibc (it has ``mallopt``), else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def _set(settings: dict[int, int]) -> bool:
  """``mallopt(param, value)`` for each; False without glibc or when it refuses a value."""
  libc = _glibc()
  if libc is None:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in settings.items())


def keep_freed(platform: str, env: dict | None = None) -> bool:
  """On a ``platform == "cpu"`` backend: no ``mmap`` for large blocks and no heap trimming, so
  freed blocks are reused (see the module docstring). Returns whether it was set: False on an
  accelerator platform, under ``SEGDIFF_KEEP_HOST_MEMORY=0``, or without glibc."""
  env = os.environ if env is None else env
  if platform != "cpu" or env.get(OPT_OUT, "1") == "0":
    return False
  return _set({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: KEPT_TRIM_THRESHOLD})
