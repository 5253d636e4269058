"""Exports a trained run for on-device use: ``python -m mobile.export --workdir=DIR --out=DIR/export``.

Writes, for each of float32 and bfloat16, two serialized ``jax.export`` artifacts (StableHLO with
the parameters embedded as constants, fixed input shapes):

* ``denoiser_<dtype>.jaxexport``: one network call, ``(x [B, H, W, C] f32, t [B] i32[, y [B] i32])
  -> [B, H, W, C_out] f32``;
* ``sampler_<dtype>.jaxexport``: the whole fixed-step DDIM chain (eta 0, so deterministic given
  the starting noise), ``(x_T [B, H, W, C] f32[, y [B] i32]) -> images [B, H, W, C] f32``;

plus ``manifest.json``: every artifact's inputs, outputs (shapes, dtypes), size and sha256, the
diffusion schedule (levels, model timesteps, abar at each level, guidance), the architecture and
its closed-form parameter and FLOP counts. ``mobile/runtime.py`` runs them with jax alone.

bfloat16 artifacts hold bfloat16 weights and compute in bfloat16 (norms, softmax, the residual
stream and the conditioning path stay float32, as in training); their inputs and outputs are
float32 so one loader feeds both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from common import fileio

DTYPES = ("float32", "bfloat16")


def _graphdef(method, dtype: str):
  """The network's graph with ``dtype`` compute (the run's config otherwise unchanged)."""
  from common import models

  config = method.config.copy_and_resolve_references()
  config.model.dtype = dtype
  abstract = nnx.eval_shape(
    lambda: models.build_model(
      config,
      in_channels=method.data_info.channels,
      num_classes=method.data_info.num_classes,
      rngs=models.InitRngs(0),
    )
  )
  return nnx.split(abstract, nnx.Param)[0]


def denoise_fn(method, params, dtype: str = "float32"):
  """``(x, t, y) -> model output`` with parameters cast to ``dtype`` and closed over.

  x: [B, H, W, C] float32, t: [B] int32, y: [B] int32 or None -> [B, H, W, C_out] float32.
  """
  graphdef = _graphdef(method, dtype)
  cast = jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(dtype)), params)

  def fn(x, t, y=None):
    return nnx.merge(graphdef, cast)(x, t, y).astype(jnp.float32)

  return fn


def ddim_levels(method, num_steps: int) -> np.ndarray:
  """The descending level grid of the exported chain on the run's ``diffusion.timestep_spacing``:
  [num_steps + 1] int32, T (uniform) or the DDIM grid's top first, 0 last."""
  from common.diffusion import make_levels
  from common.train.method import timestep_spacing

  return make_levels(
    method.diffusion.num_timesteps, num_steps, spacing=timestep_spacing(method.config)
  )


def sampler_fn(method, params, dtype: str = "float32", num_steps: int | None = None):
  """``(x_T, y) -> images``: the whole deterministic DDIM chain with CFG as the run configures.

  x_T: [B, H, W, C] float32 noise, y: [B] int32 or None -> [B, H, W, C] float32 in [-1, 1].
  """
  from common.diffusion import sampling
  from common.train.method import timestep_spacing, x0_clipping_kwargs

  d = method.config.diffusion
  steps = int(num_steps or d.sample_steps)
  fn = denoise_fn(method, params, dtype)
  conditional = method.class_conditional

  def run(x_t, y=None):
    return sampling.sample(
      method.diffusion,
      fn,
      x_t.shape,
      jax.random.PRNGKey(0),  # unused: DDIM with eta 0 from a given x_T draws no noise
      num_steps=steps,
      spacing=timestep_spacing(method.config),
      sampler="ddim",
      eta=0.0,
      y=y,
      guidance_scale=d.guidance_scale if conditional else 1.0,
      null_label=method.data_info.num_classes if conditional else None,
      x_T=x_t,
      clip_denoised=d.clip_denoised,
      **x0_clipping_kwargs(method.config),
    )

  return run


def _spec(shape, dtype, name) -> dict[str, Any]:
  return {"name": name, "shape": [int(s) for s in shape], "dtype": str(jnp.dtype(dtype))}


def export_run(
  method,
  params,
  out_dir: str,
  *,
  batch_size: int = 1,
  resolution: int | None = None,
  num_steps: int | None = None,
  dtypes: tuple[str, ...] = DTYPES,
  platforms: tuple[str, ...] = ("cpu",),
) -> dict[str, Any]:
  """Serializes the denoiser and the DDIM sampler of ``params``; returns the manifest written.

  Args:
    method: the run's ``mobile.method.Mobile`` (any ``DDPM`` works).
    params: the parameters to embed (EMA weights by convention).
    out_dir: directory for the artifacts and ``manifest.json``.
    batch_size, resolution: the fixed input shape [batch_size, resolution, resolution, C]
      (resolution defaults to the training resolution; TFDiff runs at any multiple of s).
    num_steps: DDIM steps of the exported chain (default ``diffusion.sample_steps``).
    dtypes: a subset of ("float32", "bfloat16").
    platforms: jax.export lowering platforms (e.g. ("cpu", "cuda")).
  """
  info, d = method.data_info, method.config.diffusion
  res = int(resolution or info.resolution)
  steps = int(num_steps or d.sample_steps)
  x_shape = (batch_size, res, res, info.channels)
  os.makedirs(out_dir, exist_ok=True)
  artifacts = {}
  for dtype in dtypes:
    if dtype not in DTYPES:
      raise ValueError(f"export: dtype {dtype!r} not in {DTYPES}")
    artifacts.update(_export_dtype(method, params, dtype, x_shape, steps, out_dir, platforms))
  manifest = _manifest(method, params, res, steps, batch_size, artifacts)
  fileio.write_json(os.path.join(out_dir, "manifest.json"), manifest)
  return manifest


def _export_dtype(method, params, dtype: str, shape, steps: int, out_dir: str, platforms):
  """Writes ``denoiser_<dtype>`` and ``sampler_<dtype>`` for inputs x of ``shape`` [B, H, W, C];
  returns their manifest entries by name."""
  b, res, _, ch = shape
  conditional = method.class_conditional
  out_ch = method.diffusion.output_channels(ch)
  x_s = jax.ShapeDtypeStruct(shape, jnp.float32)
  i_s = jax.ShapeDtypeStruct((b,), jnp.int32)
  den = denoise_fn(method, params, dtype)
  smp = sampler_fn(method, params, dtype, steps)
  den_args = (x_s, i_s, i_s) if conditional else (x_s, i_s)
  smp_args = (x_s, i_s) if conditional else (x_s,)
  den_inputs = [_spec(x_s.shape, jnp.float32, "x"), _spec(i_s.shape, jnp.int32, "t")]
  smp_inputs = [_spec(x_s.shape, jnp.float32, "x_T")]
  if conditional:
    den_inputs.append(_spec(i_s.shape, jnp.int32, "y"))
    smp_inputs.append(_spec(i_s.shape, jnp.int32, "y"))
  artifacts = {}
  for kind, fn, args, inputs, out in (
    ("denoiser", den, den_args, den_inputs, _spec((b, res, res, out_ch), jnp.float32, "out")),
    ("sampler", smp, smp_args, smp_inputs, _spec((b, res, res, ch), jnp.float32, "images")),
  ):
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
    blob = bytes(exported.serialize())
    name = f"{kind}_{dtype}"
    path = os.path.join(out_dir, f"{name}.jaxexport")
    with fileio.atomic_open(path, "wb") as f:
      f.write(blob)
    artifacts[name] = {
      "file": os.path.basename(path),
      "bytes": len(blob),
      "sha256": hashlib.sha256(blob).hexdigest(),
      "inputs": inputs,
      "outputs": [out],
      "weights_dtype": dtype,
      "compute_dtype": dtype,
      "platforms": list(platforms),
    }
    logging.info("wrote %s (%.2f MB)", path, len(blob) / 1e6)
  return artifacts


def _manifest(method, params, res: int, steps: int, batch_size: int, artifacts) -> dict[str, Any]:
  """What a loader needs besides the artifacts: shapes, the schedule of the exported chain, the
  architecture and its closed-form counts (TFDiff only)."""
  from common.train.method import timestep_spacing, x0_clipping_description

  info, d = method.data_info, method.config.diffusion
  conditional = method.class_conditional
  levels = ddim_levels(method, steps)
  abar = method.diffusion.np_alpha_bar_levels()
  manifest: dict[str, Any] = {
    "method": method.config.method,
    "model": method.config.model.name,
    "resolution": res,
    "train_resolution": int(info.resolution),
    "channels": int(info.channels),
    "batch_size": int(batch_size),
    "num_classes": int(info.num_classes) if conditional else 0,
    "null_label": int(info.num_classes) if conditional else None,
    "params": int(sum(np.size(a) for a in jax.tree.leaves(params))),
    "schedule": {
      "name": d.schedule,
      "num_timesteps": int(method.diffusion.num_timesteps),
      "parameterization": d.parameterization,
      "sampler": "ddim",
      "eta": 0.0,
      "num_steps": steps,
      "timestep_spacing": timestep_spacing(method.config),
      "levels": levels.tolist(),
      "model_timesteps": (levels[:-1] - 1).tolist(),  # t = k - 1 for the step leaving level k
      "alpha_bar_at_levels": [float(abar[k]) for k in levels],
      "guidance_scale": float(d.guidance_scale) if conditional else 1.0,
      "clip_denoised": bool(d.clip_denoised),
      **x0_clipping_description(method.config, bool(d.clip_denoised)),
    },
    "artifacts": artifacts,
  }
  if method.config.model.name == "tfdiff":
    from mobile import formulas

    spec = method.spec()
    manifest["architecture"] = dataclasses.asdict(spec)
    manifest["param_count_formula"] = formulas.param_count(spec)
    manifest["flops_per_call_formula"] = formulas.flops(spec, res)
  return manifest


def _define_flags():
  # Defined only when run as a binary: common.eval defines flags of the same names, and a test
  # process may import both modules.
  return {
    "workdir": flags.DEFINE_string("workdir", None, "Run directory written by mobile.train."),
    "out": flags.DEFINE_string("out", None, "Output directory (default WORKDIR/export)."),
    "batch_size": flags.DEFINE_integer("batch_size", 1, "Fixed batch size of the artifacts."),
    "resolution": flags.DEFINE_integer(
      "resolution", 0, "Fixed resolution (0: the training resolution)."
    ),
    "sample_steps": flags.DEFINE_integer(
      "sample_steps", 0, "DDIM steps (0: the run's sample_steps)."
    ),
    "use_ema": flags.DEFINE_bool("use_ema", True, "Export the EMA weights (else the raw ones)."),
    "platforms": flags.DEFINE_list("platforms", ["cpu"], "jax.export platforms, e.g. cpu,cuda."),
  }


_FLAGS: dict = {}


def main(argv):
  del argv
  from common.eval import load_params
  from common.train import logger
  from common.train.validate import ConfigError

  logger.quiet_library_logs()
  f = {k: v.value for k, v in _FLAGS.items()}
  try:
    _, method, params, step = load_params(f["workdir"], use_ema=f["use_ema"])
    out = f["out"] or os.path.join(f["workdir"], "export")
    manifest = export_run(
      method,
      params,
      out,
      batch_size=f["batch_size"],
      resolution=f["resolution"] or None,
      num_steps=f["sample_steps"] or None,
      platforms=tuple(f["platforms"]),
    )
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)
  manifest["checkpoint_step"] = int(step)
  fileio.write_json(os.path.join(out, "manifest.json"), manifest)
  for name, a in sorted(manifest["artifacts"].items()):
    print(f"{name:20s} {a['bytes'] / 1e6:8.2f} MB  {os.path.join(out, a['file'])}")


if __name__ == "__main__":
  _FLAGS.update(_define_flags())
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
