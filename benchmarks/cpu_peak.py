"""The float32 peak of this machine's CPU cores, for the benchmarks' share-of-peak figures."""

from __future__ import annotations

import os
import re


def estimate_peak_gflops() -> tuple[float, str]:
  """float32 peak GFLOP/s of this process's cores from /proc/cpuinfo, and how it was estimated
  (NaN when /proc/cpuinfo cannot be read)."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
    mhz = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", text).group(1))
    cpu_flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
  except (OSError, AttributeError):
    return float("nan"), "unknown (no /proc/cpuinfo)"
  cores = len(os.sched_getaffinity(0))
  # Two FMA units of 16 (AVX-512) or 8 (AVX2) float32 lanes, 2 FLOPs per FMA.
  per_cycle, isa = (64, "avx512f") if "avx512f" in cpu_flags else (32, "avx2+fma")
  if isa == "avx2+fma" and not {"avx2", "fma"} <= cpu_flags:
    per_cycle, isa = 8, "sse"
  peak = cores * mhz / 1e3 * per_cycle
  return peak, f"estimated: {cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"
