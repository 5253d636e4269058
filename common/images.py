"""Sample grids as PNGs: what a researcher looks at first."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common import fileio


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float images -> uint8 [0, 255], rounding like the data pipeline inverts it."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(
  images: np.ndarray,
  *,
  ncols: int | None = None,
  row_labels: Sequence[str] | None = None,
  min_cell: int = 48,
  pad: int = 2,
) -> Image.Image:
  """Lays out ``images`` ([N, H, W, C] float in [-1, 1], C in {1, 3}) as a grid image.

  Small images are upscaled (nearest) to at least ``min_cell`` pixels so 8x8 and 16x16 samples
  are visible; ``row_labels`` (one per row) are written in a margin on the left.
  """
  images = to_uint8(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"make_grid: expected [N, H, W, 1|3] images, got shape {images.shape}")
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  scale = max(1, int(np.ceil(min_cell / max(h, w))))
  ch, cw = h * scale, w * scale
  margin = 0
  font = ImageFont.load_default()
  if row_labels is not None:
    margin = 8 + 7 * max((len(s) for s in row_labels), default=0)
  canvas = Image.new(
    "RGB", (margin + ncols * (cw + pad) + pad, nrows * (ch + pad) + pad), (255, 255, 255)
  )
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    r, col = divmod(i, ncols)
    img = images[i]
    if c == 1:
      img = np.repeat(img, 3, axis=-1)
    tile = Image.fromarray(img).resize((cw, ch), Image.NEAREST)
    canvas.paste(tile, (margin + pad + col * (cw + pad), pad + r * (ch + pad)))
  if row_labels is not None:
    for r, label in enumerate(row_labels[:nrows]):
      draw.text((4, pad + r * (ch + pad) + ch // 2 - 5), str(label), fill=(0, 0, 0), font=font)
  return canvas


def save_grid(path: str, images: np.ndarray, **kwargs) -> str:
  """Writes ``make_grid(images, **kwargs)`` to ``path`` (directories created) whole or not at all
  (``common.fileio``); returns the path."""
  grid = make_grid(images, **kwargs)
  with fileio.atomic_path(path) as tmp:  # the temporary name keeps the extension: same format
    grid.save(tmp)
  return path
