"""Batch-1 latency of TFDiff Config I, Config II and the U-Net at a similar parameter count.

  python benchmarks/mobile_latency.py                      # digits 8x8x1, DDIM-50
  python benchmarks/mobile_latency.py --setting=shapes32 --image_steps=10 --repeats=3
  python benchmarks/mobile_latency.py --mode=compile      # compile time and program size vs N

For each network: parameters, FLOPs of one denoiser call (XLA cost analysis; TFDiff unrolled,
since a scan body is counted once) next to the closed-form formula, compile time, the median
latency of one denoising step (one jitted network call) and of one image (the whole jitted
fixed-step DDIM chain) at batch 1. Weights are random: latency does not depend on their values.
Prints a markdown table for benchmarks/RESULTS.md.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_SETTING = flags.DEFINE_enum("setting", "digits", ["digits", "shapes32"], "Input size and models.")
_IMAGE_STEPS = flags.DEFINE_integer("image_steps", 50, "DDIM steps of the per-image latency.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per measurement (median).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_MODE = flags.DEFINE_enum("mode", "latency", ["latency", "compile"], "What to measure.")
_DEPTHS = flags.DEFINE_list("depths", ["2", "6", "12", "24"], "N for --mode=compile.")

# (label, config file preset, overrides). The U-Nets are the foundation's ADM U-Net with widths
# chosen so its parameter count is close to TFDiff's at the same setting.
_SETTINGS = {
  "digits": [
    ("TFDiff Config I (s=2, D=64, N=6)", "mobile", "digits_config1", {}),
    ("TFDiff Config II (s=1, D=64, N=6)", "mobile", "digits_config2", {}),
    ("U-Net (24, 48), 1 res block", "ddpm", "digits", {"model.channels": (24, 48)}),
  ],
  "shapes32": [
    ("TFDiff Config I (s=2, D=128, N=8)", "mobile", "shapes_config1", {}),
    ("TFDiff Config II (s=1, D=128, N=8)", "mobile", "shapes_config2", {}),
    (
      "U-Net (32, 64, 96), 2 res blocks",
      "ddpm",
      "shapes",
      {"model.channels": (32, 64, 96)},
    ),
  ],
}


def _timed(fn, *args, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))  # compile + first run
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return compile_s, float(np.median(times))


def measure(config, *, image_steps: int, repeats: int) -> dict:
  """Latency and cost of one config's network at batch 1."""
  from common import data
  from common.diffusion import sampling
  from common.metrics import flops as flops_lib
  from common.train.method import load_method

  info = data.get_info(config.data)
  method = load_method(config, info)
  params = method.init_params(jax.random.key(0))
  # Random weights everywhere: the zero-initialised heads would make some ops trivially cheap.
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(
    treedef, [jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  )
  res, ch = info.resolution, info.channels
  x = jnp.asarray(rng.standard_normal((1, res, res, ch)), jnp.float32)
  t = jnp.array([10], jnp.int32)
  y = jnp.array([0], jnp.int32) if method.class_conditional else None

  step_fn = jax.jit(lambda p, x, t: method.apply(p, x, t, y))
  compile_step, step_s = _timed(step_fn, params, x, t, repeats=repeats)

  def chain(p, x_t):
    return sampling.sample(
      method.diffusion,
      method.denoise_fn(p),
      x_t.shape,
      jax.random.PRNGKey(0),
      num_steps=image_steps,
      sampler="ddim",
      y=y,
      x_T=x_t,
    )

  compile_img, image_s = _timed(jax.jit(chain), params, x, repeats=max(1, repeats // 4))
  result = {
    "params": flops_lib.count_params(params),
    "flops_xla": method.denoiser_call_flops(params, 1),
    "compile_step_s": compile_step,
    "compile_image_s": compile_img,
    "step_ms": 1e3 * step_s,
    "image_ms": 1e3 * image_s,
  }
  if config.model.name == "tfdiff":
    from mobile import formulas

    result["flops_formula"] = formulas.flops(method.spec())
  return result


def compile_vs_depth(depths) -> None:
  """Compile time and StableHLO size of the gradient of Config I (digits) for scan vs unroll."""
  from flax import nnx

  from mobile.model import TFDiff
  from mobile.spec import TFDiffSpec

  print("| N | layer loop | StableHLO chars | compile (grad, batch 32) |")
  print("|---|---|---|---|")
  for n in depths:
    sp = TFDiffSpec(image_size=8, in_channels=1, out_channels=1, width=64, depth=n, num_heads=4)
    graphdef, state = nnx.split(nnx.eval_shape(lambda sp=sp: TFDiff(sp, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((32, 8, 8, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((32,), jnp.int32)
    for mode in ("scan", "unroll"):
      loss = lambda st, x, t, mode=mode, gd=graphdef: jnp.mean(
        nnx.merge(gd, st)(x, t, layer_loop=mode) ** 2
      )
      lowered = jax.jit(jax.grad(loss)).lower(state, x, t)
      t0 = time.perf_counter()
      lowered.compile()
      print(
        f"| {n} | {mode} | {len(lowered.as_text()):,} | {time.perf_counter() - t0:.1f} s |",
        flush=True,
      )


def main(argv):
  del argv
  import importlib

  if _MODE.value == "compile":
    compile_vs_depth([int(d) for d in _DEPTHS.value])
    return

  device = jax.devices()[0]
  print(f"device {device.platform} {device.device_kind}, batch 1, {_DTYPE.value}, "
        f"DDIM-{_IMAGE_STEPS.value} per image, median of {_REPEATS.value} steps")  # fmt: skip
  print()
  print("| network | params | FLOPs / call (XLA) | formula | compile step | step | image |")
  print("|---|---|---|---|---|---|---|")
  for label, module, preset, overrides in _SETTINGS[_SETTING.value]:
    config = importlib.import_module(f"configs.{module}").get_config(preset)
    config.model.dtype = _DTYPE.value
    config.model.class_conditional = False  # unconditional everywhere: one call per step
    config.update_from_flattened_dict(overrides)
    r = measure(config, image_steps=_IMAGE_STEPS.value, repeats=_REPEATS.value)
    formula = f"{r['flops_formula']:.3g}" if "flops_formula" in r else "-"
    print(
      f"| {label} | {r['params']:,} | {r['flops_xla']:.3g} | {formula} | "
      f"{r['compile_step_s']:.1f} s | {r['step_ms']:.2f} ms | {r['image_ms']:.1f} ms |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
