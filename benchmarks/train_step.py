"""Times one training step of any config: compile time, step time, images/s, FLOPs, TFLOP/s.

  python benchmarks/train_step.py --config=configs/ddpm.py:digits
  python benchmarks/train_step.py --config=configs/ddpm.py:imagenet64 --config.model.dtype=bfloat16 \
      --config.batch_size=64 --peak_tflops=989

The batch is synthetic (uniform noise of the dataset's shape), so an array_record config needs no
prepared data here; everything else is the real step the trainer compiles (same shardings,
donation, optimizer, EMA). FLOPs come from XLA's cost analysis of the compiled step.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file and preset.", lock_config=True
)
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps (after 2 warm-up steps).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for the utilisation figure.")


def main(argv):
  del argv
  from common import data, parallel
  from common.train import loop, validate
  from common.train import method as method_lib

  config = _CONFIG.value
  if config.data.name == "array_record" and not os.path.isdir(
    config.data.data_dir or "/nonexistent"
  ):
    # Benchmark the architecture without prepared data: same shapes, procedural pixels.
    with config.unlocked():
      config.data.name = "shapes"
  mesh_shape = validate.validate_common(config, num_devices=jax.device_count())
  info = data.get_info(config.data)
  method = method_lib.load_method(config, info)
  mesh = parallel.make_mesh(mesh_shape)
  fns = loop.build(config, method, mesh)

  b, r, c = config.batch_size, info.resolution, info.channels
  rng = np.random.default_rng(0)
  host_batch = {
    "image": rng.uniform(-1, 1, (b, r, r, c)).astype(np.float32),
    "label": rng.integers(0, max(info.num_classes, 1), (b,)).astype(np.int32),
  }
  batch = parallel.global_batch(host_batch, fns["batch_sharding"])
  state = fns["init"]()

  t0 = time.perf_counter()
  compiled = fns["step"].lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  tflops = flops / step_s / 1e12
  device = jax.devices()[0]
  print(f"device            {device.platform} {device.device_kind} x{jax.device_count()}")
  print(
    f"config            batch {b}, {r}x{r}x{c}, dtype {config.model.dtype}, params {n_params:,}"
  )
  print(f"compile_s         {compile_s:.2f}")
  print(
    f"step_ms_median    {step_s * 1e3:.2f}  (min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f})"
  )
  print(f"images_per_s      {b / step_s:.1f}")
  print(f"flops_per_step    {flops:.4g}")
  print(f"achieved_tflops   {tflops:.3f}")
  if _PEAK.value > 0:
    print(f"fraction_of_peak  {tflops / _PEAK.value:.3f}  (peak {_PEAK.value} TFLOP/s)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
