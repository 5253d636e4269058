"""Summaries of a metric over seeds, shared by the campaign binaries (collab.sweep,
adaptive.experiments) and mobile.summarize."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def mean_std(values: Iterable[float | None]) -> dict[str, float]:
  """Mean, sample std (ddof=1; 0 for one value) and count of the finite, non-None values;
  NaN mean and std when there are none."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return {"mean": float("nan"), "std": float("nan"), "n": 0}
  return {
    "mean": float(v.mean()),
    "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
    "n": int(v.size),
  }
