"""Parameters and FLOPs of ``configs/mobile.py`` presets, as the run would count them.

``python -m mobile.sizes [PRESET ...]`` builds each preset's method abstractly (nothing is
initialised or run), counts the parameter tree and asks XLA's cost analysis for the FLOPs of one
denoiser call at batch 1 (``Method.denoiser_call_flops``: TFDiff's stack unrolled, every U-ViT
block counted), and prints a markdown table. It is how the U-ViT presets were sized against
TFDiff Config I and II (the figures in ``configs/mobile.py``); compiles only, a few seconds each.
"""

from __future__ import annotations

import sys

DEFAULT_PRESETS = (
  "digits_config1",
  "digits_uvit_params1",
  "digits_uvit_flops1",
  "digits_config2",
  "digits_uvit_params2",
  "digits_uvit_flops2",
  "digits_uvit_tiny",
)


def measure(preset: str) -> dict:
  """``{"preset", "model", "params", "flops_per_call", "flops_per_sample", "note"}`` of a preset.

  A preset whose data set is not on disk (``celeba64_*``) is measured as 3 channels, no labels.
  """
  import jax

  from common import data
  from configs import mobile as mobile_configs
  from mobile.method import Mobile

  config = mobile_configs.get_config(preset)
  note = ""
  try:
    info = data.get_info(config.data)
  except (ValueError, FileNotFoundError):
    res = int(config.data.resolution)
    info = data.DatasetInfo(config.data.name, 0, 0, res, 3, 0, ())
    note = "data absent: 3 channels, no labels assumed"
  method = Mobile(config, info)
  params = jax.eval_shape(method.init_params, jax.random.key(0))
  per_call = method.denoiser_call_flops(params, 1)
  return {
    "preset": preset,
    "model": config.model.name,
    "params": sum(int(a.size) for a in jax.tree.leaves(params)),
    "flops_per_call": per_call,
    # DDPM.flops_per_sample is denoiser_call_flops over the chain: one call's count times its
    # steps, without compiling the call again.
    "flops_per_sample": per_call * int(config.diffusion.sample_steps),
    "note": note,
  }


def main(argv: list[str]) -> None:
  """Prints the table for the presets named in ``argv`` (default: ``DEFAULT_PRESETS``)."""
  print("| preset | model | params | FLOPs / call (XLA, batch 1) | FLOPs / sample | note |")
  print("|---|---|---|---|---|---|")
  for preset in argv or DEFAULT_PRESETS:
    r = measure(preset)
    print(
      f"| {r['preset']} | {r['model']} | {r['params']:,} | {r['flops_per_call']:.4g} "
      f"| {r['flops_per_sample']:.4g} | {r['note']} |",
      flush=True,
    )


if __name__ == "__main__":
  main(sys.argv[1:])
