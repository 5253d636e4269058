"""Deterministic, checkpointable grain input pipelines over the repo's datasets.

Every dataset yields ``{'image': float32 [H, W, C] in [-1, 1], 'label': int32 []}`` per example
(batched: ``image`` [b, H, W, C], ``label`` [b]); 'shapes' adds ``attributes`` int32 [4]
(batched [b, 4]), see ``common/data/shapes.py``.

The training pipeline is a grain ``MapDataset`` over example *indices*::

  source(indices).shuffle(s).repeat().batch(B)[process's rows].map(gather)

Every process walks the same sequence of *global* batches of indices and reads only its own rows
of each (``process_rows``: process ``i`` of ``P`` holds rows ``[i B/P, (i+1) B/P)``, the rows its
devices hold under the batch sharding). Everything before ``map`` is pure index arithmetic, so an
element is a function of its position alone and grain's iterator state is one integer
(``{'next_index': n}`` = global batches consumed), the same on every process: the global batch
at step ``n`` does not depend on the process count, and a checkpoint written by any number of
processes resumes with any other.
``gather`` reads a whole batch at once (a numpy take for in-memory datasets, one batched
ArrayRecord read for prepared datasets) and converts it to float32.
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from common.data import array_record as ar
from common.data import digits, shapes

NAMES = (digits.NAME, shapes.NAME, ar.NAME)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a dataset as configured.

  ``num_attribute_values`` is non-empty only for datasets whose examples carry ``attributes``
  (shapes: sizes of the shape, colour, size, background vocabularies).
  """

  name: str
  num_train: int
  num_test: int
  resolution: int
  channels: int
  num_classes: int
  class_names: tuple[str, ...]
  attribute_names: tuple[str, ...] = ()
  num_attribute_values: tuple[int, ...] = ()


def _field(data_config: Any, key: str, default: Any = None) -> Any:
  # Accepts the ConfigDict ``config.data`` as well as a plain mapping (tests, notebooks).
  if isinstance(data_config, Mapping):
    return data_config.get(key, default)
  return getattr(data_config, key, default)


def _name(data_config) -> str:
  name = _field(data_config, "name")
  if name not in NAMES:
    raise ValueError(f"data.name={name!r} is not a known dataset; allowed: {', '.join(NAMES)}")
  return name


def _resolution(data_config) -> int:
  res = _field(data_config, "resolution")
  if isinstance(res, bool) or not isinstance(res, int | np.integer):
    raise ValueError(f"data.resolution={res!r} must be an int")
  return int(res)


def _array_record_meta(data_config) -> tuple[str, dict]:
  data_dir = os.path.expanduser(_field(data_config, "data_dir", "") or "")
  meta = ar.read_metadata(data_dir)
  res = _resolution(data_config)
  if meta["resolution"] != res:
    raise ValueError(
      f"data.resolution={res} but data.data_dir={data_dir!r} was prepared at resolution "
      f"{meta['resolution']} ({os.path.join(data_dir, ar.METADATA_FILE)}); set "
      f"data.resolution={meta['resolution']} or re-run common.data.prepare with --resolution={res}"
    )
  return data_dir, meta


def get_info(data_config) -> DatasetInfo:
  """Describes the configured dataset without loading it (array_record: reads metadata.json).

  Raises:
    ValueError: unknown ``data.name`` or unsupported ``data.resolution``.
    FileNotFoundError: array_record with a missing ``data.data_dir`` or metadata.json.
  """
  name = _name(data_config)
  res = _resolution(data_config)
  if name == digits.NAME:
    digits.check_resolution(res)
    return DatasetInfo(
      name,
      digits.NUM_TRAIN,
      digits.NUM_TEST,
      res,
      digits.CHANNELS,
      digits.NUM_CLASSES,
      digits.CLASS_NAMES,
    )
  if name == shapes.NAME:
    shapes.check_resolution(res)
    return DatasetInfo(
      name,
      shapes.split_size("train", int(_field(data_config, "num_examples", 0) or 0)),
      shapes.split_size("test"),
      res,
      shapes.CHANNELS,
      shapes.NUM_CLASSES,
      tuple(shapes.CLASS_NAMES),
      tuple(shapes.ATTRIBUTE_NAMES),
      tuple(shapes.NUM_ATTRIBUTE_VALUES),
    )
  _, meta = _array_record_meta(data_config)
  counts = {k: v["count"] for k, v in meta["splits"].items()}
  return DatasetInfo(
    name,
    counts.get("train", 0),
    counts.get("test", 0),
    meta["resolution"],
    meta["channels"],
    meta["num_classes"],
    tuple(meta["class_names"]),
  )


class _InMemory:
  """Gathers batches from whole-split arrays (digits: float32, shapes: uint8)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, attributes: np.ndarray | None):
    self.images, self.labels, self.attributes = images, labels, attributes

  def __len__(self) -> int:
    return len(self.labels)

  def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    images = self.images[idx]
    if images.dtype == np.uint8:
      images = shapes.to_float(images)
    batch = {"image": images, "label": self.labels[idx]}
    if self.attributes is not None:
      batch["attributes"] = self.attributes[idx]
    return batch


class _Records:
  """Gathers batches from an ArrayRecord split with one batched read per batch."""

  def __init__(self, source, resolution: int, channels: int):
    self.source, self.resolution, self.channels = source, resolution, channels

  def __len__(self) -> int:
    return len(self.source)

  def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    records = self.source.__getitems__([int(i) for i in idx])
    images, labels = ar.decode_batch(records, self.resolution, self.channels)
    return {"image": shapes.to_float(images), "label": labels}


def _gatherer(data_config, split: str):
  name = _name(data_config)
  res = _resolution(data_config)
  if name == digits.NAME:
    return _InMemory(*digits.load(split, res), None)
  if name == shapes.NAME:
    shapes.check_resolution(res)
    num = int(_field(data_config, "num_examples", 0) or 0)
    images, labels, attributes = shapes.load_uint8(split, res, num)
    return _InMemory(images, labels, attributes)
  data_dir, meta = _array_record_meta(data_config)
  source, _ = ar.open_source(data_dir, split)
  return _Records(source, meta["resolution"], meta["channels"])


def _count(data_config, split: str, max_examples: int | None) -> int:
  info = get_info(data_config)
  if info.name == ar.NAME:
    data_dir, meta = _array_record_meta(data_config)
    ar.check_split(data_dir, meta, split)
    n = meta["splits"][split]["count"]
  elif split in ("train", "test"):
    n = info.num_train if split == "train" else info.num_test
  else:
    raise ValueError(f"{info.name}: unknown split {split!r}; allowed: train, test")
  return n if max_examples is None else min(n, max_examples)


def load_split(
  data_config, split: str, *, max_examples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split (or its first ``max_examples``) into memory, in dataset order.

  Memory is N*H*W*C*4 bytes: meant for evaluation and reference statistics, not ImageNet.

  Returns:
    images: float32 [N, H, W, C] in [-1, 1]; labels: int32 [N].
  """
  n = _count(data_config, split, max_examples)
  gather = _gatherer(data_config, split)
  images, labels = [], []
  for start in range(0, n, 4096):
    batch = gather(np.arange(start, min(n, start + 4096)))
    images.append(batch["image"])
    labels.append(batch["label"])
  if not images:
    info = get_info(data_config)
    return np.zeros((0, info.resolution, info.resolution, info.channels), np.float32), np.zeros(
      (0,), np.int32
    )
  return np.concatenate(images), np.concatenate(labels)


def load_labels(data_config, split: str = "train") -> np.ndarray:
  """Returns the int32 [N] labels of a split, e.g. for ``partition.partition_indices``.

  For array_record this still reads every record once, but never holds the images.
  """
  name = _name(data_config)
  if name == ar.NAME:
    data_dir, meta = _array_record_meta(data_config)
    source, _ = ar.open_source(data_dir, split)
    labels = []
    for start in range(0, len(source), 4096):
      keys = list(range(start, min(len(source), start + 4096)))
      recs = source.__getitems__(keys)
      labels.append(ar.decode_batch(recs, meta["resolution"], meta["channels"])[1])
    return np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  return np.array(_gatherer(data_config, split).labels)


def load_attributes(data_config, split: str = "train") -> np.ndarray:
  """Returns the int32 [N, 4] (shape, colour, size, background) attributes of a shapes split."""
  if _name(data_config) != shapes.NAME:
    raise ValueError(f"data.name={_name(data_config)!r} has no attributes; only 'shapes' does")
  return np.array(_gatherer(data_config, split).attributes)


def _default_read_options(name: str) -> grain.ReadOptions:
  # In-memory gathers take microseconds: one background thread hides them and leaves the
  # cores to XLA. ArrayRecord reads wait on disk, so a few threads overlap them.
  if name == ar.NAME:
    return grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
  return grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def _shuffle_seed(seed: int) -> int:
  # grain reshuffles epoch e with seed + e, so runs with seeds s and s + 1 would see the same
  # orders shifted by one epoch; hashing the run seed decorrelates neighbouring seeds.
  return int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1, np.uint32)[0])


def _base_indices(n: int, indices: np.ndarray | None) -> np.ndarray:
  if indices is None:
    return np.arange(n, dtype=np.int64)
  idx = np.asarray(indices)
  if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"indices must be a 1-D int array, got {idx.dtype} {idx.shape}")
  if idx.size and (idx.min() < 0 or idx.max() >= n):
    raise ValueError(f"indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
  return idx.astype(np.int64)


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
    )


def process_rows(global_batch_size: int, process_index: int = 0, process_count: int = 1) -> range:
  """The rows of every global batch that process ``process_index`` reads: its contiguous block
  ``[i B/P, (i+1) B/P)`` (what ``parallel.global_batch`` checks its devices hold).

  Raises:
    ValueError: ``global_batch_size`` is not a positive multiple of ``process_count``.
  """
  _check_process(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive multiple of "
      f"process_count={process_count}"
    )
  per = global_batch_size // process_count
  return range(process_index * per, (process_index + 1) * per)


def train_index_dataset(
  num_examples: int,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  indices: np.ndarray | None = None,
  rows: range | None = None,
) -> grain.MapDataset:
  """The index part of the training pipeline: an infinite MapDataset of int64 [len(rows)].

  Element ``k`` is this process's rows of the ``k``-th global batch (``batch_size`` dataset
  indices): ``rows`` if given, else ``process_rows(batch_size, process_index, process_count)``.
  """
  rows = process_rows(batch_size, process_index, process_count) if rows is None else rows
  if rows.step != 1 or not 0 <= rows.start <= rows.stop <= batch_size:
    raise ValueError(f"rows={rows} must be a contiguous part of range({batch_size})")
  idx = _base_indices(num_examples, indices)
  if len(idx) == 0:
    raise ValueError("the dataset or the indices subset has no examples")
  ds = grain.MapDataset.source(idx).shuffle(_shuffle_seed(seed)).repeat()
  ds = ds.batch(batch_size, drop_remainder=True)
  if len(rows) == batch_size:
    return ds
  lo, hi = rows.start, rows.stop
  return ds.map(lambda batch: batch[lo:hi])


def make_train_iterator(
  data_config,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  indices: np.ndarray | None = None,
  split: str = "train",
  read_options: grain.ReadOptions | None = None,
  rows: range | None = None,
) -> grain.DatasetIterator:
  """An infinite, shuffled, checkpointable iterator of this process's rows of each global batch.

  The global batches are ``global_batch_size`` examples of the dataset (of ``indices`` if given,
  e.g. a client's partition), shuffled with ``seed`` (reshuffled every epoch), running across
  epoch boundaries so that no data is dropped; this process reads its block of rows of each
  (``process_rows``, or ``rows``), so the global batch is the same for any process count.

  Returns:
    A ``grain.DatasetIterator`` whose elements are dicts of numpy arrays
    ``{'image': float32 [b, H, W, C] in [-1, 1], 'label': int32 [b]}`` (+ ``'attributes'``
    int32 [b, 4] for shapes), ``b = len(rows)``. ``get_state()`` returns the JSON-serialisable
    ``{'next_index': global_batches_consumed}``; ``set_state`` on an iterator built with the same
    dataset, batch size and seed (any process count) resumes exactly.
  """
  gather = _gatherer(data_config, split)
  ds = train_index_dataset(
    len(gather),
    batch_size=global_batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    indices=indices,
    rows=rows,
  ).map(gather)
  options = read_options or _default_read_options(_name(data_config))
  return iter(ds.to_iter_dataset(options))


def make_eval_iterator(
  data_config,
  *,
  global_batch_size: int,
  split: str = "test",
  process_index: int = 0,
  process_count: int = 1,
  indices: np.ndarray | None = None,
  drop_remainder: bool = False,
  read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """One ordered pass over ``split`` (this process's slice), unshuffled.

  Returns:
    An iterator of the same dicts as ``make_train_iterator``; the last batch is smaller unless
    ``drop_remainder``.
  """
  _check_process(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive multiple of "
      f"process_count={process_count}"
    )
  gather = _gatherer(data_config, split)
  idx = _base_indices(len(gather), indices)
  ds = grain.MapDataset.source(idx)[process_index::process_count]
  ds = ds.batch(global_batch_size // process_count, drop_remainder=drop_remainder).map(gather)
  options = read_options or _default_read_options(_name(data_config))
  return iter(ds.to_iter_dataset(options))
