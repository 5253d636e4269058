"""Several clients' (or users') iterators read as one, for methods with per-party private data.

Each party keeps its own grain iterator over its own partition. A step's global batch is the K
parties' batches stacked party-major, ``[K * B, ...]`` (reshape to ``[K, B, ...]``), and, as for
any global batch, each process reads its own block of rows of it (``pipeline.process_rows``): with
``P`` dividing ``K``, process ``i`` holds parties ``i K/P .. (i+1) K/P - 1`` whole and never reads
another party's data, which is how clients spread over hosts. The combined position (global
batches consumed) is the same on every process and is checkpointed like any grain iterator, so a
resumed run continues every party's data order exactly, with any process count.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.data.pipeline import make_train_iterator, process_rows


class StackedIterator:
  """Concatenates several iterators' batches (dicts of ``[b_j, ...]`` arrays) row-wise.

  All parts advance together, one global batch per ``next``; the state is their common position
  ``{"next_index": n}``. Implements what orbax's grain checkpoint handler needs from a non-grain
  iterator: ``get_state() -> bytes``, ``set_state(bytes)`` and ``start_prefetch()``.
  """

  def __init__(self, iterators: Sequence[Any]):
    if not iterators:
      raise ValueError("StackedIterator needs at least one iterator")
    self._iterators = list(iterators)
    self._position = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(it) for it in self._iterators]
    self._position += 1
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> bytes:
    return json.dumps({"next_index": self._position}).encode()

  def set_state(self, state: bytes | str) -> None:
    saved = json.loads(state.decode() if isinstance(state, bytes) else state)
    if "parties" in saved:  # written before the position was shared (one process only)
      positions = {p["next_index"] for p in saved["parties"]}
      if len(positions) != 1:
        raise ValueError(f"data iterator state has parties at different positions: {saved}")
      saved = {"next_index": positions.pop()}
    self._position = int(saved["next_index"])
    for it in self._iterators:
      it.set_state({"next_index": self._position})

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
  """This process's rows of the party-major global batch ``[len(parties) * batch_size, ...]``.

  Party ``k`` shuffles its own indices with its own seed ``seed * 1009 + k``, so adding a party
  leaves the others' data order unchanged. ``batch_size`` is per party; a process reads only the
  parties (or parts of parties) its block of rows covers.

  Raises:
    ValueError: the global batch does not split evenly over the processes.
  """
  mine = process_rows(len(parties) * batch_size, process_index, process_count)
  iterators = []
  for k, idx in enumerate(parties):
    lo = max(mine.start, k * batch_size) - k * batch_size
    hi = min(mine.stop, (k + 1) * batch_size) - k * batch_size
    if hi > lo:
      iterators.append(
        make_train_iterator(
          data_config,
          global_batch_size=batch_size,
          seed=seed * 1009 + k,
          indices=idx,
          rows=range(lo, hi),
        )
      )
  return StackedIterator(iterators)
