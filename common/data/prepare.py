r"""Converts a folder of images or a .npz file into the ArrayRecord layout the pipeline reads.

Usage::

  python -m common.data.prepare --input=<folder of images | file.npz> --output=<dir> \
      --resolution=64 [--split=train] [--center_crop=true] [--overwrite] [--num_workers=8]

Inputs:

* a folder: every .png/.jpg/.jpeg/.webp below it, recursively, in sorted path order. If the
  images sit in first-level subfolders, each subfolder is a class (sorted names -> ids 0..K-1);
  if they sit directly in the folder, every label is 0 and the dataset has one class named
  "unlabeled". Mixing both is an error. Images are converted to RGB (alpha dropped).
* a .npz file: ``images`` uint8 [N, H, W, C] (C = 1 or 3; [N, H, W] means C = 1), optional
  ``labels`` int [N] (default 0) and optional ``class_names`` str [K]. C = 1 stays greyscale.

Each image is center-cropped to a square (side = the shorter side, offset floor((W - side) / 2),
floor((H - side) / 2)), unless ``--center_crop=false`` (then the whole image is squashed), then
resized with PIL ``Image.BICUBIC`` to resolution x resolution (skipped when already that size),
and written as one record (format in ``common/data/array_record.py``) to
``<output>/<split>.array_record``; ``<output>/metadata.json`` records the splits.

A split that already exists is refused unless ``--overwrite``; other splits may be added to an
existing output directory if resolution, channels and class names agree.
"""

import concurrent.futures
import datetime
import json
import os
from collections.abc import Callable, Iterator

import numpy as np
from absl import app, flags, logging
from PIL import Image

from common.data import array_record as ar

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
UNLABELED = "unlabeled"
_CHUNK = 1024


def center_crop_resize(image: Image.Image, resolution: int, center_crop: bool = True):
  """Crops ``image`` to its central square (if asked), then BICUBIC-resizes to ``resolution``.

  Returns:
    A PIL image of size (resolution, resolution), same mode as the input.
  """
  w, h = image.size
  if center_crop and w != h:
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
  if image.size != (resolution, resolution):
    image = image.resize((resolution, resolution), Image.BICUBIC)
  return image


def _to_array(image: Image.Image) -> np.ndarray:
  x = np.asarray(image, np.uint8)
  return x[..., None] if x.ndim == 2 else x


def _scan_folder(folder: str) -> tuple[list[str], list[int], list[str]]:
  paths = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for f in sorted(files):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(root, f))
  paths.sort(key=lambda p: os.path.relpath(p, folder).split(os.sep))
  if not paths:
    raise ValueError(f"--input={folder!r}: no {'/'.join(IMAGE_EXTENSIONS)} images found")
  parts = [os.path.relpath(p, folder).split(os.sep) for p in paths]
  nested = [len(p) > 1 for p in parts]
  if not any(nested):
    return paths, [0] * len(paths), [UNLABELED]
  if not all(nested):
    loose = [p[0] for p in parts if len(p) == 1][:3]
    raise ValueError(
      f"--input={folder!r} mixes class subfolders with images at the top level (e.g. {loose}); "
      "put every image in a class subfolder, or none"
    )
  class_names = sorted({p[0] for p in parts})
  class_id = {c: i for i, c in enumerate(class_names)}
  return paths, [class_id[p[0]] for p in parts], class_names


def _folder_examples(folder, resolution, center_crop, num_workers):
  paths, labels, class_names = _scan_folder(folder)

  def load(path: str) -> np.ndarray:
    with Image.open(path) as im:
      return _to_array(center_crop_resize(im.convert("RGB"), resolution, center_crop))

  def examples() -> Iterator[tuple[np.ndarray, int]]:
    # Threads, not processes: PIL releases the GIL while decoding and resizing. Chunked so
    # that a slow writer never lets millions of decoded images pile up in memory.
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
      for start in range(0, len(paths), _CHUNK):
        chunk = paths[start : start + _CHUNK]
        yield from zip(pool.map(load, chunk), labels[start : start + _CHUNK], strict=True)

  return len(paths), 3, class_names, examples


def _npz_examples(path, resolution, center_crop):
  with np.load(path, allow_pickle=False) as z:
    if "images" not in z:
      raise ValueError(f"--input={path!r}: no 'images' array (found {sorted(z.files)})")
    images = z["images"]
    labels = z["labels"] if "labels" in z else None
    names = [str(s) for s in z["class_names"]] if "class_names" in z else None
  if images.ndim == 3:
    images = images[..., None]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
      f"--input={path!r}: 'images' must be uint8 [N, H, W, C] with C in (1, 3), "
      f"got {images.dtype} {images.shape}"
    )
  n, channels = len(images), images.shape[-1]
  has_labels = labels is not None
  if not has_labels:
    labels = np.zeros((n,), np.int64)
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"--input={path!r}: 'labels' must be int [{n}], got {labels.dtype} {labels.shape}"
    )
  if n and (labels.min() < 0 or labels.max() >= 2**31):
    raise ValueError(f"--input={path!r}: labels must be in [0, 2**31)")
  if names is None:
    names = [str(i) for i in range(int(labels.max()) + 1)] if has_labels and n else [UNLABELED]
  elif n and labels.max() >= len(names):
    raise ValueError(f"--input={path!r}: label {labels.max()} >= len(class_names)={len(names)}")

  def examples() -> Iterator[tuple[np.ndarray, int]]:
    for image, label in zip(images, labels, strict=True):
      pil = Image.fromarray(image[..., 0] if channels == 1 else image)
      yield _to_array(center_crop_resize(pil, resolution, center_crop)), int(label)

  return n, channels, names, examples


def _write_records(path: str, examples: Callable[[], Iterator[tuple[np.ndarray, int]]], n: int):
  from array_record.python.array_record_module import ArrayRecordWriter

  tmp = path + ".tmp"
  # group_size:1 makes every record individually addressable: grain reads at random.
  writer = ArrayRecordWriter(tmp, "group_size:1")
  count = 0
  try:
    for image, label in examples():
      writer.write(ar.encode(image, label))
      count += 1
      if count % 10_000 == 0:
        logging.info("%s: %d / %d images", path, count, n)
  finally:
    writer.close()
  # Rename last, so an interrupted run never leaves a truncated file under the real name.
  os.replace(tmp, path)
  return count


def prepare(
  input_path: str,
  output_dir: str,
  resolution: int,
  split: str = "train",
  *,
  center_crop: bool = True,
  overwrite: bool = False,
  num_workers: int | None = None,
) -> dict:
  """Writes ``<output_dir>/<split>.array_record`` and updates ``<output_dir>/metadata.json``.

  Args:
    input_path: a folder of images or a .npz file (see the module docstring).
    output_dir: created if missing.
    resolution: output side length (> 0).
    split: split name, e.g. 'train' or 'test'.
    center_crop: crop to the central square before resizing (else squash).
    overwrite: replace an existing ``split``.
    num_workers: decoding threads for folder input (default: CPU count).

  Returns:
    The metadata dict that was written.
  """
  if resolution <= 0:
    raise ValueError(f"--resolution must be positive, got {resolution}")
  if not split or os.sep in split or split.startswith("."):
    raise ValueError(f"--split={split!r} is not a valid split name")
  meta_path = os.path.join(output_dir, ar.METADATA_FILE)
  out_path = ar.split_path(output_dir, split)
  meta = None
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  if not overwrite and (os.path.exists(out_path) or (meta and split in meta.get("splits", {}))):
    raise FileExistsError(
      f"--output={output_dir!r} already holds split {split!r} ({out_path}); "
      "pass --overwrite to replace it, or choose another --output"
    )

  if os.path.isdir(input_path):
    n, channels, class_names, examples = _folder_examples(
      input_path, resolution, center_crop, num_workers or os.cpu_count() or 1
    )
  elif input_path.endswith(".npz") and os.path.isfile(input_path):
    n, channels, class_names, examples = _npz_examples(input_path, resolution, center_crop)
  else:
    raise FileNotFoundError(f"--input={input_path!r} is neither a folder nor a .npz file")

  new = dict(
    format=ar.FORMAT,
    format_version=ar.FORMAT_VERSION,
    record_format=(
      "int32 little-endian label (4 bytes) followed by resolution*resolution*channels uint8 "
      "pixels, row-major [H, W, C]"
    ),
    resolution=resolution,
    channels=channels,
    num_classes=len(class_names),
    class_names=list(class_names),
    splits={},
  )
  if meta and meta.get("splits"):
    others = {k: v for k, v in meta["splits"].items() if k != split}
    for key in ("format", "format_version", "resolution", "channels", "class_names"):
      if others and meta.get(key) != new[key]:
        raise ValueError(
          f"--output={output_dir!r} holds splits {sorted(others)} with {key}={meta.get(key)!r}, "
          f"but this input gives {key}={new[key]!r}; use a separate --output"
        )
    new["splits"] = others

  os.makedirs(output_dir, exist_ok=True)
  logging.info("writing %d images from %s to %s", n, input_path, out_path)
  count = _write_records(out_path, examples, n)
  new["splits"][split] = dict(
    count=count,
    source=os.path.abspath(input_path),
    center_crop=center_crop,
    resize="PIL.Image.BICUBIC",
    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  )
  tmp = meta_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(new, f, indent=2)
  os.replace(tmp, meta_path)
  return new


def _define_flags():
  # Defined only when run as a binary: importing this module (tests, notebooks) must not claim
  # global absl flag names like --input or --resolution that other binaries may define.
  flags.DEFINE_string("input", None, "Folder of images or .npz file.", required=True)
  flags.DEFINE_string("output", None, "Output directory (data.data_dir).", required=True)
  flags.DEFINE_integer("resolution", None, "Output side length.", required=True)
  flags.DEFINE_string("split", "train", "Split name, e.g. train or test.")
  flags.DEFINE_bool("center_crop", True, "Center-crop to a square before resizing.")
  flags.DEFINE_bool("overwrite", False, "Replace the split if it already exists.")
  flags.DEFINE_integer("num_workers", None, "Decoding threads (default: CPU count).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  meta = prepare(
    f.input,
    f.output,
    f.resolution,
    f.split,
    center_crop=f.center_crop,
    overwrite=f.overwrite,
    num_workers=f.num_workers,
  )
  logging.info(
    "wrote %s: %d images, %dx%dx%d, %d classes",
    ar.split_path(f.output, f.split),
    meta["splits"][f.split]["count"],
    meta["resolution"],
    meta["resolution"],
    meta["channels"],
    meta["num_classes"],
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
