"""Image datasets stored as ArrayRecord files written by ``common.data.prepare``.

Directory layout (``data.data_dir``)::

  <data_dir>/metadata.json          see ``read_metadata``
  <data_dir>/<split>.array_record   one record per image, written with ``group_size:1``

Record format (``FORMAT_VERSION`` 1), fixed-size and pickle-free::

  bytes [0, 4)          label, int32 little-endian
  bytes [4, 4 + H*W*C)  pixels, uint8, row-major [H, W, C] (H = W = resolution)

Fixed-size records let a whole batch be decoded with one ``np.frombuffer``.
"""

import json
import os
from collections.abc import Sequence

import numpy as np

NAME = "array_record"
FORMAT = "segdiff-image-array-record"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
LABEL_BYTES = 4
_LABEL_DTYPE = np.dtype("<i4")
_PREPARE_HINT = (
  "prepare it with: python -m common.data.prepare --input=<folder of images | .npz file> "
  "--output={data_dir} --resolution=<resolution> --split=<train|test>"
)


def encode(image: np.ndarray, label: int) -> bytes:
  """Serialises one example.

  Args:
    image: uint8 [H, W, C].
    label: int fitting in int32.

  Returns:
    The record bytes: 4-byte little-endian int32 label followed by the raw pixels.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"expected a uint8 [H, W, C] image, got {image.dtype} {image.shape}")
  return np.array(label, _LABEL_DTYPE).tobytes() + np.ascontiguousarray(image).tobytes()


def decode_batch(records: Sequence[bytes], resolution: int, channels: int):
  """Decodes fixed-size records.

  Args:
    records: ``n`` records written by ``encode``.
    resolution: H = W of the stored images.
    channels: C of the stored images.

  Returns:
    images: uint8 [n, resolution, resolution, channels].
    labels: int32 [n].
  """
  size = LABEL_BYTES + resolution * resolution * channels
  buf = np.frombuffer(b"".join(records), np.uint8)
  if buf.size != size * len(records):
    raise ValueError(
      f"array_record: records are not {size} bytes each (resolution {resolution}, "
      f"{channels} channels); the file does not match its metadata.json"
    )
  buf = buf.reshape(len(records), size)
  labels = buf[:, :LABEL_BYTES].copy().view(_LABEL_DTYPE)[:, 0].astype(np.int32)
  images = buf[:, LABEL_BYTES:].reshape(len(records), resolution, resolution, channels)
  return images, labels


def split_path(data_dir: str, split: str) -> str:
  return os.path.join(data_dir, f"{split}.array_record")


def read_metadata(data_dir: str) -> dict:
  """Reads and validates ``<data_dir>/metadata.json``.

  Returns:
    The metadata dict: ``format``, ``format_version``, ``resolution``, ``channels``,
    ``num_classes``, ``class_names``, and ``splits`` = {split: {``count``, ``source``, ...}}.

  Raises:
    FileNotFoundError: naming ``data.data_dir`` and the prepare command when the directory or
      its metadata.json is missing.
  """
  if not data_dir:
    raise FileNotFoundError(
      "data.data_dir is empty but data.name='array_record' needs a directory written by "
      "common.data.prepare; " + _PREPARE_HINT.format(data_dir="<dir>")
    )
  hint = _PREPARE_HINT.format(data_dir=data_dir)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
      f"data.data_dir={data_dir!r} does not exist (absolute: {os.path.abspath(data_dir)}); " + hint
    )
  path = os.path.join(data_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"data.data_dir={data_dir!r} has no {METADATA_FILE} ({path}); it was not written by "
      "common.data.prepare or the preparation did not finish; " + hint
    )
  try:
    with open(path) as f:
      meta = json.load(f)
  except ValueError as e:  # torn or hand-edited: say which file, not a bare JSONDecodeError
    raise ValueError(f"{path}: not valid JSON ({e}); " + hint) from None
  if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r} is not "
      f"{FORMAT!r} version {FORMAT_VERSION}; re-run common.data.prepare"
    )
  return meta


def check_split(data_dir: str, meta: dict, split: str) -> str:
  """Returns the path of ``split``'s file, raising a clear error when it was not prepared."""
  if split not in meta["splits"]:
    raise ValueError(
      f"data.data_dir={data_dir!r} has no split {split!r}; prepared splits: "
      f"{sorted(meta['splits'])}; " + _PREPARE_HINT.format(data_dir=data_dir)
    )
  path = split_path(data_dir, split)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is listed in {METADATA_FILE} but missing")
  return path


def open_source(data_dir: str, split: str):
  """Returns ``(grain.sources.ArrayRecordDataSource, metadata)`` for ``split``."""
  import grain

  meta = read_metadata(data_dir)
  source = grain.sources.ArrayRecordDataSource(check_split(data_dir, meta, split))
  if len(source) != meta["splits"][split]["count"]:
    raise ValueError(
      f"{split_path(data_dir, split)} holds {len(source)} records but {METADATA_FILE} says "
      f"{meta['splits'][split]['count']}; re-run common.data.prepare"
    )
  return source, meta
