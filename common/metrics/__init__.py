"""Sample-quality and cost metrics over feature arrays: FID, KID, precision/recall, FLOPs.

Feature extraction lives elsewhere; these functions take ``[N, D]`` feature arrays.
"""

from common.metrics import fid, flops, kid, precision_recall
from common.metrics.fid import (
  StatsAccumulator,
  compute_statistics,
  frechet_distance,
  load_statistics,
  save_statistics,
)
from common.metrics.flops import count_flops, count_params, measure_latency
from common.metrics.kid import kernel_inception_distance
from common.metrics.precision_recall import precision_recall as improved_precision_recall

__all__ = [
  "StatsAccumulator",
  "compute_statistics",
  "count_flops",
  "count_params",
  "fid",
  "flops",
  "frechet_distance",
  "improved_precision_recall",
  "kernel_inception_distance",
  "kid",
  "load_statistics",
  "measure_latency",
  "precision_recall",
  "save_statistics",
]
