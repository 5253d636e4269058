"""Several clients' (or users') iterators read as one, for methods with per-party private data.

Each party keeps its own grain iterator over its own partition; a step takes one batch from each
and stacks them party-major, so a global batch is ``[K * B, ...]`` and reshapes to ``[K, B, ...]``.
The combined position is checkpointed like any grain iterator, so a resumed run continues every
party's data order exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.data.pipeline import make_train_iterator


class StackedIterator:
  """Zips K iterators of ``{'image': [b, ...], 'label': [b], ...}`` into ``[K * b, ...]`` batches.

  Implements what orbax's grain checkpoint handler needs from a non-grain iterator:
  ``get_state() -> bytes``, ``set_state(bytes)`` and ``start_prefetch()``.
  """

  def __init__(self, iterators: Sequence[Any]):
    if not iterators:
      raise ValueError("StackedIterator needs at least one iterator")
    self._iterators = list(iterators)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(it) for it in self._iterators]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> bytes:
    return json.dumps({"parties": [it.get_state() for it in self._iterators]}).encode()

  def set_state(self, state: bytes) -> None:
    parties = json.loads(state.decode() if isinstance(state, bytes) else state)["parties"]
    if len(parties) != len(self._iterators):
      raise ValueError(
        f"data iterator state holds {len(parties)} parties but this run has {len(self._iterators)}"
      )
    for it, s in zip(self._iterators, parties, strict=True):
      it.set_state(s)

  def start_prefetch(self) -> None:
    for it in self._iterators:
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()


def party_train_iterator(
  data_config,
  parties: Sequence[np.ndarray],
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> StackedIterator:
  """One shuffled train iterator per party's indices, stacked: ``[len(parties) * b, ...]``.

  Party ``k`` shuffles with its own seed ``seed * 1009 + k``, so adding a party leaves the
  others' data order unchanged. ``batch_size`` is per party (its global batch); ``b`` is this
  process's share of it.
  """
  return StackedIterator(
    [
      make_train_iterator(
        data_config,
        global_batch_size=batch_size,
        seed=seed * 1009 + k,
        indices=idx,
        process_index=process_index,
        process_count=process_count,
      )
      for k, idx in enumerate(parties)
    ]
  )
