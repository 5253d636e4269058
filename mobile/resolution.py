"""Samples a trained run at another resolution than it was trained on, with the same parameters.

  python -m mobile.resolution --workdir=runs/mobile1 --resolution=16 --out=runs/mobile1/res16.png

TFDiff has no patch grid and no positional table, so nothing is resized: the stem conv, the core
blocks (attention over however many positions there are, the depthwise conv) and the head run on
any H x W divisible by the stride. The run's sampler and step count are used; the grid is written
to ``--out`` and the samples to ``--out`` with ``.npy``.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from common import fileio


def sample_at(method, params, rng, num_samples: int, resolution: int, labels=None) -> np.ndarray:
  """``num_samples`` images [N, resolution, resolution, C] in [-1, 1] from the run's sampler."""
  from common.diffusion import sampling
  from common.train.method import timestep_spacing, x0_clipping_kwargs

  d = method.config.diffusion
  conditional = method.class_conditional and labels is not None
  shape = (num_samples, resolution, resolution, method.data_info.channels)
  run = jax.jit(
    lambda p, r, y: sampling.sample(
      method.diffusion,
      method.denoise_fn(p),
      shape,
      r,
      num_steps=d.sample_steps,
      spacing=timestep_spacing(method.config),
      sampler=d.sampler,
      eta=d.ddim_eta,
      y=y,
      guidance_scale=d.guidance_scale if conditional else 1.0,
      null_label=method.data_info.num_classes if conditional else None,
      clip_denoised=d.clip_denoised,
      **x0_clipping_kwargs(method.config),
    )
  )
  y = jnp.asarray(labels, jnp.int32) if conditional else None
  return np.asarray(run(params, rng, y))


def _define_flags():
  # Defined only when run as a binary (common.eval defines flags of the same names).
  return {
    "workdir": flags.DEFINE_string("workdir", None, "Run directory written by mobile.train."),
    "resolution": flags.DEFINE_integer("resolution", 16, "Sampling resolution."),
    "num_samples": flags.DEFINE_integer("num_samples", 64, "Samples to draw."),
    "seed": flags.DEFINE_integer("seed", 0, "Sampling seed."),
    "out": flags.DEFINE_string("out", None, "PNG path of the sample grid."),
  }


_FLAGS: dict = {}


def main(argv):
  del argv
  from common import images
  from common.eval import load_params
  from common.train import logger

  logger.quiet_library_logs()
  f = {k: v.value for k, v in _FLAGS.items()}
  _, method, params, step = load_params(f["workdir"])
  labels, row_names = method.grid_labels(f["num_samples"])
  try:
    samples = sample_at(
      method, params, jax.random.PRNGKey(f["seed"]), f["num_samples"], f["resolution"], labels
    )
  except ValueError as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)
  out = f["out"] or os.path.join(f["workdir"], f"samples_{f['resolution']}px.png")
  ncols = None if labels is None else int(np.ceil(f["num_samples"] / method.data_info.num_classes))
  images.save_grid(out, samples, ncols=ncols, row_labels=row_names)
  with fileio.atomic_open(os.path.splitext(out)[0] + ".npy", "wb") as handle:
    np.save(handle, samples)
  print(f"{out}: {f['num_samples']} samples at {f['resolution']}px, checkpoint {step}")


if __name__ == "__main__":
  _FLAGS.update(_define_flags())
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
