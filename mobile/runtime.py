"""Runs the artifacts of ``mobile.export`` with nothing but jax and numpy (no model code).

This file imports no other module of the repo on purpose: copy it next to an export directory and

  from runtime import load_export
  art = load_export("runs/mobile1/export")
  eps = art.denoiser("float32")(x, t)             # x [B, H, W, C] float32, t [B] int32
  images = art.sampler("bfloat16")(x_T)           # x_T [B, H, W, C] float32 ~ N(0, I)

Shapes and dtypes are fixed at export time and recorded in ``manifest.json``; a call with other
shapes is refused by ``jax.export`` itself. Command line (writes an .npy of samples):

  python mobile/runtime.py --export_dir=runs/mobile1/export --out=samples.npy --seed=0
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import numpy as np

MANIFEST = "manifest.json"


class ExportedModel:
  """The artifacts of one export directory; see the module docstring."""

  def __init__(self, export_dir: str):
    self.export_dir = export_dir
    with open(os.path.join(export_dir, MANIFEST)) as f:
      self.manifest = json.load(f)
    self._cache: dict[str, jax.export.Exported] = {}

  def _load(self, kind: str, dtype: str) -> jax.export.Exported:
    key = f"{kind}_{dtype}"
    if key not in self.manifest["artifacts"]:
      raise KeyError(
        f"{self.export_dir}: no {key} artifact; have {sorted(self.manifest['artifacts'])}"
      )
    if key not in self._cache:
      path = os.path.join(self.export_dir, self.manifest["artifacts"][key]["file"])
      with open(path, "rb") as f:
        self._cache[key] = jax.export.deserialize(bytearray(f.read()))
    return self._cache[key]

  def denoiser(self, dtype: str = "float32"):
    """``(x [B, H, W, C] f32, t [B] i32[, y [B] i32]) -> [B, H, W, C_out] f32``."""
    return self._load("denoiser", dtype).call

  def sampler(self, dtype: str = "float32"):
    """``(x_T [B, H, W, C] f32[, y [B] i32]) -> images [B, H, W, C] f32 in [-1, 1]`` (DDIM)."""
    return self._load("sampler", dtype).call

  def input_shape(self, kind: str = "sampler", dtype: str = "float32") -> tuple[int, ...]:
    return tuple(self.manifest["artifacts"][f"{kind}_{dtype}"]["inputs"][0]["shape"])


def load_export(export_dir: str) -> ExportedModel:
  """Reads ``export_dir/manifest.json``; artifacts are deserialized on first use."""
  return ExportedModel(export_dir)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--export_dir", required=True)
  parser.add_argument("--out", required=True, help="an .npy file for the samples")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--label", type=int, default=-1, help="class id (conditional exports)")
  args = parser.parse_args()
  art = load_export(args.export_dir)
  shape = art.input_shape("sampler", args.dtype)
  x_t = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
  inputs = [x_t]
  if art.manifest["num_classes"]:
    label = args.label if args.label >= 0 else art.manifest["num_classes"]
    inputs.append(np.full((shape[0],), label, np.int32))
  _save_whole(args.out, np.asarray(art.sampler(args.dtype)(*inputs)))


def _save_whole(path: str, array: np.ndarray) -> None:
  """``np.save`` whole or not at all: a unique temporary file, then ``os.replace`` (this file
  imports nothing of the repo, so not ``common.fileio``; the same protocol)."""
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=os.path.dirname(os.path.abspath(path)))  # fmt: skip
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


if __name__ == "__main__":
  main()
