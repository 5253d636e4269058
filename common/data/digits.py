"""scikit-learn's bundled 8x8 handwritten digits, resized and scaled to [-1, 1].

The data ships inside the scikit-learn wheel (``sklearn/datasets/data/digits.csv.gz``, what
``sklearn.datasets.load_digits`` reads; read here without importing scikit-learn), so nothing is
downloaded. 1797 greyscale images, pixel values 0..16, 10 classes.

Resizing: each image is resized as a float32 PIL ``'F'``-mode image with ``Image.BILINEAR``
(no uint8 round trip, so no quantisation of the 17 original grey levels), then clipped to [0, 16]
and mapped linearly to [-1, 1]. Resolution 8 is the original data, untouched.

The train/test split is FIXED (a stratified permutation drawn with ``SPLIT_SEED``) and does not
depend on any run seed, so "test" is the same held-out set for every experiment.
"""

import functools
import gzip
import importlib.util
import os

import numpy as np
from PIL import Image

NAME = "digits"
RESOLUTIONS = (8, 16, 32)
NUM_CLASSES = 10
CLASS_NAMES = tuple(str(i) for i in range(NUM_CLASSES))
CHANNELS = 1
NUM_TRAIN = 1497
NUM_TEST = 300
# Part of the dataset definition: changing it changes which images are held out.
SPLIT_SEED = 20_240_521
_TEST_PER_CLASS = NUM_TEST // NUM_CLASSES
_MAX_VALUE = 16.0


def check_resolution(resolution: int) -> None:
  """Raises ValueError unless ``resolution`` is one of ``RESOLUTIONS``."""
  if resolution not in RESOLUTIONS:
    raise ValueError(
      f"data.resolution={resolution!r} is not supported by data.name='digits'; "
      f"allowed: {', '.join(map(str, RESOLUTIONS))}"
    )


def _csv_path() -> str:
  """scikit-learn's ``digits.csv.gz``, found without importing scikit-learn."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      "data.name='digits' reads scikit-learn's bundled copy: pip install scikit-learn"
    )
  return os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")


@functools.cache
def _raw() -> tuple[np.ndarray, np.ndarray]:
  # ``sklearn.datasets.load_digits`` reads this file the same way (np.loadtxt of the gzipped CSV:
  # 64 pixel columns, then the label); importing scikit-learn for it cost 1.0-1.6 s of every
  # process's start on 2 cores, more than reading the file.
  with gzip.open(_csv_path(), "rt", encoding="utf-8") as f:
    data = np.loadtxt(f, delimiter=",")
  return data[:, :-1].reshape(-1, 8, 8).astype(np.float32), data[:, -1].astype(np.int32)


@functools.cache
def split_indices() -> dict[str, np.ndarray]:
  """Returns the fixed held-out split as sorted int64 index arrays into ``load_digits()``.

  Stratified: the test split holds exactly 30 images of each class; the rest (1497) is train.
  """
  _, labels = _raw()
  rng = np.random.default_rng(SPLIT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    test.append(rng.permutation(members)[:_TEST_PER_CLASS])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {"train": train, "test": test}


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
  if resolution == images.shape[1]:
    return images.copy()
  out = np.empty((len(images), resolution, resolution), np.float32)
  for i, im in enumerate(images):
    pil = Image.fromarray(im, mode="F")
    out[i] = np.asarray(pil.resize((resolution, resolution), Image.BILINEAR))
  return np.clip(out, 0.0, _MAX_VALUE)


@functools.cache
def load(split: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split.

  Args:
    split: 'train' or 'test'.
    resolution: output side length, one of ``RESOLUTIONS``.

  Returns:
    images: float32 [N, resolution, resolution, 1] in [-1, 1] (read-only, cached).
    labels: int32 [N] in 0..9 (read-only, cached).
  """
  check_resolution(resolution)
  idx = split_indices().get(split)
  if idx is None:
    raise ValueError(f"digits: unknown split {split!r}; allowed: train, test")
  images, labels = _raw()
  x = _resize(images[idx], resolution) * (2.0 / _MAX_VALUE) - 1.0
  x = x[..., None].astype(np.float32)
  y = labels[idx].copy()
  # Cached arrays are shared by every caller: make accidental in-place edits fail loudly.
  x.flags.writeable = False
  y.flags.writeable = False
  return x, y
