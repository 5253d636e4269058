"""Times one training step of any config: compile time, step time, images/s, FLOPs, TFLOP/s.

  python benchmarks/train_step.py --config=configs/ddpm.py:digits
  python benchmarks/train_step.py --config=configs/ddpm.py:imagenet64 --config.model.dtype=bfloat16 \
      --config.batch_size=64 --peak_tflops=989

The batch is synthetic (uniform noise of the dataset's shape): ``method.images_per_step()``
images (the global batch; collab: K per-client batches), so an array_record config needs no
prepared data here; everything else is the real step the trainer compiles (same shardings,
donation, optimizer, EMA). FLOPs come from XLA's cost analysis of the compiled step (of the
lowered program where the backend's analysis gives none).

``--json_out=PATH`` also writes every figure as one JSON object (``benchmarks/gpu_check.sh`` reads
it); ``--compile_only`` stops after the compile (with ``$JAX_COMPILATION_CACHE_DIR`` set, a later
run of the same command then reads the program from the persistent cache).
"""

import json
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
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the figures to this JSON file.")
_COMPILE_ONLY = flags.DEFINE_bool(
  "compile_only", False, "Build and compile the step, write --json_out, and stop (no steps)."
)


def _flops(analysis) -> float:
  """The ``flops`` of a cost analysis (a dict, or a list of one dict per program)."""
  cost = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
  value = cost.get("flops") if cost else None
  return float(value) if value is not None and float(value) > 0 else float("nan")


def _write_json(path: str, record: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def _build_step(config):
  """The method, the trainer's functions (``loop.build``) and a synthetic batch for one step.

  Returns ``(method, fns, batch, (b, r, c))``: ``batch`` holds ``b`` images ``[b, r, r, c]``
  (uniform noise) and their labels, placed with the step's batch sharding.
  """
  from common import data, parallel
  from common.train import loop, validate
  from common.train import method as method_lib

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

  # The images one step reads: the global batch, or K per-client batches (collab).
  b, r, c = method.images_per_step(), info.resolution, info.channels
  rng = np.random.default_rng(0)
  host_batch = {
    "image": rng.uniform(-1, 1, (b, r, r, c)).astype(np.float32),
    "label": rng.integers(0, max(info.num_classes, 1), (b,)).astype(np.int32),
  }
  batch = parallel.global_batch(host_batch, fns["batch_sharding"])
  return method, fns, batch, (b, r, c)


def _compile_step(config, fns, state, batch, shape):
  """The compiled step and the record of its compile: device, shapes, params, time, FLOPs."""
  b, r, c = shape
  t0 = time.perf_counter()
  lowered = fns["step"].lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(compiled.cost_analysis())
  flops_how = "compiled"
  if flops != flops:
    # Some backends leave library calls (cuDNN convolutions) out of the compiled program's
    # analysis; the lowered program's count is the same network's, before fusion.
    flops, flops_how = _flops(lowered.cost_analysis()), "lowered"
  device = jax.devices()[0]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  record = {
    "device": f"{device.platform} {device.device_kind} x{jax.device_count()}",
    "platform": device.platform,
    "batch": int(b),
    "image": [int(r), int(r), int(c)],
    "dtype": str(config.model.dtype),
    "params": n_params,
    "compile_s": compile_s,
    "flops_per_step": flops,
    "flops_from": flops_how,
  }
  try:
    record["xla_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # not every backend reports it
    pass
  return compiled, record


def _time_steps(compiled, state, batch, repeats):
  """``(state, metrics, times)``: 2 warm-up steps, then ``repeats`` timed ones (s each)."""
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return state, metrics, times


def _print_figures(config, record, shape, times) -> None:
  """The table: device, config, compile and step times, images/s, FLOPs, TFLOP/s, peak share."""
  b, r, c = shape
  step_s = float(np.median(times))
  flops = record["flops_per_step"]
  tflops = flops / step_s / 1e12
  print(f"device            {record['device']}")
  print(
    f"config            batch {b}, {r}x{r}x{c}, dtype {config.model.dtype},"
    f" params {record['params']:,}"
  )
  print(f"compile_s         {record['compile_s']:.2f}")
  print(
    f"step_ms_median    {step_s * 1e3:.2f}  (min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f})"
  )
  print(f"images_per_s      {b / step_s:.1f}")
  print(f"flops_per_step    {flops:.4g}")
  print(f"achieved_tflops   {tflops:.3f}")
  if _PEAK.value > 0:
    print(f"fraction_of_peak  {tflops / _PEAK.value:.3f}  (peak {_PEAK.value} TFLOP/s)")


def _add_model_flops(record, config, method, params, b) -> None:
  """Adds the model FLOPs (forward per image, per step) to ``record``, or why they are missing.

  Model FLOPs (the usual MFU numerator): 3 x one forward per image (forward, and a backward of
  twice its cost). XLA's count of the step also holds the optimizer and EMA, and counts a loop
  body once (TFDiff's scanned blocks); a method whose params are not one network (collab) leaves
  it out.
  """
  try:
    guided = method.class_conditional and config.diffusion.guidance_scale != 1.0
    forward = method.denoiser_call_flops(params, 1) / (2 if guided else 1)
    record.update(forward_flops_per_image=forward, model_flops_per_step=3.0 * b * forward)
  except Exception as e:  # reported; the step's figures stand without it
    record["model_flops_error"] = f"{type(e).__name__}: {e}"[:300]


def _add_timings(record, metrics, times, b) -> None:
  """Adds the step times, images/s, TFLOP/s, loss, peak share, MFU and peak memory to ``record``.

  Prints the MFU line when ``--peak_tflops`` and the model FLOPs are known.
  """
  step_s = float(np.median(times))
  tflops = record["flops_per_step"] / step_s / 1e12
  record.update(
    repeats=len(times),
    step_ms_median=step_s * 1e3,
    step_ms_min=min(times) * 1e3,
    step_ms_max=max(times) * 1e3,
    images_per_s=b / step_s,
    achieved_tflops=tflops,
    loss=float(np.asarray(metrics["loss"])) if "loss" in metrics else None,
  )
  if _PEAK.value > 0:
    record.update(peak_tflops=_PEAK.value, fraction_of_peak=tflops / _PEAK.value)
    if "model_flops_per_step" in record:
      mfu = record["model_flops_per_step"] / step_s / 1e12 / _PEAK.value
      record["mfu"] = mfu
      print(f"mfu               {mfu:.3f}  (3 x forward FLOPs x {b} images)")
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    record["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])


def main(argv):
  del argv
  from benchmarks import jitted_step

  config = _CONFIG.value
  jitted_step.as_the_binaries(config.model.name)  # before the backend exists
  method, fns, batch, shape = _build_step(config)
  state = fns["init"]()
  compiled, record = _compile_step(config, fns, state, batch, shape)
  if _COMPILE_ONLY.value:
    print(f"compile_s         {record['compile_s']:.2f}  (compile only)")
    _write_json(_JSON_OUT.value, record)
    return

  state, metrics, times = _time_steps(compiled, state, batch, _REPEATS.value)
  _print_figures(config, record, shape, times)
  _add_model_flops(record, config, method, state.params, shape[0])
  _add_timings(record, metrics, times, shape[0])
  _write_json(_JSON_OUT.value, record)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
