r"""Converts a folder of images or a .npz file into the ArrayRecord layout the pipeline reads.

Usage::

  python -m common.data.prepare --input=<folder of images | file.npz> --output=<dir> \
      --resolution=64 [--split=train] [--center_crop=true] [--overwrite] [--num_workers=8] \
      [--max_pixels=N] [--follow_symlinks]

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

Bad input ends the run before anything is written under its final name, with one line naming the
offending file and exit code 2 (a ``ConfigError``, see ``common.train.cli.run_or_exit``): an empty,
truncated or undecodable image; an image whose header declares more than ``--max_pixels`` pixels
(default ``max(89,478,485, (8 * resolution)**2)``: PIL's own decompression-bomb warning threshold,
raised for very large resolutions), refused before its pixels are decoded; a symlink under the
input folder that points outside it (allowed with ``--follow_symlinks``). The records and the
metadata are written to unique temporary names (``common.fileio``) and moved into place only when
complete, so a failed or interrupted run leaves the output directory as it was.
"""

import concurrent.futures
import datetime
import json
import os
from collections.abc import Callable, Iterator

import numpy as np
from absl import app, flags, logging
from PIL import Image

from common import fileio
from common.data import array_record as ar
from common.train.validate import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
UNLABELED = "unlabeled"
_CHUNK = 1024
# PIL's default Image.MAX_IMAGE_PIXELS (it warns above this and refuses above twice this).
PIL_DEFAULT_MAX_PIXELS = 89_478_485


class OutputExistsError(ConfigError, FileExistsError):
  """The split is already prepared and ``--overwrite`` was not given."""


class InputNotFoundError(ConfigError, FileNotFoundError):
  """``--input`` is neither a folder nor a .npz file."""


def default_max_pixels(resolution: int) -> int:
  """The cap on a source image's declared pixel count: PIL's default limit, or (8 R)^2 above it."""
  return max(PIL_DEFAULT_MAX_PIXELS, (8 * resolution) ** 2)


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


def _inside(path: str, root_real: str) -> bool:
  real = os.path.realpath(path)
  return os.path.commonpath([real, root_real]) == root_real


def _walk_images(folder: str, follow_symlinks: bool) -> list[str]:
  """Every image path below ``folder``; a symlink leading outside it is refused unless
  ``follow_symlinks`` (which also descends symlinked folders, each real folder once)."""
  root_real = os.path.realpath(folder)
  paths, seen = [], {root_real}
  for root, dirs, files in os.walk(folder, followlinks=follow_symlinks):
    dirs.sort()
    links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
    if follow_symlinks:  # every real folder once, real subfolders before links: no cycles
      keep = []
      for d in sorted(dirs, key=lambda d: d in links):
        real = os.path.realpath(os.path.join(root, d))
        if real not in seen:
          seen.add(real)
          keep.append(d)
      dirs[:] = sorted(keep)
    for name in [] if follow_symlinks else links:
      link = os.path.join(root, name)
      if not _inside(link, root_real):
        raise ConfigError(
          "--input file",
          link,
          f"a symlink to {os.path.realpath(link)}, outside --input; pass --follow_symlinks",
        )
      logging.warning("%s: symlink to a folder inside --input, not followed", link)
    for f in sorted(files):
      path = os.path.join(root, f)
      if not f.lower().endswith(IMAGE_EXTENSIONS):
        continue
      if not follow_symlinks and os.path.islink(path) and not _inside(path, root_real):
        raise ConfigError(
          "--input file",
          path,
          f"a symlink to {os.path.realpath(path)}, outside --input; pass --follow_symlinks",
        )
      paths.append(path)
  return paths


def _scan_folder(
  folder: str, follow_symlinks: bool = False
) -> tuple[list[str], list[int], list[str]]:
  paths = _walk_images(folder, follow_symlinks)
  paths.sort(key=lambda p: os.path.relpath(p, folder).split(os.sep))
  if not paths:
    raise ConfigError("--input", folder, f"no {'/'.join(IMAGE_EXTENSIONS)} images found")
  parts = [os.path.relpath(p, folder).split(os.sep) for p in paths]
  nested = [len(p) > 1 for p in parts]
  if not any(nested):
    return paths, [0] * len(paths), [UNLABELED]
  if not all(nested):
    loose = [p[0] for p in parts if len(p) == 1][:3]
    raise ConfigError(
      "--input",
      folder,
      f"mixes class subfolders with images at the top level (e.g. {loose}); "
      "put every image in a class subfolder, or none",
    )
  class_names = sorted({p[0] for p in parts})
  class_id = {c: i for i, c in enumerate(class_names)}
  return paths, [class_id[p[0]] for p in parts], class_names


def _bad_image(path: str, what: str) -> ConfigError:
  return ConfigError("--input file", path, what)


def load_image(path: str, resolution: int, center_crop: bool, max_pixels: int) -> np.ndarray:
  """Decodes, crops and resizes one image file; refuses one whose header declares more than
  ``max_pixels`` pixels before decoding it.

  Raises:
    ConfigError: naming ``path``, for an empty, truncated, undecodable or oversized image.
  """
  try:
    with Image.open(path) as im:
      w, h = im.size
      if w * h > max_pixels:
        raise _bad_image(
          path,
          f"declares {w}x{h} = {w * h:,} pixels, over the cap of {max_pixels:,} "
          "(--max_pixels); refused before decoding",
        )
      return _to_array(center_crop_resize(im.convert("RGB"), resolution, center_crop))
  except ConfigError:
    raise
  except Image.DecompressionBombError as e:
    raise _bad_image(path, f"refused before decoding: {e}") from None
  except Image.UnidentifiedImageError:
    what = "is empty (0 bytes)" if os.path.getsize(path) == 0 else "is not a readable image"
    raise _bad_image(path, what) from None
  except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, zlib/struct errors
    first = (str(e).splitlines() or [""])[0]
    raise _bad_image(path, f"cannot be read or decoded ({type(e).__name__}: {first})") from None


def _folder_examples(folder, resolution, center_crop, num_workers, max_pixels, follow_symlinks):
  paths, labels, class_names = _scan_folder(folder, follow_symlinks)

  def load(path: str) -> np.ndarray:
    return load_image(path, resolution, center_crop, max_pixels)

  def examples() -> Iterator[tuple[np.ndarray, int]]:
    # Threads, not processes: PIL releases the GIL while decoding and resizing. Chunked so
    # that a slow writer never lets millions of decoded images pile up in memory.
    pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
    try:
      for start in range(0, len(paths), _CHUNK):
        chunk = paths[start : start + _CHUNK]
        yield from zip(pool.map(load, chunk), labels[start : start + _CHUNK], strict=True)
    finally:  # on a bad file, do not decode the rest of the chunk first
      pool.shutdown(wait=True, cancel_futures=True)

  return len(paths), 3, class_names, examples


def _load_npz(path: str):
  try:
    with np.load(path, allow_pickle=False) as z:
      if "images" not in z:
        raise ConfigError("--input", path, f"no 'images' array (found {sorted(z.files)})")
      images = z["images"]
      labels = z["labels"] if "labels" in z else None
      names = [str(s) for s in z["class_names"]] if "class_names" in z else None
  except ConfigError:
    raise
  except Exception as e:  # a torn zip, a pickled array, a bad member: all mean a bad input file
    first = (str(e).splitlines() or [""])[0]
    raise ConfigError("--input", path, f"cannot be read ({type(e).__name__}: {first})") from None
  return images, labels, names


def _npz_examples(path, resolution, center_crop):
  images, labels, names = _load_npz(path)
  bad = lambda what: ConfigError("--input", path, what)
  if images.ndim == 3:
    images = images[..., None]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise bad(
      f"'images' must be uint8 [N, H, W, C] with C in (1, 3), got {images.dtype} {images.shape}"
    )
  n, channels = len(images), images.shape[-1]
  has_labels = labels is not None
  if not has_labels:
    labels = np.zeros((n,), np.int64)
  labels = np.asarray(labels).reshape(-1)
  if len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
    raise bad(f"'labels' must be int [{n}], got {labels.dtype} {labels.shape}")
  if n and (labels.min() < 0 or labels.max() >= 2**31):
    raise bad("labels must be in [0, 2**31)")
  if names is None:
    names = [str(i) for i in range(int(labels.max()) + 1)] if has_labels and n else [UNLABELED]
  elif n and labels.max() >= len(names):
    raise bad(f"label {labels.max()} >= len(class_names)={len(names)}")

  def examples() -> Iterator[tuple[np.ndarray, int]]:
    for image, label in zip(images, labels, strict=True):
      pil = Image.fromarray(image[..., 0] if channels == 1 else image)
      yield _to_array(center_crop_resize(pil, resolution, center_crop)), int(label)

  return n, channels, names, examples


def _write_records(path: str, examples: Callable[[], Iterator[tuple[np.ndarray, int]]], n: int):
  from array_record.python.array_record_module import ArrayRecordWriter

  # A unique temporary name, moved to ``path`` only when every record is written: a bad image or
  # an interrupted run never leaves a truncated file (or a temporary one) behind.
  with fileio.atomic_path(path) as tmp:
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
  return count


def _read_existing(output_dir: str, split: str, overwrite: bool) -> dict | None:
  """The output directory's metadata (None if it has none); refuses an existing split."""
  meta_path = os.path.join(output_dir, ar.METADATA_FILE)
  out_path = ar.split_path(output_dir, split)
  meta = None
  if os.path.isfile(meta_path):
    try:
      with open(meta_path) as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError("--output", output_dir, f"unreadable {meta_path} ({e})") from None
  if not overwrite and (os.path.exists(out_path) or (meta and split in meta.get("splits", {}))):
    raise OutputExistsError(
      "--output",
      output_dir,
      f"already holds split {split!r} ({out_path}); "
      "pass --overwrite to replace it, or choose another --output",
    )
  return meta


def _new_metadata(meta, output_dir, split, resolution, channels, class_names) -> dict:
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
        raise ConfigError(
          "--output",
          output_dir,
          f"holds splits {sorted(others)} with {key}={meta.get(key)!r}, but this input gives "
          f"{key}={new[key]!r}; use a separate --output",
        )
    new["splits"] = others
  return new


def prepare(
  input_path: str,
  output_dir: str,
  resolution: int,
  split: str = "train",
  *,
  center_crop: bool = True,
  overwrite: bool = False,
  num_workers: int | None = None,
  max_pixels: int | None = None,
  follow_symlinks: bool = False,
) -> dict:
  """Writes ``<output_dir>/<split>.array_record`` and updates ``<output_dir>/metadata.json``.

  Args:
    input_path: a folder of images or a .npz file (see the module docstring).
    output_dir: created if missing (and removed again if this call fails and it is empty).
    resolution: output side length (> 0).
    split: split name, e.g. 'train' or 'test'.
    center_crop: crop to the central square before resizing (else squash).
    overwrite: replace an existing ``split``.
    num_workers: decoding threads for folder input (default: CPU count).
    max_pixels: refuse a source image declaring more pixels (default ``default_max_pixels``).
    follow_symlinks: read symlinks under the input folder that lead outside it.

  Returns:
    The metadata dict that was written.

  Raises:
    ConfigError: bad arguments or input, one line naming the flag or the offending file
      (``OutputExistsError`` for an existing split, ``InputNotFoundError`` for a missing input).
  """
  if resolution <= 0:
    raise ConfigError("--resolution", resolution, "must be positive")
  if not split or os.sep in split or split.startswith("."):
    raise ConfigError("--split", split, "is not a valid split name")
  max_pixels = max_pixels or default_max_pixels(resolution)
  meta = _read_existing(output_dir, split, overwrite)
  if os.path.isdir(input_path):
    n, channels, class_names, examples = _folder_examples(
      input_path,
      resolution,
      center_crop,
      num_workers or os.cpu_count() or 1,
      max_pixels,
      follow_symlinks,
    )
  elif input_path.endswith(".npz") and os.path.isfile(input_path):
    n, channels, class_names, examples = _npz_examples(input_path, resolution, center_crop)
  else:
    raise InputNotFoundError("--input", input_path, "is neither a folder nor a .npz file")
  new = _new_metadata(meta, output_dir, split, resolution, channels, class_names)

  out_path = ar.split_path(output_dir, split)
  created = not os.path.isdir(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  logging.info("writing %d images from %s to %s", n, input_path, out_path)
  try:
    count = _write_records(out_path, examples, n)
  except BaseException:
    if created and not os.listdir(output_dir):
      os.rmdir(output_dir)  # leave no trace of a run that wrote nothing
    raise
  new["splits"][split] = dict(
    count=count,
    source=os.path.abspath(input_path),
    center_crop=center_crop,
    resize="PIL.Image.BICUBIC",
    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  )
  fileio.write_json(os.path.join(output_dir, ar.METADATA_FILE), new)
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
  flags.DEFINE_integer(
    "max_pixels",
    None,
    "Refuse a source image whose header declares more pixels, before decoding it (default: "
    "max(89,478,485, (8 * resolution)**2); PIL's own decompression-bomb limit is lifted to this).",
  )
  flags.DEFINE_bool(
    "follow_symlinks",
    False,
    "Read symlinks under --input that point outside it, and descend symlinked folders. Off: such "
    "a link is refused with an error naming it; symlinked folders inside --input are skipped.",
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from common.train.cli import run_or_exit

  f = flags.FLAGS
  # prepare checks each image's declared size against --max_pixels itself; PIL's global limit
  # would otherwise refuse (or warn about) images the flag allows.
  Image.MAX_IMAGE_PIXELS = None
  meta = run_or_exit(
    prepare,
    f.input,
    f.output,
    f.resolution,
    f.split,
    center_crop=f.center_crop,
    overwrite=f.overwrite,
    num_workers=f.num_workers,
    max_pixels=f.max_pixels,
    follow_symlinks=f.follow_symlinks,
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
