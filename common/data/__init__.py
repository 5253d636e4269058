"""Datasets and deterministic, checkpointable grain input pipelines.

Examples are ``{'image': float32 [H, W, C] in [-1, 1], 'label': int32 []}`` (+ ``'attributes'``
int32 [4] for 'shapes'). ``common.data.prepare`` (a binary, not imported here so that importing
this package defines no absl flags) converts image folders / .npz files to ArrayRecord.
"""

from common.data.multi import StackedIterator, party_train_iterator
from common.data.partition import SCHEMES, partition_indices
from common.data.pipeline import (
  NAMES,
  DatasetInfo,
  get_info,
  load_attributes,
  load_labels,
  load_split,
  make_eval_iterator,
  make_train_iterator,
  process_rows,
  train_index_dataset,
)

__all__ = [
  "NAMES",
  "SCHEMES",
  "StackedIterator",
  "DatasetInfo",
  "get_info",
  "load_attributes",
  "load_labels",
  "load_split",
  "make_eval_iterator",
  "make_train_iterator",
  "partition_indices",
  "party_train_iterator",
  "process_rows",
  "train_index_dataset",
]
