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
